"""Pure tensor math shared by the losses, the modules and the rollout code.

Conventions: ``mask`` tensors are 0/1 (bool or float) and select the positions that count; a row or batch
with no selected position reduces to 0, never NaN. Positions outside the mask may hold anything (padding,
even inf/NaN): they are selected away with ``torch.where`` rather than multiplied by 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "gae",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "sequence_logprobs",
    "token_logprobs",
]

# ---------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ---------------------------------------------------------------------------------------------------------


def _is_low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def _chunks(rows: int, chunk_size: int) -> range:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return range(0, rows, chunk_size)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(label) for low-precision logits [N, V], upcasting ``chunk_size`` rows at a time.

    Autograd through a plain ``.float()`` would keep every float32 chunk alive for the backward pass (the
    logsumexp backward saves its input), i.e. the full float32 copy we set out to avoid. So the backward
    recomputes the softmax chunk by chunk from the saved low-precision logits instead.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        safe = labels.clamp(min=0)
        for start in _chunks(logits.shape[0], chunk_size):
            x = logits[start : start + chunk_size].float()
            picked = x.gather(1, safe[start : start + chunk_size, None]).squeeze(1)
            out[start : start + chunk_size] = picked - x.logsumexp(1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk_size = chunk_size
        return out.masked_fill_(labels < 0, 0.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_out.float().masked_fill(labels < 0, 0.0)
        safe = labels.clamp(min=0)
        for start in _chunks(logits.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            # d log p_y / d x_v = 1[v = y] - p_v
            chunk_grad = logits[sl].float().softmax(1).mul_(-g[sl, None])
            chunk_grad.scatter_add_(1, safe[sl, None], g[sl, None])
            grad[sl] = chunk_grad
        return grad, None, None


def token_logprobs(logits: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per-position log-probability of ``labels``: ``log p(y_t) = x_{t,y_t} - logsumexp_v x_{t,v}``.

    Shapes: ``logits`` [..., V], ``labels`` [...] (int64) → [...] (``labels.shape``).

    * float32/float64 logits: gather − logsumexp directly, result in the input dtype.
    * bf16/fp16 logits: rows (the flattened leading dims) are upcast ``chunk_size`` at a time, forward and
      backward, so no float32 copy of the whole [..., V] tensor ever exists; result is float32. Pass
      contiguous logits (shift the labels, not the logits) or ``reshape`` has to copy them.
    * ``labels < 0`` (ignore index, e.g. -100) give 0 there and no gradient.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + [V]"
        )
    if _is_low_precision(logits.dtype):
        rows = logits.reshape(-1, logits.shape[-1])
        return _ChunkedTokenLogprobs.apply(rows, labels.reshape(-1), chunk_size).view(labels.shape)
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)).masked_fill(labels < 0, 0.0)


def _entropy_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, log p, H) for float rows [N, V]; ``p log p`` is taken as 0 where p = 0 (−inf logits)."""
    logp = x.log_softmax(-1)
    p = logp.exp()
    # masked_fill (not where) so a -inf log p also gets a zero gradient, not 0 * inf = NaN.
    logp = logp.masked_fill(p == 0, 0.0)
    return p, logp, -(p * logp).sum(-1)


class _ChunkedEntropy(torch.autograd.Function):
    """Entropy of low-precision logits [N, V], upcasting ``chunk_size`` rows at a time (see above)."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in _chunks(logits.shape[0], chunk_size):
            out[start : start + chunk_size] = _entropy_rows(logits[start : start + chunk_size].float())[2]
        ctx.save_for_backward(logits, out)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in _chunks(logits.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            p, logp, _ = _entropy_rows(logits[sl].float())
            # dH/dx_k = -p_k (log p_k + H)
            grad[sl] = -p * (logp + entropy[sl, None]) * grad_out[sl, None].float()
        return grad, None


def entropy_from_logits(logits: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Entropy of the categorical ``softmax(logits)`` per position: ``H = -Σ_v p_v log p_v``.

    Shapes: ``logits`` [..., V] → [...]. Same memory rule as :func:`token_logprobs`: bf16/fp16 logits are
    upcast ``chunk_size`` rows at a time (forward and backward) and give float32; float32/float64 stay.
    Masked vocabulary entries (logit −inf) contribute 0, with a finite gradient.
    """
    if _is_low_precision(logits.dtype):
        flat = _ChunkedEntropy.apply(logits.reshape(-1, logits.shape[-1]), chunk_size)
        return flat.view(logits.shape[:-1])
    return _entropy_rows(logits)[2]


