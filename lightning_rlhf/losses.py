"""Losses for reward modelling, DPO and PPO: pure functions of tensors and small typed callables.

Shapes: ``B`` is the batch (pairs for preference losses, sequences for PPO), ``T`` the response length.
Every loss computes in at least float32 (bf16/fp16 inputs are upcast, float64 stays float64) and returns
the loss together with *detached* metrics in a NamedTuple, so a module only has to log them.
A DPO variant is picked by class (``class_path`` in YAML), never by a ``loss_type`` string.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlhf.ops import masked_mean
from lightning_rlhf.validation import check

# exp(20) ~ 4.9e8 is finite in float32 and far outside any clip range, so clamping the log-ratio to this
# range changes no clipped loss value; it only stops one stale token from turning the batch into inf/NaN.
MAX_LOG_RATIO = 20.0

__all__ = [
    "DPOLoss",
    "DPOLossOutput",
    "HingeDPOLoss",
    "IPOLoss",
    "PolicyLossOutput",
    "RewardLossOutput",
    "RobustDPOLoss",
    "SigmoidDPOLoss",
    "BradleyTerryLoss",
    "ValueLossOutput",
    "bradley_terry_loss",
    "entropy_bonus",
    "ppo_policy_loss",
    "ppo_value_loss",
]


def _upcast(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (so gradcheck in float64 stays exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_label_smoothing(label_smoothing: float, owner: str = "loss") -> None:
    check(owner, "label_smoothing", label_smoothing, ge=0, lt=0.5)


# --------------------------------------------------------------------------------------------------- DPO


class DPOLossOutput(NamedTuple):
    """``loss`` is the scalar to backpropagate; the rest are detached ``[B]`` metrics."""

    loss: Tensor
    losses: Tensor  # [B] per-pair preference loss, without the NLL term
    chosen_rewards: Tensor  # [B] beta * (pi_c - ref_c), the implicit reward of the chosen response
    rejected_rewards: Tensor  # [B] beta * (pi_r - ref_r)


class DPOLoss(abc.ABC):
    """Preference loss on the log-ratio margin h = (pi_c - pi_r) - (ref_c - ref_r), all of shape ``[B]``.

    Subclasses implement only :meth:`pair_loss` of h. The total loss is
    ``mean(pair_loss(h)) + nll_weight * mean(chosen_nll)`` (the NLL term is RPO, Pang et al. 2024).

    Args:
        beta: Inverse temperature of the implicit reward beta * log(pi / ref); must be > 0.
        nll_weight: Weight of the NLL of the chosen response added to the loss (RPO); 0 disables it.
        reference_free: Treat reference log-probs as 0 (no reference model); passing them is then an error.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 0.0, reference_free: bool = False) -> None:
        owner = type(self).__name__
        check(owner, "beta", beta, gt=0)
        check(owner, "nll_weight", nll_weight, ge=0)
        self.beta = beta
        self.nll_weight = nll_weight
        self.reference_free = reference_free

    @abc.abstractmethod
    def pair_loss(self, h: Tensor) -> Tensor:
        """Per-pair loss ``[B]`` of the log-ratio margin ``h`` ``[B]`` (already float32 or wider)."""

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None = None,
        reference_rejected_logps: Tensor | None = None,
        *,
        chosen_nll: Tensor | None = None,
    ) -> DPOLossOutput:
        """Sequence log-probs ``[B]`` in; ``chosen_nll`` ``[B]`` is the mean-per-token NLL of the chosen
        response (only read when ``nll_weight > 0``)."""
        pi_c, pi_r = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
        has_ref = (reference_chosen_logps is not None, reference_rejected_logps is not None)
        if self.reference_free:
            if any(has_ref):
                raise ValueError(
                    "reference_free=True but reference log-probs were passed; drop them (and the reference "
                    "model forward) or set reference_free=False"
                )
            ref_c, ref_r = torch.zeros_like(pi_c), torch.zeros_like(pi_r)
        elif not all(has_ref):
            raise ValueError(
                "reference_chosen_logps and reference_rejected_logps are required; pass the reference "
                "model's log-probs or set reference_free=True"
            )
        else:
            ref_c, ref_r = _upcast(reference_chosen_logps), _upcast(reference_rejected_logps)
        h = (pi_c - pi_r) - (ref_c - ref_r)
        losses = self.pair_loss(h)
        loss = losses.mean()
        if self.nll_weight > 0:
            if chosen_nll is None:
                raise ValueError(
                    f"nll_weight={self.nll_weight} > 0 needs chosen_nll (the chosen response's NLL)"
                )
            loss = loss + self.nll_weight * _upcast(chosen_nll).mean()
        return DPOLossOutput(
            loss=loss,
            losses=losses.detach(),
            chosen_rewards=(self.beta * (pi_c - ref_c)).detach(),
            rejected_rewards=(self.beta * (pi_r - ref_r)).detach(),
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class SigmoidDPOLoss(DPOLoss):
    """DPO (Rafailov et al. 2023) with optional conservative label smoothing (cDPO, Mitchell 2023):

        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    Args:
        beta: Inverse temperature of the implicit reward; must be > 0.
        label_smoothing: Assumed probability eps that a preference label is flipped, in [0, 0.5).
        nll_weight: Weight of the NLL of the chosen response added to the loss (RPO); 0 disables it.
        reference_free: Treat reference log-probs as 0 (no reference model); passing them is then an error.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        reference_free: bool = False,
    ) -> None:
        super().__init__(beta=beta, nll_weight=nll_weight, reference_free=reference_free)
        _check_label_smoothing(label_smoothing, type(self).__name__)
        self.label_smoothing = label_smoothing

    def pair_loss(self, h: Tensor) -> Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)


class RobustDPOLoss(DPOLoss):
    """Robust DPO (Chowdhury et al. 2024), an unbiased loss under label-flip rate eps:

        loss = (-(1 - eps) * log sigma(beta * h) + eps * log sigma(-beta * h)) / (1 - 2 * eps)

    Args:
        beta: Inverse temperature of the implicit reward; must be > 0.
        label_smoothing: Assumed probability eps that a preference label is flipped, in [0, 0.5).
        nll_weight: Weight of the NLL of the chosen response added to the loss (RPO); 0 disables it.
        reference_free: Treat reference log-probs as 0 (no reference model); passing them is then an error.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        reference_free: bool = False,
    ) -> None:
        super().__init__(beta=beta, nll_weight=nll_weight, reference_free=reference_free)
        _check_label_smoothing(label_smoothing, type(self).__name__)
        self.label_smoothing = label_smoothing

    def pair_loss(self, h: Tensor) -> Tensor:
        eps = self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(self.beta * h) + eps * F.logsigmoid(-self.beta * h)) / (1 - 2 * eps)


