"""Numbers for lightning_rlhf.ops: hand-worked cases (arithmetic in the docstrings) and naive float64
references written as explicit Python loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_rlhf.ops import (
    KL_ESTIMATORS,
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)
from tests.gloo import run_on_two_gloo_ranks

LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1 if t < n else 0 for t in range(width)] for n in lengths], dtype=torch.bool)


# ----------------------------------------------------------------------------------------------- references


def _ref_log_softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(math.fsum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def _ref_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    b, t, _ = logits.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            y = int(labels[i, j])
            if y >= 0:
                out[i, j] = _ref_log_softmax_row(logits[i, j].double().tolist())[y]
    return out


def _ref_token_logprobs_grad(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """d/dx_v Σ w · log p_y = w (1[v = y] − p_v); 0 for ignored labels."""
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    b, t, v = logits.shape
    for i in range(b):
        for j in range(t):
            y = int(labels[i, j])
            if y < 0:
                continue
            logp = _ref_log_softmax_row(logits[i, j].double().tolist())
            for k in range(v):
                grad[i, j, k] = float(weight[i, j]) * ((k == y) - math.exp(logp[k]))
    return grad


def _ref_entropy_and_grad(logits: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = −Σ p log p and d(Σ w H)/dx_k = −w p_k (log p_k + H)."""
    b, t, v = logits.shape
    entropy = torch.zeros(b, t, dtype=torch.float64)
    grad = torch.zeros(b, t, v, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            logp = _ref_log_softmax_row(logits[i, j].double().tolist())
            h = -math.fsum(math.exp(lp) * lp for lp in logp)
            entropy[i, j] = h
            for k in range(v):
                grad[i, j, k] = -float(weight[i, j]) * math.exp(logp[k]) * (logp[k] + h)
    return entropy, grad


def _ref_selected(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(x) for x, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]


def _ref_mean_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> tuple[float, float]:
    xs = _ref_selected(values, mask)
    if not xs:
        return 0.0, 0.0
    mean = math.fsum(xs) / len(xs)
    denominator = max(len(xs) - 1 if unbiased else len(xs), 1)
    return mean, math.fsum((x - mean) ** 2 for x in xs) / denominator


def _ref_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float = 1e-8
) -> torch.Tensor:
    mean, var = _ref_mean_var(values, mask)
    out = torch.zeros(values.shape, dtype=torch.float64)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if mask[i, j]:
                out[i, j] = (float(values[i, j]) - mean) / math.sqrt(var + eps) + (
                    0.0 if shift_mean else mean
                )
    return out


