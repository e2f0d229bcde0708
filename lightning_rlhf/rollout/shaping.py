"""Reward shaping for PPO: KL penalty, score clipping and normalization, EOS penalty, KL controllers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rlhf.ops import kl_estimate, masked_sum


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient so that the measured KL tracks ``target``.

    ``value *= 1 + clip((kl - target) / target, -0.2, 0.2) * n_steps / horizon`` after each rollout.
    """

    def __init__(self, value: float, target: float, horizon: int) -> None:
        super().__init__(value)
        if not target > 0 or not horizon > 0:
            raise ValueError(f"adaptive KL needs target_kl > 0 and kl_horizon > 0 (got {target}, {horizon})")
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of scores (Chan et al. parallel update), to normalize them."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, values: Tensor) -> None:
        """Fold in ``values``; under torch.distributed, the values of every rank (so all ranks agree)."""
        values = values.detach().double().flatten()
        stats = torch.stack([values.new_tensor(float(values.numel())), values.sum(), (values**2).sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n = int(stats[0])
        if n == 0:
            return
        batch_mean = float(stats[1]) / n
        batch_var = max(float(stats[2]) / n - batch_mean**2, 0.0)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def value_scale(self, min_var: float = 1e-2) -> tuple[float, float]:
        """(mean, std) for value normalization, the variance floored at ``min_var`` (ReaLHF's value-norm
        floor) so that near-constant returns do not blow the standardised targets up."""
        return self.mean, math.sqrt(max(self.var, min_var))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def shape_scores(
    raw: Tensor,
    ended: Tensor,
    *,
    missing_eos_penalty: float | None,
    clip: float | None,
    moments: RunningMoments | None,
) -> Tensor:
    """Turn raw scores [N] into the scores PPO optimises.

    In order: subtract ``missing_eos_penalty`` from responses that never emitted EOS; if ``moments`` is
    given, update it and standardise by the running mean and std; clip to ``[-clip, clip]``.
    """
    scores = raw.float().clone()
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``r_t = -kl_coef * KL_t`` plus ``score`` on the last response token ([N, R]).

    Returns (rewards, kl). Padding gets 0. A row with no response token has nowhere to put its score and
    gets all zeros. KL_t is the chosen estimator (k1, k2, k3) of policy vs reference at token t.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs.float(), ref_logprobs.float(), estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(1) > 0
    bonus = torch.zeros_like(rewards)
    bonus[torch.arange(len(last), device=last.device), last] = torch.where(has_tokens, scores.float(), 0.0)
    return rewards + bonus, kl


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL [N]: the sum of per-token estimates over the response."""
    return masked_sum(kl, mask, dim=1)
