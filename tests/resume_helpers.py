"""The machinery of the crash-and-resume tests: run a training job in a real subprocess, kill it with
SIGKILL after a given step (no cleanup, no final checkpoint: a real crash), resume it from its last
checkpoint, and read what each run recorded.

A job is a Python source string run as ``python -c JOB ROOT KILL_AT RESUME [EXTRA...]`` would; it builds its
trainer with :data:`CALLBACKS` (pasted in front of it) so every job records the same things:
``ROOT/steps.jsonl`` gets one line per training step (global step, the batch's row indices, every logged
metric) and ``ROOT/final.pt`` whatever the job saves at the end.

With ``ranks=2`` the job runs as two processes joined by gloo (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...
set, so Lightning launches nothing itself) under DDP or the test-only CPU DeepSpeed strategy; each rank
records its own steps (rank r > 0 in ``steps-rank{r}.jsonl``) and both ranks kill themselves at the same
step. ``FINAL`` is the rank's ``final.pt`` (``final-rank{r}.pt``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import fork_server
import pytest
import torch

CALLBACKS = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    root, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resume = None if resume == "-" else resume
    torch.set_num_threads(1)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    FINAL = os.path.join(root, "final.pt" if rank == 0 else f"final-rank{rank}.pt")

    def per_rank(name):
        return name if rank == 0 else name.replace(".", f"-rank{rank}.", 1)

    def strategy():
        name = os.environ.get("RESUME_STRATEGY", "auto")
        if name == "ddp":
            from lightning.pytorch.strategies import DDPStrategy
            return DDPStrategy(process_group_backend="gloo")
        if name.startswith("zero"):
            from deepspeed_cpu import CPUDeepSpeedStrategy, zero_config
            return CPUDeepSpeedStrategy(config=zero_config(int(name[-1])))
        return name

    def append(name, line):
        with open(os.path.join(root, per_rank(name)), "a") as f:
            f.write(json.dumps(line) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(trainer, val):
        return {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                if k.startswith("val/") == val and not k.startswith("time/")}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            index = batch.get("index") if isinstance(batch, dict) else None
            append("steps.jsonl", {"step": trainer.global_step, "metrics": metrics(trainer, val=False),
                                   "index": None if index is None else index.tolist()})

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                append("val.jsonl", {"step": trainer.global_step, "metrics": metrics(trainer, val=True)})

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def trainer_for(max_steps, every=1, **kwargs):
        checkpoint = ModelCheckpoint(os.path.join(root, "ckpt"), filename="{step}",
                                     every_n_train_steps=every, save_top_k=-1)
        return L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy(), max_steps=max_steps,
                         logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         deterministic=True, callbacks=[Record(), KillAt(), checkpoint], **kwargs)
    """
)