def _ref_gae(
    rewards: torch.Tensor, values: torch.Tensor, lengths: list[int], gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook GAE per episode of length n: V after the last token is 0, nothing beyond n counts."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            running = delta + gamma * lam * running
            adv[i, t] = running
            ret[i, t] = running + float(values[i, t])
    return adv, ret


# ------------------------------------------------------------------------------------------ token_logprobs


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_token_logprobs_hand_worked(dtype: torch.dtype) -> None:
    """Row [0, ln 2, ln 5]: Σ e^x = 1 + 2 + 5 = 8, so log p = [−ln 8, ln 2 − ln 8 = −2 ln 2, ln 5 − ln 8].

    Label 1 → −2 ln 2 ≈ −1.3863; label 2 → ln(5/8) ≈ −0.4700; label −100 (ignored) → 0.
    Row [0, 0, 0], label 0 → −ln 3 ≈ −1.0986.
    Gradient of log p_1 on row one: onehot − p = [−1/8, 1 − 2/8, −5/8] = [−0.125, 0.75, −0.625].
    """
    row = [0.0, LN2, LN5]
    logits = torch.tensor([[row, row, row, [0.0, 0.0, 0.0]]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 0]])
    out = token_logprobs(logits, labels)
    expected = torch.tensor([[-2 * LN2, LN5 - 3 * LN2, 0.0, -LN3]], dtype=torch.float64)
    # bf16 stores ln 2 and ln 5 to 3 significant digits: the error is the input rounding, not the math.
    tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    out[0, 0].backward()
    grad = torch.tensor([-0.125, 0.75, -0.625], dtype=torch.float64)
    torch.testing.assert_close(logits.grad[0, 0].double(), grad, atol=tol, rtol=0)
    assert torch.count_nonzero(logits.grad[0, 1:]) == 0


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_token_logprobs_matches_float64_reference(dtype: torch.dtype) -> None:
    full = _randn(3, 5, 11, seed=0, scale=3.0)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    labels[1, :] = -100  # a row with no response tokens
    labels[2, 3:] = -100
    logits = full.to(dtype)
    out = token_logprobs(logits, labels, chunk_size=4)
    assert out.shape == labels.shape and torch.isfinite(out).all()
    # Against the exact values the low-precision tensor holds, the float32 math is tight ...
    torch.testing.assert_close(out.double(), _ref_token_logprobs(logits, labels), atol=1e-5, rtol=0)
    assert torch.all(out[1] == 0)
    # ... and against the unrounded float64 logits the gap is the input rounding (bf16: 2^-8 relative).
    atol = {torch.bfloat16: 0.1, torch.float16: 0.01}.get(dtype, 1e-5)
    torch.testing.assert_close(out.double(), _ref_token_logprobs(full, labels), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_token_logprobs_chunk_size_does_not_change_results(dtype: torch.dtype) -> None:
    logits = _randn(4, 6, 13, seed=2, scale=2.0).to(dtype)
    labels = torch.randint(-1, 13, (4, 6), generator=torch.Generator().manual_seed(3))
    weight = _randn(4, 6, seed=4)
    results = []
    for chunk_size in (1, 5, 24, 10_000):
        leaf = logits.clone().requires_grad_(True)
        out = token_logprobs(leaf, labels, chunk_size=chunk_size)
        (out * weight.float()).sum().backward()
        results.append((out.detach(), leaf.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_token_logprobs_gradient_matches_float64_reference(dtype: torch.dtype) -> None:
    logits = _randn(2, 4, 9, seed=5, scale=2.0).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(6))
    labels[0, 1] = -100
    weight = _randn(2, 4, seed=7)
    (token_logprobs(logits, labels, chunk_size=3) * weight.to(torch.float64)).sum().backward()
    assert logits.grad.dtype == dtype
    expected = _ref_token_logprobs_grad(logits.detach(), labels, weight)
    atol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 2e-2)
    torch.testing.assert_close(logits.grad.double(), expected, atol=atol, rtol=0)


class _LargestFloat32Tensor(TorchDispatchMode):
    """Records the element count of the largest float32 tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float32:
                self.largest = max(self.largest, leaf.numel())
        return out


@pytest.mark.parametrize("fn", [token_logprobs, entropy_from_logits], ids=["token_logprobs", "entropy"])
def test_low_precision_logits_never_get_a_full_float32_copy(fn) -> None:
    """64 rows × V=50, chunk 8: no float32 tensor beyond 8 × 50 = 400 elements, forward or backward."""
    rows, vocab, chunk = 64, 50, 8
    labels = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(8))

    def run(logits: torch.Tensor) -> int:
        leaf = logits.clone().requires_grad_(True)
        with _LargestFloat32Tensor() as probe:
            args = (leaf, labels) if fn is token_logprobs else (leaf,)
            fn(*args, chunk_size=chunk).sum().backward()
        return probe.largest

    logits = _randn(4, 16, vocab, seed=9).to(torch.bfloat16)
    assert run(logits) <= chunk * vocab
    assert run(logits.float()) >= rows * vocab  # the probe does see the ops (float32 works unchunked)


def test_token_logprobs_rejects_mismatched_shapes_and_bad_chunks() -> None:
    with pytest.raises(ValueError, match=r"labels \(2, 3\)"):
        token_logprobs(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(
            torch.zeros(2, 5, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long), chunk_size=0
        )


# ------------------------------------------------------------------------------------- entropy_from_logits


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_entropy_hand_worked(dtype: torch.dtype) -> None:
    """[0, 0, 0, 0]: uniform over 4 → H = ln 4 ≈ 1.3863, gradient −p (log p + H) = −¼(−ln 4 + ln 4) = 0.

    [0, ln 3, −inf, −inf]: p = [¼, ¾, 0, 0] (masked vocabulary counts 0 · log 0 = 0),
    H = −(¼ ln ¼ + ¾ ln ¾) = ln 4 − ¾ ln 3 ≈ 1.3863 − 0.8240 = 0.5623; the gradient stays finite.
    """
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -inf, -inf]], dtype=dtype, requires_grad=True)
    out = entropy_from_logits(logits)
    tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2
    expected = torch.tensor([2 * LN2, 2 * LN2 - 0.75 * LN3], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0] == 0) and torch.all(logits.grad[1, 2:] == 0)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_entropy_matches_float64_reference_value_and_gradient(dtype: torch.dtype) -> None:
    full = _randn(3, 4, 10, seed=10, scale=3.0)
    logits = full.to(dtype).requires_grad_(True)
    weight = _randn(3, 4, seed=11)
    out = entropy_from_logits(logits, chunk_size=5)
    (out * weight.to(out.dtype)).sum().backward()
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_h, ref_grad = _ref_entropy_and_grad(logits.detach(), weight)
    torch.testing.assert_close(out.double(), ref_h, atol=1e-5, rtol=0)
    grad_atol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(logits.grad.double(), ref_grad, atol=grad_atol, rtol=0)
    unrounded_atol = {torch.bfloat16: 0.05, torch.float16: 0.01}.get(dtype, 1e-5)
    torch.testing.assert_close(
        out.double(), _ref_entropy_and_grad(full, weight)[0], atol=unrounded_atol, rtol=0
    )


def test_entropy_chunk_size_does_not_change_results() -> None:
    logits = _randn(5, 7, 12, seed=12).to(torch.bfloat16)
    results = []
    for chunk_size in (1, 4, 10_000):
        leaf = logits.clone().requires_grad_(True)
        out = entropy_from_logits(leaf, chunk_size=chunk_size)
        out.sum().backward()
        results.append((out.detach(), leaf.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


# --------------------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_hand_worked() -> None:
    """[−1, −2, −3] over mask [1, 1, 0] → sum −3, mean −3/2; an empty mask → 0 and 0;
    [−0.5, −0.25, −7] over [1, 1, 1] → sum −7.75, mean −7.75/3 ≈ −2.5833. NaN padding is ignored."""
    logps = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5], [-0.5, -0.25, -7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_logprobs(logps, mask), torch.tensor([-3.0, 0.0, -7.75]))
    torch.testing.assert_close(
        sequence_logprobs(logps, mask, average=True), torch.tensor([-1.5, 0.0, -7.75 / 3])
    )


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_float64_reference(dtype: torch.dtype, average: bool) -> None:
    logps = -_randn(4, 9, seed=13).abs().to(dtype)
    lengths = [0, 1, 9, 5]
    mask = _right_padded_mask(lengths, 9)
    out = sequence_logprobs(logps, mask, average=average)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    expected = []
    for i, n in enumerate(lengths):
        total = math.fsum(float(logps[i, t]) for t in range(n))
        expected.append(total / max(n, 1) if average else total)
    torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- masked stats


def test_masked_mean_and_sum_hand_worked() -> None:
    """values [[1, 2, NaN], [4, 5, 6]], mask [[1, 1, 0], [0, 0, 0]]:
    sum 1 + 2 = 3, mean 3/2 = 1.5; per row means [1.5, 0] (empty row → 0); NaN padding is never read."""
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_sum(values, mask).item() == 3.0
    assert masked_mean(values, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_sum(values, mask, dim=1), torch.tensor([3.0, 0.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    # Outside torch.distributed all_reduce is a no-op; with a dim it is a mistake, said so.
    assert masked_mean(values, mask, all_reduce=True).item() == 1.5
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(values, mask, dim=-1, all_reduce=True)


def test_masked_var_hand_worked() -> None:
    """[2, 4, 6] (one padded 100): μ = 4, Σ(x − μ)² = 4 + 0 + 4 = 8 → unbiased 8/2 = 4, biased 8/3.
    One selected value: Σ(x − μ)² = 0 → 0 either way (no 0/0). No selected value → 0."""
    values = torch.tensor([2.0, 4.0, 6.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_var(values, mask).item() == pytest.approx(4.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(8 / 3)
    assert masked_var(values, torch.tensor([0, 1, 0, 0])).item() == 0.0
    assert masked_var(values, torch.tensor([0, 1, 0, 0]), unbiased=False).item() == 0.0
    assert masked_var(values, torch.zeros(4)).item() == 0.0


def test_masked_whiten_hand_worked() -> None:
    """[2, 4, 6] (padded 100): μ = 4, σ² = 4 (unbiased), so (x − 4)/2 = [−1, 0, 1] and the pad → 0.
    shift_mean=False adds μ back: [−1 + 4, 0 + 4, 1 + 4] = [3, 4, 5], pad still 0.
    An empty mask gives zeros, not NaN."""
    values = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]])
    )
    empty = masked_whiten(values, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros_like(values))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_masked_stats_match_float64_reference(dtype: torch.dtype) -> None:
    full = _randn(5, 8, seed=14, scale=2.0) + 3.0
    values = full.to(dtype)
    mask = _right_padded_mask([0, 8, 3, 1, 6], 8)
    mean, var = _ref_mean_var(values, mask)
    _, var_biased = _ref_mean_var(values, mask, unbiased=False)
    # Results come back in the input dtype: allow that dtype's rounding of numbers around 3–10.
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    assert masked_mean(values, mask).dtype == dtype
    assert masked_mean(values, mask).item() == pytest.approx(mean, abs=atol)
    assert masked_var(values, mask).item() == pytest.approx(var, abs=atol)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(var_biased, abs=atol)
    row_means = [
        (math.fsum(_ref_selected(values[i], mask[i])) / max(int(mask[i].sum()), 1)) for i in range(5)
    ]
    torch.testing.assert_close(
        masked_mean(values, mask, dim=1).double(),
        torch.tensor(row_means, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )
    for shift_mean in (True, False):
        out = masked_whiten(values, mask, shift_mean=shift_mean)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), _ref_whiten(values, mask, shift_mean), atol=atol, rtol=0)


def test_masked_whiten_gives_zero_mean_unit_variance_over_the_mask() -> None:
    values = _randn(6, 20, seed=15, scale=7.0) - 40.0
    mask = _right_padded_mask([20, 0, 13, 1, 7, 19], 20)
    out = masked_whiten(values, mask)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.all(out[~mask] == 0)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(values, mask).item(), abs=1e-10)
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-8)


def test_masked_var_is_two_pass_stable_far_from_zero() -> None:
    """float32 values 1e4 + N(0, 0.01²): E[x²] − E[x]² would cancel to noise at 1e8 · 2^-24 ≈ 6;
    the float64 two-pass variance matches the reference."""
    values = (_randn(1, 1000, seed=16, scale=0.01) + 1e4).float()
    mask = torch.ones_like(values, dtype=torch.bool)
    assert masked_var(values, mask).item() == pytest.approx(_ref_mean_var(values, mask)[1], rel=1e-5)


# ---------------------------------------------------------------------------------------------------- gae


def test_gae_hand_worked() -> None:
    """γ = 0.9, λ = 0.8 (γλ = 0.72).

    Row 1, r = [0, 0, 1], V = [0.5, 0.4, 0.3], all three tokens real (V after the last = 0):
      δ₂ = 1 − 0.3 = 0.7                          A₂ = 0.7
      δ₁ = 0 + 0.9·0.3 − 0.4 = −0.13              A₁ = −0.13 + 0.72·0.7 = 0.374
      δ₀ = 0 + 0.9·0.4 − 0.5 = −0.14              A₀ = −0.14 + 0.72·0.374 = 0.12928
      returns = A + V = [0.62928, 0.774, 1.0]
    Row 2, r = [0, 2, 99], V = [1, 1, 99], mask [1, 1, 0] (the 99s are padding):
      δ₁ = 2 − 1 = 1, A₁ = 1;  δ₀ = 0.9·1 − 1 = −0.1, A₀ = −0.1 + 0.72·1 = 0.62; returns [1.62, 2, 0]
    Row 3, no response tokens: all zeros.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0], [5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 1.0, 99.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.12928, 0.374, 0.7], [0.62, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.62928, 0.774, 1.0], [1.62, 2.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_gae_matches_float64_reference(dtype: torch.dtype) -> None:
    lengths = [0, 1, 12, 7, 3]
    rewards = _randn(5, 12, seed=17).to(dtype)
    values = _randn(5, 12, seed=18).to(dtype)
    mask = _right_padded_mask(lengths, 12)
    rewards[~mask] = float("nan")  # padding must never leak in
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    assert adv.dtype == ret.dtype == torch.promote_types(dtype, torch.float32)
    ref_adv, ref_ret = _ref_gae(rewards, values, lengths, 0.95, 0.9)
    # Inputs are compared at the exact values the dtype holds; the recursion itself runs in ≥ float32.
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gae_property_matches_reference(lengths: list[int], gamma: float, lam: float, seed: int) -> None:
    rewards = _randn(len(lengths), 6, seed=seed)
    values = _randn(len(lengths), 6, seed=seed + 1)
    adv, ret = gae(rewards, values, _right_padded_mask(lengths, 6), gamma=gamma, lam=lam)
    ref_adv, ref_ret = _ref_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ret, ref_ret, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_worked() -> None:
    """Policy ½, reference ¼: log π − log π_ref = ln 2, log r = −ln 2, r = ½.
      k1 = ln 2 ≈ 0.6931;  k2 = ½ ln² 2 ≈ 0.2402;  k3 = (½ − 1) + ln 2 ≈ 0.1931.
    Policy ¼, reference ½: log r = ln 2, r = 2.
      k1 = −ln 2;  k2 = ½ ln² 2;  k3 = (2 − 1) − ln 2 ≈ 0.3069.
    Equal log-probs: all three 0."""
    logp = torch.tensor([math.log(0.5), math.log(0.25), -1.7], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), math.log(0.5), -1.7], dtype=torch.float64)
    k1 = torch.tensor([LN2, -LN2, 0.0], dtype=torch.float64)
    k2 = torch.tensor([0.5 * LN2**2, 0.5 * LN2**2, 0.0], dtype=torch.float64)
    k3 = torch.tensor([LN2 - 0.5, 1 - LN2, 0.0], dtype=torch.float64)
    for name, expected in (("k1", k1), ("k2", k2), ("k3", k3)):
        torch.testing.assert_close(kl_estimate(logp, ref, name), expected, atol=1e-15, rtol=0)
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_kl_estimators_match_float64_reference(dtype: torch.dtype) -> None:
    logp = (-_randn(3, 7, seed=19).abs()).to(dtype)
    ref = (-_randn(3, 7, seed=20).abs() * 2).to(dtype)
    reference = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    for name, fn in reference.items():
        out = kl_estimate(logp, ref, name)
        assert out.dtype == dtype and torch.isfinite(out).all()
        expected = [
            [fn(float(a), float(b)) for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(logp, ref, strict=True)
        ]
        torch.testing.assert_close(
            out.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0
        )


def test_k1_and_k3_are_unbiased_in_exact_expectation() -> None:
    """E_{y∼π}[k1] = E_{y∼π}[k3] = KL(π‖π_ref) = Σ π log(π/π_ref), summed exactly over a 7-way vocabulary."""
    logp = _randn(7, seed=21).log_softmax(0)
    ref = _randn(7, seed=22).log_softmax(0)
    p = logp.exp()
    kl = math.fsum(float(p[i]) * (float(logp[i]) - float(ref[i])) for i in range(7))
    for name in ("k1", "k3"):
        assert float((p * kl_estimate(logp, ref, name)).sum()) == pytest.approx(kl, abs=1e-12)
    assert torch.all(kl_k3(logp, ref) >= 0) and torch.all(kl_k2(logp, ref) >= 0)


def test_k3_clamps_the_log_ratio_instead_of_overflowing() -> None:
    """log r = 1000 would be e^1000 = inf; clamped to 20 it is e^20 − 1 − 20 ≈ 4.85e8, finite."""
    logp = torch.tensor([-1000.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -1000.0])
    out = kl_k3(logp, ref)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    assert out[1].item() == pytest.approx(math.exp(-20) + 19, rel=1e-6)
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_estimate_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'k4'.*\['k1', 'k2', 'k3'\]"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- all_reduce over 2 ranks

_SPLIT_ROWS = 2  # rank 0 gets rows [0, 2), rank 1 rows [2, 5): unequal rows and unequal mask counts


def _split_batch() -> tuple[torch.Tensor, torch.Tensor]:
    values = _randn(5, 8, seed=23, scale=3.0) + 2.0
    return values, _right_padded_mask([8, 0, 3, 5, 1], 8)  # 8 selected on rank 0, 9 on rank 1


def _stats(values: torch.Tensor, mask: torch.Tensor, all_reduce: bool) -> dict[str, torch.Tensor]:
    return {
        "mean": masked_mean(values, mask, all_reduce=all_reduce),
        "var": masked_var(values, mask, all_reduce=all_reduce),
        "var_biased": masked_var(values, mask, unbiased=False, all_reduce=all_reduce),
        "whiten": masked_whiten(values, mask, all_reduce=all_reduce),
        "whiten_keep_mean": masked_whiten(values, mask, shift_mean=False, all_reduce=all_reduce),
    }


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        values, mask = _split_batch()
        rows = slice(0, _SPLIT_ROWS) if rank == 0 else slice(_SPLIT_ROWS, None)
        local_values = values[rows].clone().requires_grad_(True)
        stats = _stats(local_values, mask[rows], all_reduce=True)
        # Gradients flow through this rank's share: d mean / d x_i = m_i / N_global.
        stats["mean"].backward()
        stats["mean_grad"] = local_values.grad
        torch.save({k: v.detach() for k, v in stats.items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_on_two_gloo_ranks_equals_single_process(tmp_path: Path) -> None:
    run_on_two_gloo_ranks(_distributed_worker, tmp_path)

    values, mask = _split_batch()
    whole = _stats(values, mask, all_reduce=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("mean", "var", "var_biased"):
        for result in ranks:
            torch.testing.assert_close(result[name], whole[name], atol=1e-6, rtol=0)
    for name in ("whiten", "whiten_keep_mean"):
        joined = torch.cat([ranks[0][name], ranks[1][name]])
        torch.testing.assert_close(joined, whole[name], atol=1e-6, rtol=0)
    mean_grad = torch.cat([ranks[0]["mean_grad"], ranks[1]["mean_grad"]])
    torch.testing.assert_close(mean_grad, mask.double() / mask.sum(), atol=1e-12, rtol=0)
