"""The study's checkpoint rule: score the policy on the validation prompts at fixed points of training and
keep the best-scoring policy (the paper selects the checkpoint with the best validation reward / pass@k)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from typing_extensions import override

from lightning_rlhf.callbacks import RewardCurve


class ValidationCheckpoints(RewardCurve):
    """A :class:`RewardCurve` on the validation prompts that also keeps a copy of the best-scoring policy.

    Each point of :attr:`history` gains ``samples`` (responses sampled for training so far: batches x
    ``samples_per_batch``; 0 for offline DPO). Ties keep the earlier point. The copy lives in memory (the
    testbed's models are tiny); :meth:`save_best` writes it as a ``save_pretrained`` folder.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        reward_function: Callable[[list[str], list[str]], Any],
        tokenizer: Any,
        every_n_batches: int,
        samples_per_batch: int,
        max_new_tokens: int,
        seed: int = 0,
    ) -> None:
        super().__init__(prompts, reward_function, tokenizer, every_n_batches, max_new_tokens, seed)
        if samples_per_batch < 0:
            raise ValueError(
                f"ValidationCheckpoints: samples_per_batch must be >= 0 (got {samples_per_batch})"
            )
        self.samples_per_batch = samples_per_batch
        self.best_point: int | None = None
        self._best_model: Any = None

    @override
    def record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().record(trainer, pl_module)
        point = self.history[-1]
        point["samples"] = self.batches * self.samples_per_batch
        if self.best_point is None or point["reward"] > self.history[self.best_point]["reward"]:
            self.best_point = len(self.history) - 1
            self._best_model = copy.deepcopy(pl_module.trained_model()).cpu()

    def save_best(self, path: str | Path) -> Path:
        """Write the best-scoring policy and the tokenizer into ``path``."""
        if self._best_model is None:
            raise RuntimeError("ValidationCheckpoints.save_best: no point was recorded (did training run?)")
        self._best_model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return Path(path)
