"""The random-number state of a training run, saved in checkpoints so a resumed run draws the same numbers.

Lightning restores weights, optimizer and loop state, but not the global RNGs: a PPO run resumed after a
crash would sample other responses (``generate`` draws from the global torch RNG) and shuffle other
mini-batches than the uninterrupted run. The modules save this state with every checkpoint and put it back
just before the first training batch after a resume (not at load time: the sanity-check validation and
dataloader setup in between must not shift it).
"""

from __future__ import annotations

import random

import numpy as np
import torch


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