class IPOLoss(DPOLoss):
    """IPO (Azar et al. 2023): squared regression of the margin onto 1 / (2 beta):

        loss = (h - 1 / (2 * beta))^2

    IPO is usually fed length-averaged log-probs (mean per token, not sum); that is the caller's choice,
    made where the sequence log-probs are computed.

    Args:
        beta: Regularisation strength tau; the target margin is 1 / (2 beta); must be > 0.
        nll_weight: Weight of the NLL of the chosen response added to the loss (RPO); 0 disables it.
        reference_free: Treat reference log-probs as 0 (no reference model); passing them is then an error.
    """

    def pair_loss(self, h: Tensor) -> Tensor:
        return (h - 1 / (2 * self.beta)) ** 2


class HingeDPOLoss(DPOLoss):
    """SLiC hinge loss (Zhao et al. 2023) on the scaled margin: loss = relu(1 - beta * h).

    Args:
        beta: Scale of the margin; the hinge is flat once h >= 1 / beta; must be > 0.
        nll_weight: Weight of the NLL of the chosen response added to the loss (RPO); 0 disables it.
        reference_free: Treat reference log-probs as 0 (no reference model); passing them is then an error.
    """

    def pair_loss(self, h: Tensor) -> Tensor:
        return F.relu(1 - self.beta * h)


