"""Running a test body on two CPU processes joined by a gloo process group."""

import time
from collections.abc import Callable
from pathlib import Path

import fork_server
import torch.multiprocessing as mp


def run_on_two_gloo_ranks(worker: Callable, out_dir: Path, timeout_s: float = 120) -> None:
    """Start ``worker(rank, world_size, init_file, out_dir)`` on 2 processes (forked from the preloaded
    server, tests/fork_server.py) and wait for both.

    A failing rank re-raises its traceback here; a hung rendezvous fails after ``timeout_s`` and leftover
    processes are killed, so a broken collective can never hang the test suite.
    """
    processes = mp.start_processes(
        worker,
        args=(2, str(out_dir / "init"), str(out_dir)),
        nprocs=2,
        join=False,
        start_method=fork_server.start_method(),
    )
    join_or_kill(processes, timeout_s)
    assert [p.exitcode for p in processes.processes] == [0, 0]


def join_or_kill(processes: mp.ProcessContext, timeout_s: float) -> None:
    """Wait for spawned ranks; re-raise a failing rank's traceback; kill leftovers after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while not processes.join(timeout=1):
            assert time.monotonic() < deadline, f"ranks did not finish within {timeout_s} s"
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