# ---------------------------------------------------------------------------------------------------------
# Masked reductions and whitening (optionally across data-parallel ranks)
# ---------------------------------------------------------------------------------------------------------


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_sum(local: Tensor, all_reduce: bool) -> Tensor:
    """Σ over ranks of ``local`` (identity when not distributed).

    The other ranks' share enters as a constant (``local + (total − local).detach()``): ``dist.all_reduce``
    is not autograd-aware, and this way gradients still flow through this rank's own values.
    """
    if not (all_reduce and _distributed_active()):
        return local
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return local + (total - local.detach())


def _stat_dtype(values: Tensor) -> torch.dtype:
    # Statistics accumulate in float64; MPS has no float64, so float32 is the best it can do there.
    return torch.float32 if values.device.type == "mps" else torch.float64


def _safe_denominator(count: Tensor) -> Tensor:
    return torch.where(count > 0, count, torch.ones_like(count))


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ_i m_i x_i`` over ``dim`` (everything when None); result in ``values.dtype``.

    Shapes: ``values`` and ``mask`` broadcastable → reduced shape.
    """
    m = mask.to(values.dtype)
    masked = torch.where(mask != 0, values * m, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum() if dim is None else masked.sum(dim)


def _masked_mean64(values: Tensor, mask: Tensor, all_reduce: bool) -> tuple[Tensor, Tensor]:
    """(mean, count) over the whole tensor in float64, summed over ranks when ``all_reduce``."""
    v = values.to(_stat_dtype(values))
    m = mask.to(v.dtype)
    total, count = _global_sum(torch.stack([masked_sum(v, m), m.sum()]), all_reduce).unbind()
    return total / _safe_denominator(count), count


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, *, all_reduce: bool = False) -> Tensor:
    """``Σ m_i x_i / Σ m_i`` over ``dim`` (everything when None); 0 where nothing is selected.

    Accumulated in float64, returned in ``values.dtype``. ``all_reduce=True`` (only with ``dim=None``)
    sums numerator and count over all ranks of the default process group, so a batch split over ranks
    gives the mean of the concatenated batch; it is a no-op outside ``torch.distributed``. Gradients flow
    through this rank's values only (d mean / d x_i = m_i / N_global).
    """
    if dim is None:
        return _masked_mean64(values, mask, all_reduce)[0].to(values.dtype)
    if all_reduce:
        raise ValueError("masked_mean: all_reduce=True needs dim=None; per-row means are already local")
    m = mask.to(_stat_dtype(values))
    mean = masked_sum(values.to(m.dtype), m, dim) / _safe_denominator(m.sum(dim))
    return mean.to(values.dtype)


def _masked_var64(values: Tensor, mask: Tensor, unbiased: bool, all_reduce: bool) -> tuple[Tensor, Tensor]:
    mean, count = _masked_mean64(values, mask, all_reduce)
    # Two passes (mean first, then squared deviations) instead of E[x²] − E[x]²: the latter cancels
    # catastrophically when |mean| ≫ std, e.g. rewards around 100 with spread 0.1.
    m = mask.to(mean.dtype)
    squared_dev = _global_sum(masked_sum((values.to(mean.dtype) - mean) ** 2, m), all_reduce)
    # count ≤ 1: the squared deviations are exactly 0, so any denominator ≥ 1 gives var = 0 (not NaN).
    denominator = _safe_denominator(count - 1 if unbiased else count)
    return mean, squared_dev / denominator


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True, all_reduce: bool = False) -> Tensor:
    """Variance over the masked positions of the whole tensor: ``Σ m_i (x_i − μ)² / (N − 1)`` (or ``/ N``).

    Shapes: ``values``, ``mask`` same shape → scalar in ``values.dtype``; accumulated in float64. Fewer than
    two selected positions give 0 (a single sample carries no spread, so no Bessel-corrected NaN).
    ``all_reduce=True`` computes the mean, the squared deviations from that global mean and the count over
    all ranks, equal to the single-process result on the concatenated batch.
    """
    return _masked_var64(values, mask, unbiased, all_reduce)[1].to(values.dtype)


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: bool = False,
) -> Tensor:
    """Normalise the masked entries: ``(x − μ) / sqrt(σ² + eps)``, with μ, σ² from :func:`masked_var`.

    ``shift_mean=False`` adds μ back, ``(x − μ) / sqrt(σ² + eps) + μ``: the spread is scaled to 1 but the
    mean is kept (TRL's ``whiten(shift_mean=False)``). Shapes: [...] → [...] in ``values.dtype``; 0
    outside the mask, all zeros for an empty mask. ``all_reduce`` as in :func:`masked_var`.
    """
    mean, var = _masked_var64(values, mask, unbiased=True, all_reduce=all_reduce)
    whitened = (values.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device)).to(
        values.dtype
    )


def sequence_logprobs(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """``log π(y|x) = Σ_t m_t log π(y_t | x, y_<t)`` (or its per-token mean with ``average=True``).

    Shapes: ``token_logps`` [B, T], ``mask`` [B, T] → [B], at least float32 (a sum over hundreds of tokens
    in bf16 would lose the differences DPO is made of). A row with no response tokens gives 0.
    """
    values = token_logps.to(torch.promote_types(token_logps.dtype, torch.float32))
    if average:
        return masked_mean(values, mask, dim=-1)
    return masked_sum(values, mask, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), returns ``(advantages, returns)``.

    ``δ_t = r_t + γ m_{t+1} V_{t+1} − V_t`` and ``A_t = δ_t + γλ m_{t+1} A_{t+1}``; the value after the last
    response token is 0 (the episode ends there), and ``returns = A + V``.

    Shapes: ``rewards``, ``values``, ``mask`` [B, T] for right-padded responses → two [B, T] tensors in
    float32 (float64 stays float64), 0 outside the mask. A row with no response tokens is all zeros.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    # Padding may hold anything; select it away so garbage cannot leak into A_t through the recursion.
    r = torch.where(keep, rewards.to(dtype), zero)
    v = torch.where(keep, values.to(dtype), zero)
    m = keep.to(dtype)
    next_value = torch.zeros_like(v[:, 0])
    next_advantage = torch.zeros_like(v[:, 0])
    advantages: list[Tensor] = []
    for t in reversed(range(r.shape[1])):
        next_mask = m[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(m[:, 0])
        delta = r[:, t] + gamma * next_mask * next_value - v[:, t]
        next_advantage = (delta + gamma * lam * next_mask * next_advantage) * m[:, t]
        next_value = v[:, t]
        advantages.append(next_advantage)
    adv = torch.stack(advantages[::-1], dim=1) if advantages else torch.zeros_like(v)
    return adv, (adv + v) * m


# ---------------------------------------------------------------------------------------------------------
# KL estimators (http://joschu.net/blog/kl-approx.html), per token, samples drawn from the policy
# ---------------------------------------------------------------------------------------------------------

KL_LOG_RATIO_CLAMP = 20.0
"""|log r| bound before ``exp`` in k3: e^20 ≈ 5e8 is finite in fp16/bf16 math done in float32."""


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = −log r = log π(y) − log π_ref(y): unbiased for KL(π‖π_ref), high variance, can be negative.

    Shapes: any, broadcastable → broadcast shape.
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log r)²: biased, low variance, always ≥ 0. Shapes: broadcastable → broadcast shape."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r − 1) − log r with ``log r = log π_ref(y) − log π(y)``: unbiased and always ≥ 0.

    ``log r`` is clamped to ±``KL_LOG_RATIO_CLAMP`` before ``exp`` so one token that the reference finds
    wildly likelier cannot overflow to inf; beyond the clamp the value saturates and the gradient is 0.
    Shapes: broadcastable → broadcast shape.
    """
    log_ratio = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: Mapping[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k2", "k3"] = "k1") -> Tensor:
    """Per-token KL(π‖π_ref) estimate by name, one of ``KL_ESTIMATORS``. Shapes: broadcastable."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"kl_estimate: unknown estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logp, ref_logp)