# ------------------------------------------------------------------------------------------ reward model


class RewardLossOutput(NamedTuple):
    """``loss`` is the scalar to backpropagate; the rest are detached scalars."""

    loss: Tensor
    accuracy: Tensor  # mean(r_c > r_r), a tie counts 0.5
    margin_mean: Tensor  # mean(r_c - r_r), without the optional label margin m
    chosen_mean: Tensor
    rejected_mean: Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> RewardLossOutput:
    """Bradley-Terry reward-model loss with an optional margin (Llama 2) and reward centering
    (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``):

        loss = mean(-log sigma(r_c - r_r - m)) + center_coef * mean((r_c + r_r)^2)

    Args:
        chosen_rewards: ``[B]`` scalar rewards r_c of the chosen responses.
        rejected_rewards: ``[B]`` scalar rewards r_r of the rejected responses.
        margin: ``[B]`` required reward gap m (e.g. from a preference strength); None means 0.
        center_coef: Weight of the centering term that pulls r_c + r_r towards 0; must be >= 0.
    """
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    r_c, r_r = _upcast(chosen_rewards), _upcast(rejected_rewards)
    diff = r_c - r_r
    logits = diff if margin is None else diff - _upcast(margin)
    loss = -F.logsigmoid(logits).mean()
    if center_coef > 0:
        loss = loss + center_coef * ((r_c + r_r) ** 2).mean()
    diff = diff.detach()
    accuracy = ((diff > 0).to(diff.dtype) + 0.5 * (diff == 0).to(diff.dtype)).mean()
    return RewardLossOutput(loss, accuracy, diff.mean(), r_c.detach().mean(), r_r.detach().mean())


class BradleyTerryLoss:
    """The Bradley-Terry reward-model loss with its options fixed, to be named by class_path in YAML.

    Args:
        center_coef: Weight of the reward-centering term mean((r_c + r_r)^2); must be >= 0; 0 disables it.
    """

    def __init__(self, center_coef: float = 0.0) -> None:
        check("BradleyTerryLoss", "center_coef", center_coef, ge=0)
        self.center_coef = center_coef

    def __call__(
        self, chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Tensor | None = None
    ) -> RewardLossOutput:
        return bradley_terry_loss(
            chosen_rewards, rejected_rewards, margin=margin, center_coef=self.center_coef
        )

    def __repr__(self) -> str:
        return f"BradleyTerryLoss(center_coef={self.center_coef!r})"


# --------------------------------------------------------------------------------------------------- PPO


class PolicyLossOutput(NamedTuple):
    loss: Tensor
    clip_fraction: Tensor  # detached: share of response tokens where the clipped branch was active
    approx_kl: Tensor  # detached: masked mean of k3 = (r - 1) - log r, KL(old || new) estimate


class ValueLossOutput(NamedTuple):
    loss: Tensor
    clip_fraction: Tensor  # detached: share of response tokens where the clipped value loss was larger


LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "constant_length_sum")


