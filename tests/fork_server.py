"""The one fork server that starts the test suite's extra Python processes: gloo, DeepSpeed and Lightning DDP
ranks, the crash-and-resume jobs and the DeepSpeed config fits; and :func:`free_port` for their rendezvous.

A fresh interpreter spends 6-8 s of CPU importing torch, lightning, transformers and lightning_rlhf on the
2-core CI machine, and a two-rank test used to pay that twice before doing any work. The server imports those
and what the children import on first use (:data:`PRELOAD`) once per pytest process, freezes them for the
garbage collector, and forks every process from there. Nothing else runs in it (no torch op, no thread pool,
no process group), so a child starts as a fresh interpreter would, less the imports; it unpickles its target
by reference, as under ``spawn``.

A child inherits the server's environment as it was when the server started, not the caller's current one:
whatever a process needs (rank, port, world size) goes in its arguments and is set inside it.
"""

import multiprocessing as mp
import socket

PRELOAD = [
    "torch",
    "lightning",
    "transformers",
    "lightning_rlhf",
    # What a child imported on first use (py-spy over the whole suite: ~10 s of the children's time): the
    # test models' family, PEFT for LoRA, the testbed's reward.
    "transformers.models.llama.modeling_llama",
    "peft",
    "lightning_rlhf.testbed.reward",
    # The modules the children unpickle their targets from (pytest too, through resume_helpers).
    "gloo",
    "deepspeed_runs",
    "resume_helpers",
    # DeepSpeed on CPU (sets DS_ACCELERATOR before importing it), and the module DeepSpeed's optimizer check
    # imports when an engine starts: it applies torch.compile at import, which imports torch._inductor and
    # torch._dynamo's debug tools. That took each rank ~1.5 s of CPU alone and 4-6 s of wall time beside the
    # other rank and pytest (py-spy, a 2-rank ZeRO-2 PPO run); a missing module is skipped.
    "deepspeed_cpu",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "fork_server_frozen",  # last: gc.freeze() over all of the above
]
_context = None


def context():
    """The ``forkserver`` context with :data:`PRELOAD` (set before the server first starts)."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def free_port() -> int:
    """A free TCP port on localhost, for a process group's ``MASTER_PORT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method() -> str:
    """``start_method`` for ``torch.multiprocessing.start_processes``, with the server's preload set."""
    context()
    return "forkserver"


def ddp_strategy():
    """Lightning's DDP over gloo, its ranks forked from the server (``"ddp_spawn"`` would start fresh
    interpreters).

    Lightning picks the rendezvous port in the caller and pickles it into the ranks with the strategy, so
    the server's older environment does not matter here."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method=start_method(), process_group_backend="gloo")
