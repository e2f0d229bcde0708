"""Advantage estimators: PPO's GAE with a critic, and the critic-free, group-based ones.

Pure functions first (shapes in the docstrings, tested against hand-worked numbers and float64 loops), then
the small typed objects a config names by ``class_path`` in ``PPOModule(advantage=...)``:

* :class:`GAE`: today's PPO (needs the critic; ``gamma`` / ``lam`` are the module's).
* :class:`GRPO`: each response's return against its group's mean, divided by the group's std
  (``scale_rewards=False``: not divided, Dr. GRPO; Shao et al. 2024, Liu et al. 2025).
* :class:`RLOO`: against the mean of the *other* responses to the same prompt (Ahmadian et al. 2024).
* :class:`REINFORCEPlusPlus`: discounted token returns whitened over the whole rollout batch, across ranks
  (Hu 2025); ``baseline=True`` first subtracts the group's mean score (OpenRLHF's ``reinforce_baseline``).

A *group* is the ``num_generations`` responses to one prompt; they are consecutive rows of a rollout and
never span ranks (each rank repeats its own prompts), so group statistics need no communication. The
sequence return of a response is the sum of its token rewards: its score minus ``kl_coef`` times its summed
per-token KL (the KL stays a reward penalty, as in PPO), so ``kl_coef: 0`` gives the plain score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.ops import gae, masked_whiten


def grouped(values: Tensor, group_size: int) -> Tensor:
    """[N] → [N / group_size, group_size]; ``N`` must be a multiple of ``group_size``."""
    if group_size < 1 or values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} responses do not split into groups of {group_size}")
    return values.reshape(-1, group_size)


def grpo_advantages(
    returns: Tensor, group_size: int, *, scale_rewards: bool = True, eps: float = 1e-4
) -> Tensor:
    """GRPO: ``A_i = (R_i − mean_g R) / (std_g R + eps)`` (``scale_rewards=False``: no division).

    ``std`` is the sample standard deviation (n − 1), as TRL's GRPOTrainer. A group whose returns are all
    equal gets advantage 0 (nothing to learn from it). Shapes: [N] → [N], float32 or wider.
    """
    r = grouped(returns.to(torch.promote_types(returns.dtype, torch.float32)), group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """RLOO: ``A_i = R_i − (Σ_{j≠i} R_j) / (G − 1)`` = ``G / (G − 1) · (R_i − mean_g R)``. Needs G ≥ 2.

    Shapes: [N] → [N], float32 or wider.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 responses per prompt (num_generations={group_size})")
    r = grouped(returns.to(torch.promote_types(returns.dtype, torch.float32)), group_size)
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go per token, ``G_t = r_t + γ G_{t+1}`` over the response (0 outside the mask).

    Shapes: ``rewards``, ``mask`` [N, T] (right-padded) → [N, T], float32 or wider.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    keep = mask != 0
    r = torch.where(keep, rewards.to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = (r[:, t] + gamma * running) * keep[:, t]
        out[:, t] = running
    return out


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """One advantage per response [N] → the same value at each of its tokens [N, T] (0 outside the mask)."""
    return advantages[:, None].to(torch.float32) * (mask != 0)


def reinforce_plus_plus_advantages(
    rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, all_reduce: bool = True
) -> Tensor:
    """REINFORCE++: token returns-to-go, whitened over every response token of the batch (all ranks).

    Shapes: [N, T] → [N, T]. ``all_reduce`` takes the mean and variance over all ranks' tokens (a no-op in
    a single process), so 2 ranks give the single-process result on the concatenated batch.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask.to(returns.dtype), all_reduce=all_reduce)


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """Sum of each response's token rewards [N, T] → [N] (its score minus the KL penalty)."""
    return torch.where(mask != 0, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)).sum(1)


# ------------------------------------------------------------------------------------- the config objects
class AdvantageEstimator:
    """Base of the estimators ``PPOModule(advantage=...)`` takes by ``class_path``."""

    def __init__(self) -> None:  # an explicit signature: object_spec records the init arguments (none)
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "min_group_size")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    #: Whether PPOModule builds, trains and checkpoints a critic (value model) for this estimator.
    needs_critic: bool = False
    #: Fewest responses per prompt (``num_generations``) the estimator can use.
    min_group_size: int = 1

    def __call__(
        self,
        *,
        rewards: Tensor,
        values: Tensor | None,
        mask: Tensor,
        scores: Tensor,
        group_size: int,
        gamma: float,
        lam: float,
    ) -> tuple[Tensor, Tensor]:
        """``(advantages, returns)`` [N, T] from token rewards [N, T] (KL penalty + score on the last token),
        values [N, T] (None without a critic), mask [N, T] and per-response scores [N]."""
        raise NotImplementedError


class GAE(AdvantageEstimator):
    """PPO's generalised advantage estimation with the critic (``gamma`` and ``lam`` are PPOModule's)."""

    needs_critic = True

    def __call__(self, *, rewards, values, mask, scores, group_size, gamma, lam):
        return gae(rewards, values, mask, gamma=gamma, lam=lam)


class GRPO(AdvantageEstimator):
    """Group-normalised returns (GRPO); ``scale_rewards=False`` is Dr. GRPO (centred, not divided by std)."""

    min_group_size = 2

    def __init__(self, scale_rewards: bool = True, eps: float = 1e-4) -> None:
        """
        Args:
            scale_rewards: Divide by the group's standard deviation (false: Dr. GRPO).
            eps: Added to that standard deviation.
        """
        if not eps > 0:
            raise ValueError(f"GRPO: eps must be > 0 (got {eps})")
        self.scale_rewards, self.eps = bool(scale_rewards), float(eps)

    def __call__(self, *, rewards, values, mask, scores, group_size, gamma, lam):
        seq = grpo_advantages(
            sequence_returns(rewards, mask), group_size, scale_rewards=self.scale_rewards, eps=self.eps
        )
        advantages = sequence_to_tokens(seq, mask)
        return advantages, advantages


class RLOO(AdvantageEstimator):
    """Leave-one-out baseline: each response against the mean of the others to its prompt (RLOO)."""

    min_group_size = 2

    def __call__(self, *, rewards, values, mask, scores, group_size, gamma, lam):
        advantages = sequence_to_tokens(rloo_advantages(sequence_returns(rewards, mask), group_size), mask)
        return advantages, advantages


class REINFORCEPlusPlus(AdvantageEstimator):
    """REINFORCE++: KL in the token rewards, returns-to-go (PPOModule's ``gamma``), global batch whitening."""

    def __init__(self, baseline: bool = False) -> None:
        """
        Args:
            baseline: First subtract each group's mean score (needs num_generations >= 2).
        """
        self.baseline = bool(baseline)
        self.min_group_size = 2 if self.baseline else 1

    def __call__(self, *, rewards, values, mask, scores, group_size, gamma, lam):
        if self.baseline:
            if group_size < 2:
                raise ValueError("REINFORCEPlusPlus(baseline=true) needs num_generations >= 2")
            g = grouped(scores.to(rewards.dtype), group_size)
            offset = (g.mean(dim=1, keepdim=True).expand_as(g)).reshape(-1)
            last = (mask.sum(1).long() - 1).clamp(min=0)
            rewards = rewards.clone()
            rows = torch.arange(len(last), device=rewards.device)
            rewards[rows, last] -= torch.where(mask.sum(1) > 0, offset, torch.zeros_like(offset))
        advantages = reinforce_plus_plus_advantages(rewards, mask, gamma=gamma)
        return advantages, advantages