def _job_process(code: str, argv: list[str], env: dict, log: str, cwd: str | None = None) -> None:
    """A job's process: ``python -c code *argv`` with ``env`` (in ``cwd``), stdout and stderr to ``log``."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["-c", *argv]
    try:
        exec(compile(code, "<job>", "exec"), {"__name__": "__main__"})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def start_job_process(code: str, argv: list[str], env: dict, log: Path, cwd: Path | None = None):
    """Start one process of a job (see :func:`_job_process`); returns the started process."""
    process = fork_server.context().Process(
        target=_job_process, args=(code, argv, env, str(log), None if cwd is None else str(cwd))
    )
    process.start()
    return process


def run_job(
    job: str,
    root: Path,
    *extra: str,
    kill_at: int = -1,
    resume: Path | None = None,
    ranks: int = 1,
    strategy: str = "ddp",
    timeout_s: float = 600,
) -> int:
    """Run ``job`` in fresh processes, one per rank; returns 0, or -SIGKILL when every rank killed itself at
    ``kill_at``. A rank that fails (or outlives ``timeout_s``) fails the test with its stderr.

    The processes are forked from a server that has imported torch, lightning and lightning_rlhf and nothing
    else (no torch op has run there): each job seeds itself, as it would in a fresh interpreter.
    """
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    if ranks > 1:
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(fork_server.free_port()),
            WORLD_SIZE=str(ranks),
            NODE_RANK="0",
            RESUME_STRATEGY=strategy,
        )
    argv = [str(root), str(kill_at), str(resume) if resume else "-", *extra]
    code = CALLBACKS + textwrap.dedent(job)
    procs = []
    for rank in range(ranks):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if ranks > 1 else env
        procs.append(start_job_process(code, argv, rank_env, root / f"stderr-rank{rank}.txt"))
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 1))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if len(set(codes)) != 1 or codes[0] not in (0, -signal.SIGKILL):
        errors = "\n".join(
            f"--- rank {r} ({code}):\n{(root / f'stderr-rank{r}.txt').read_text()[-3000:]}"
            for r, code in enumerate(codes)
        )
        pytest.fail(f"training process(es) failed or hung, exit codes {codes}:\n{errors}")
    return codes[0]


def crash_and_resume(
    job: str, tmp_path: Path, *extra: str, kill_at: int, ranks: int = 1, strategy: str = "ddp"
) -> tuple[Path, Path, Path, int]:
    """The uninterrupted run, the run killed at global step ``kill_at``, and its resume from the last
    checkpoint the crashed run wrote (returned last: that checkpoint's global step).

    ModelCheckpoint runs after every other callback, so the kill at step k came before step k was saved.
    """
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    on = {"ranks": ranks, "strategy": strategy}
    assert run_job(job, full, *extra, **on) == 0
    assert run_job(job, crashed, *extra, kill_at=kill_at, **on) == -signal.SIGKILL
    assert not list(crashed.glob("final*.pt"))
    # A DeepSpeed checkpoint is a folder named like the file.
    saved = sorted((crashed / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    last_step = int(saved[-1].stem.split("=")[1])
    assert 0 < last_step < kill_at
    assert run_job(job, resumed, *extra, resume=saved[-1], **on) == 0
    return full, crashed, resumed, last_step


def steps(root: Path, name: str = "steps.jsonl") -> list[dict]:
    path = root / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_same_history(
    full: Path, crashed: Path, resumed: Path, resumed_from: int, name: str = "steps.jsonl"
) -> None:
    """The crashed run's steps up to its last checkpoint plus the resumed run's steps equal the uninterrupted
    run's steps: the same rows in the same order (none twice, none skipped) and the same logged metrics.
    ``name``: the steps file (``steps-rank1.jsonl`` for rank 1)."""
    stitched = [s for s in steps(crashed, name) if s["step"] <= resumed_from] + steps(resumed, name)
    expected = steps(full, name)
    assert expected, f"no steps recorded in {full / name}"
    assert [s["step"] for s in stitched] == [s["step"] for s in expected]
    assert [s["index"] for s in stitched] == [s["index"] for s in expected]
    assert_same_metrics(stitched, expected)
    # Validation runs: a resumed run may repeat the one at its checkpoint step; it must give the same values.
    val = name.replace("steps", "val")
    full_val = steps(full, val)
    validations = [s for s in steps(crashed, val) if s["step"] <= resumed_from]
    validations += [s for s in steps(resumed, val) if s["step"] > resumed_from]
    assert_same_metrics(validations, full_val)
    for again in (s for s in steps(resumed, val) if s["step"] == resumed_from):
        assert_same_metrics([again], [s for s in full_val if s["step"] == resumed_from])


def assert_same_metrics(got_lines: list[dict], want_lines: list[dict]) -> None:
    assert [s["step"] for s in got_lines] == [s["step"] for s in want_lines]
    for got, want in zip(got_lines, want_lines, strict=True):
        assert got["metrics"].keys() == want["metrics"].keys(), got["step"]
        for name, value in want["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], name)


def assert_same_tensors(full: dict, resumed: dict, what: str = "") -> None:
    """Recursively equal: tensors to float tolerance, everything else exactly."""
    if isinstance(full, dict):
        assert full.keys() == resumed.keys(), what
        for key in full:
            assert_same_tensors(full[key], resumed[key], f"{what}.{key}")
    elif isinstance(full, list | tuple):
        assert len(full) == len(resumed), what
        for i, (a, b) in enumerate(zip(full, resumed, strict=True)):
            assert_same_tensors(a, b, f"{what}[{i}]")
    elif isinstance(full, torch.Tensor):
        torch.testing.assert_close(resumed, full, atol=1e-6, rtol=1e-5, msg=what)
    elif isinstance(full, float):
        assert resumed == pytest.approx(full, rel=1e-6, abs=1e-9), what
    else:
        assert resumed == full, what
