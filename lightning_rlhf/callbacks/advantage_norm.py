"""Whiten PPO advantages over the whole rollout batch, across all data-parallel ranks."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer

from lightning_rlhf.ops import masked_whiten
from lightning_rlhf.rollout.types import Rollout
from lightning_rlhf.validation import check


class AdvantageNormalization(Callback):
    """Normalise a rollout's GAE advantages to mean 0 and standard deviation 1 before the PPO update.

    Xu et al. (2024, "Is DPO Superior to PPO for LLM Alignment?") find advantage normalization one of the
    three things PPO needs to work on language models (with a large rollout batch and an EMA reference):
    raw advantages swing in scale as the reward and the KL penalty drift, and the effective step size of
    the clipped objective swings with them.

    The statistics are those of every response token of the *whole* rollout batch, summed over all ranks
    (float64, :func:`~lightning_rlhf.ops.masked_whiten` with ``all_reduce=True``), so the result does not
    depend on how the batch is split across devices. They use the unbiased variance. Only
    ``rollout.advantages`` changes; ``rollout.returns`` (the value targets) were computed from the raw
    advantages and stay as they are. Without this callback the update uses raw advantages.

    Every rank must call the hook for every rollout (the statistics are a collective); ``PPOModule`` does.
    """

    def __init__(self, shift_mean: bool = True, eps: float = 1e-8) -> None:
        """
        Args:
            shift_mean: Subtract the mean (True). False only rescales: (A - mean) / std + mean keeps the
                mean, so the sign of the average advantage survives (TRL's ``whiten(shift_mean=False)``).
            eps: Added to the variance before the square root, so a constant batch does not divide by 0.
        """
        if not isinstance(shift_mean, bool):
            raise TypeError(f"AdvantageNormalization: shift_mean must be a bool (got {shift_mean!r})")
        check("AdvantageNormalization", "eps", eps, gt=0)
        self.shift_mean = shift_mean
        self.eps = eps

    def on_rollout_end(self, trainer: Trainer | None, pl_module: LightningModule, rollout: Rollout) -> None:
        """The rollout hook (see :mod:`lightning_rlhf.rollout.hooks`): replace ``rollout.advantages``."""
        rollout.advantages = masked_whiten(
            rollout.advantages,
            rollout.response_mask,
            shift_mean=self.shift_mean,
            eps=self.eps,
            all_reduce=True,
        )