def aggregate_token_losses(
    losses: Tensor, mask: Tensor, aggregation: str = "token_mean", *, max_length: int | None = None
) -> Tensor:
    """One scalar from per-token losses [B, T] over the masked tokens:

    * ``token_mean``: Σ_i Σ_t l_it / Σ_i T_i (every token weighs the same: long responses weigh more);
    * ``sequence_mean``: (1/B) Σ_i (Σ_t l_it / T_i) (every response weighs the same; GRPO's original form);
    * ``constant_length_sum``: (1/B) Σ_i Σ_t l_it / L with a fixed ``max_length`` L (Dr. GRPO: no length
      normalisation bias).

    Masked positions are selected away first; rows with no tokens count as 0 in the sequence forms.
    """
    keep = mask.bool()
    if aggregation == "token_mean":
        return masked_mean(losses, keep)
    per_row = torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum(1)
    if aggregation == "sequence_mean":
        per_row = per_row / keep.sum(1).clamp(min=1).to(per_row.dtype)
    elif aggregation == "constant_length_sum":
        if max_length is None or max_length < 1:
            raise ValueError("constant_length_sum needs max_length >= 1 (the generation length)")
        per_row = per_row / max_length
    else:
        raise ValueError(f"aggregation must be one of {LOSS_AGGREGATIONS} (got {aggregation!r})")
    return per_row.mean() if per_row.numel() else per_row.sum()


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    max_length: int | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017), optionally dual-clipped (Ye et al. 2020):

        r = exp(logp - old),  l = max(-A * r, -A * clip(r, 1 - eps, 1 + eps))
        with dual clip c > 1, for A < 0:  l = min(l, -c * A)
        loss = masked mean of l over every response token of the batch (``aggregation``: see
               :func:`aggregate_token_losses`)

    All inputs are ``[B, T]``; ``mask`` selects response tokens. Masked positions are replaced before any
    arithmetic, so padding may hold anything (even -inf) without producing NaN values or gradients; an
    empty mask gives a loss of 0. The log-ratio is clamped to +-``MAX_LOG_RATIO`` before ``exp``.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probs of the same tokens under the policy that sampled them.
        advantages: ``[B, T]`` advantage estimates A (e.g. whitened GAE).
        mask: ``[B, T]`` 0/1 (or bool) mask of response tokens.
        clip_range: Trust-region half-width eps of the ratio clip; must be > 0.
        dual_clip: Cap c on the loss of negative-advantage tokens, -c * A; must be > 1; None disables it.
        aggregation: ``token_mean`` (default), ``sequence_mean`` or ``constant_length_sum``.
        max_length: The constant L of ``constant_length_sum``.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    keep = mask.bool()
    log_ratio = torch.where(keep, _upcast(logprobs) - _upcast(old_logprobs), 0.0)
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    adv = torch.where(keep, _upcast(advantages), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    losses = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        losses = torch.where(adv < 0, torch.minimum(losses, -dual_clip * adv), losses)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(losses.dtype), keep)
        approx_kl = masked_mean((ratio - 1) - log_ratio, keep)
    loss = aggregate_token_losses(losses, keep, aggregation, max_length=max_length)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range_value: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss (PPO2 / TRL):

        V_clip = V_old + clamp(V - V_old, -c, c)
        loss = 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2)

    Args:
        values: ``[B, T]`` current critic values V (with grad).
        old_values: ``[B, T]`` critic values V_old recorded at rollout time.
        returns: ``[B, T]`` regression targets R (e.g. GAE advantages + V_old).
        mask: ``[B, T]`` 0/1 (or bool) mask of response tokens; an empty mask gives 0.
        clip_range_value: Half-width c of the clip around V_old; must be > 0; None disables clipping.
    """
    if clip_range_value is not None and not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0 (or None), got {clip_range_value}")
    keep = mask.bool()
    v = torch.where(keep, _upcast(values), 0.0)
    ret = torch.where(keep, _upcast(returns), 0.0)
    loss_unclipped = (v - ret) ** 2
    if clip_range_value is None:
        losses = loss_unclipped
        clip_fraction = torch.zeros((), dtype=v.dtype, device=v.device)
    else:
        v_old = torch.where(keep, _upcast(old_values), 0.0)
        v_clipped = v_old + (v - v_old).clamp(-clip_range_value, clip_range_value)
        loss_clipped = (v_clipped - ret) ** 2
        losses = torch.maximum(loss_unclipped, loss_clipped)
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).to(v.dtype), keep).detach()
    return ValueLossOutput(0.5 * masked_mean(losses, keep), clip_fraction)


def entropy_bonus(entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean per-token policy entropy over response tokens (``[B, T]`` each), in float32 or wider.

    The PPO objective subtracts ``entropy_coef * entropy_bonus(...)``; an empty mask gives 0.
    """
    keep = mask.bool()
    return masked_mean(torch.where(keep, _upcast(entropy), 0.0), keep)
