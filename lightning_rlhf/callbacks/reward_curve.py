"""Score the policy on a few fixed held-out prompts every few training batches: a reward curve."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts


class RewardCurve(Callback):
    """Every ``every_n_batches`` training batches, sample one response per prompt and record the mean reward.

    The point of the testbed is that the *gold* reward is known, so ``reward_function`` is usually a
    :class:`~lightning_rlhf.testbed.reward.GoldReward`: the curve then shows the true reward against
    training progress, for any module with ``trained_model()`` (SFT, DPO, DPO-Iter, PPO). It is recorded
    before the first batch, every ``every_n_batches`` batches and after the last one, in :attr:`history`
    as dicts
    ``{"batch", "global_step", "reward"}``. Sampling uses its own seed under ``fork_rng``, so the training
    run draws exactly the random numbers it would without this callback. Keep the prompts few: each point
    costs one generation pass over them.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        reward_function: Callable[[list[str], list[str]], Any],
        tokenizer: Any,
        every_n_batches: int = 10,
        max_new_tokens: int = 12,
        seed: int = 0,
    ) -> None:
        """
        Args:
            prompts: The held-out prompts, one sample each per point of the curve.
            reward_function: ``f(prompts, responses) -> rewards`` (e.g. the testbed's GoldReward).
            tokenizer: The policy's tokenizer (a PreTrainedTokenizer).
            every_n_batches: Training batches between points (a PPO batch is one rollout).
            max_new_tokens: Longest sampled response, in tokens.
            seed: Sampling seed of every point (the same prompts and seed each time, so points differ only
                by the policy).
        """
        if not prompts:
            raise ValueError("RewardCurve: prompts must not be empty")
        if isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int) or every_n_batches < 1:
            raise ValueError(f"RewardCurve: every_n_batches must be an integer >= 1 (got {every_n_batches})")
        self.prompts = list(prompts)
        self.reward_function = reward_function
        self.tokenizer = tokenizer
        self.every_n_batches = every_n_batches
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        self.seed = seed
        self.batches = 0
        self.history: list[dict[str, float]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_batches=self.every_n_batches, seed=self.seed)

    def should_record(self, batches: int) -> bool:
        """Whether to record after ``batches`` training batches (override for another schedule)."""
        return batches % self.every_n_batches == 0

    def record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = pl_module.trained_model()
        out = generate_texts(model, self.tokenizer, self.prompts, self.sampling, seed=self.seed)
        rewards = [float(r) for r in self.reward_function(self.prompts, out.texts)]
        self.history.append(
            {"batch": self.batches, "global_step": trainer.global_step, "reward": sum(rewards) / len(rewards)}
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history:
            self.record(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        if self.should_record(self.batches):
            self.record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.history[-1]["batch"] != self.batches:
            self.record(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = state_dict["batches"]
        self.history = list(state_dict["history"])
