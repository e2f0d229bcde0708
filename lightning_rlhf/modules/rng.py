"""The random-number state of a training run, saved in checkpoints so a resumed run draws the same numbers.

Lightning restores weights, optimizer and loop state, but not the global RNGs: a PPO run resumed after a
crash would sample other responses (``generate`` draws from the global torch RNG) and shuffle other
mini-batches than the uninterrupted run. The modules save this state with every checkpoint and put it back
just before the first training batch after a resume (not at load time: the sanity-check validation and
dataloader setup in between must not shift it).

Every rank has its own state (Lightning seeds every rank alike, but a rank whose responses all end early
stops drawing first, so the streams drift apart), while one process writes the checkpoint: rank 0 under
DDP; under DeepSpeed ZeRO-1/2 data-parallel rank 0 writes the client state that every rank reads back
(ZeRO-3 writes one per rank). So the states of all ranks are gathered into the checkpoint, listed by global
rank (:func:`gather_rng_states`), and each rank takes its own on resume (:func:`rng_state_for_rank`).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def collect_rng_states() -> dict:
    """torch (CPU and every visible CUDA device), numpy and Python ``random`` states."""
    states = {
        "torch": torch.get_rng_state(),
        # Plain lists and numbers, so checkpoints stay loadable with torch.load(weights_only=True).
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Inverse of :func:`collect_rng_states` (CUDA states only where CUDA is in use)."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss_value = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    version, internal, gauss = states["python"]  # a checkpoint may turn the tuples into lists
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(states: dict, world_size: int) -> list[dict]:
    """``states`` of every rank, listed by global rank. A collective: every rank must call it.

    Lightning calls ``on_save_checkpoint`` on every rank (under DDP rank 0 then writes the file), so the
    gather fits there. Without a process group of ``world_size`` ranks it is this process's state alone.
    """
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [states]
    if dist.get_world_size() != world_size:  # not a layout this package sets up; save what this rank has
        rank_zero_warn(
            f"the trainer has {world_size} ranks but the default process group {dist.get_world_size()}: the "
            "checkpoint holds this rank's RNG state only, and a resume will not draw the same numbers"
        )
        return [states]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered


def rng_state_for_rank(saved: dict, rank: int, world_size: int) -> dict | None:
    """This rank's RNG state from a checkpoint's ``lightning_rlhf_state`` (None: the checkpoint has none).

    ``saved["rng_per_rank"]`` lists every rank's state. Checkpoints written before it existed hold one state,
    the writing rank's, in ``saved["rng"]``: every rank then restores it (as they all did then). Resumed on
    another number of ranks, rank r takes the state of rank ``r % saved_ranks``. Both are warned about: the
    random draws then differ from those of the uninterrupted run.
    """
    per_rank = saved.get("rng_per_rank")
    if per_rank is None:
        if world_size > 1 and saved.get("rng") is not None:
            rank_zero_warn(
                f"the checkpoint holds the RNG state of one rank only (written by an older lightning_rlhf); "
                f"all {world_size} ranks restore it, so their random draws differ from the uninterrupted run"
            )
        return saved.get("rng")
    if len(per_rank) != world_size:
        rank_zero_warn(
            f"the checkpoint holds the RNG states of {len(per_rank)} rank(s) and resumes on {world_size}: "
            f"rank r restores the state of rank r % {len(per_rank)}, so the random draws differ from the "
            "uninterrupted run"
        )
    return per_rank[rank % len(per_rank)]
