"""Losses checked against hand-worked numbers and against naive float64 loops on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.losses import (
    MAX_LOG_RATIO,
    BradleyTerryLoss,
    DPOLoss,
    HingeDPOLoss,
    IPOLoss,
    RobustDPOLoss,
    SigmoidDPOLoss,
    bradley_terry_loss,
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
)

F64 = torch.float64


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


def _nls(x: float) -> float:
    """-log sigma(x), written naively."""
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------- naive references


def naive_pair_loss(name: str, h: float, beta: float, eps: float) -> float:
    if name == "sigmoid":
        return (1 - eps) * _nls(beta * h) + eps * _nls(-beta * h)
    if name == "robust":
        return ((1 - eps) * _nls(beta * h) - eps * _nls(-beta * h)) / (1 - 2 * eps)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(name)


def naive_dpo(name, pc, pr, rc, rr, beta, eps, nll_weight=0.0, nll=None):
    losses = [naive_pair_loss(name, (pc[i] - pr[i]) - (rc[i] - rr[i]), beta, eps) for i in range(len(pc))]
    total = sum(losses) / len(losses)
    if nll_weight:
        total += nll_weight * sum(nll) / len(nll)
    return total, losses


def naive_ppo_policy(logp, old, adv, mask, clip, dual):
    """Returns (loss, clip_fraction, approx_kl) with explicit loops over tokens."""
    total = clipped_count = kl = 0.0
    n = 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            n += 1
            r = math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            unclipped, clipped = -a * r, -a * min(max(r, 1 - clip), 1 + clip)
            loss = max(unclipped, clipped)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            total += loss
            clipped_count += clipped > unclipped
            kl += (r - 1) - math.log(r)
    n = max(n, 1)
    return total / n, clipped_count / n, kl / n


def naive_ppo_value(v, v_old, ret, mask, clip):
    total = clipped_count = 0.0
    n = 0
    for b in range(len(v)):
        for t in range(len(v[b])):
            if not mask[b][t]:
                continue
            n += 1
            plain = (v[b][t] - ret[b][t]) ** 2
            if clip is None:
                total += plain
                continue
            v_clip = v_old[b][t] + min(max(v[b][t] - v_old[b][t], -clip), clip)
            other = (v_clip - ret[b][t]) ** 2
            total += max(plain, other)
            clipped_count += other > plain
    n = max(n, 1)
    return 0.5 * total / n, clipped_count / n


def _ppo_inputs(seed: int, B: int = 4, T: int = 7, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # a row with no response tokens
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


DPO_CLASSES = {"sigmoid": SigmoidDPOLoss, "robust": RobustDPOLoss, "ipo": IPOLoss, "hinge": HingeDPOLoss}


def _make(name: str, beta: float, eps: float, **kw) -> DPOLoss:
    if name in ("sigmoid", "robust"):
        return DPO_CLASSES[name](beta=beta, label_smoothing=eps, **kw)
    return DPO_CLASSES[name](beta=beta, **kw)


# ------------------------------------------------------------------------------------------- DPO: numbers


def test_sigmoid_dpo_hand_worked():
    """beta=0.1, pi_c=-1, pi_r=-2, ref_c=ref_r=-1.5 -> h=(-1+2)-0=1, beta*h=0.1,
    loss=-log sigma(0.1)=log(1+e^-0.1)=0.6443966...; chosen reward 0.1*(-1+1.5)=0.05, rejected -0.05."""
    out = SigmoidDPOLoss(beta=0.1)(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5))
    assert out.loss.item() == pytest.approx(0.6443966600735709, abs=1e-12)
    assert out.losses.tolist() == pytest.approx([0.6443966600735709])
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.rejected_rewards.item() == pytest.approx(-0.05)


def test_cdpo_and_robust_hand_worked():
    """Same pair (beta*h=0.1), eps=0.25; -log sigma(0.1)=0.644397, -log sigma(-0.1)=0.644397+0.1=0.744397.
    cDPO:   0.75*0.644397 + 0.25*0.744397            = 0.669397
    robust: (0.75*0.644397 - 0.25*0.744397) / 0.5    = 0.594397"""
    args = (_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5))
    assert SigmoidDPOLoss(0.1, label_smoothing=0.25)(*args).loss.item() == pytest.approx(0.6693966600735709)
    assert RobustDPOLoss(0.1, label_smoothing=0.25)(*args).loss.item() == pytest.approx(0.5943966600735708)


def test_ipo_and_hinge_hand_worked():
    """h=1. IPO beta=0.25: target 1/(2*0.25)=2, (1-2)^2=1; beta=0.5: target 1, loss 0.
    Hinge beta=0.1: relu(1-0.1)=0.9; beta=2: relu(1-2)=0."""
    args = (_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5))
    assert IPOLoss(0.25)(*args).loss.item() == pytest.approx(1.0)
    assert IPOLoss(0.5)(*args).loss.item() == pytest.approx(0.0)
    assert HingeDPOLoss(0.1)(*args).loss.item() == pytest.approx(0.9)
    assert HingeDPOLoss(2.0)(*args).loss.item() == pytest.approx(0.0)


def test_nll_term_hand_worked():
    """loss = mean(pair) + nll_weight*mean(chosen_nll) = 0.644397 + 0.5*mean(2, 4) = 2.144397;
    `losses` stays the pair loss only."""
    loss_fn = SigmoidDPOLoss(beta=0.1, nll_weight=0.5)
    out = loss_fn(_t(-1.0, -1.0), _t(-2.0, -2.0), _t(-1.5, -1.5), _t(-1.5, -1.5), chosen_nll=_t(2.0, 4.0))
    assert out.loss.item() == pytest.approx(0.6443966600735709 + 1.5)
    assert out.losses.tolist() == pytest.approx([0.6443966600735709] * 2)
    with pytest.raises(ValueError, match="chosen_nll"):
        loss_fn(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5))


def test_label_smoothing_zero_is_plain_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=F64) * 5 for _ in range(4))
    plain = SigmoidDPOLoss(beta=0.3)(pc, pr, rc, rr)
    for cls in (SigmoidDPOLoss, RobustDPOLoss):
        smoothed = cls(beta=0.3, label_smoothing=0.0)(pc, pr, rc, rr)
        torch.testing.assert_close(smoothed.losses, plain.losses, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(DPO_CLASSES))
def test_reference_free_equals_zero_references(name):
    g = torch.Generator().manual_seed(1)
    pc, pr = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    zeros = torch.zeros(8, dtype=F64)
    free = _make(name, 0.2, 0.1, reference_free=True)(pc, pr)
    with_zeros = _make(name, 0.2, 0.1)(pc, pr, zeros, zeros)
    for a, b in zip(free, with_zeros, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference_free"):
        _make(name, 0.2, 0.1, reference_free=True)(pc, pr, zeros, zeros)
    with pytest.raises(ValueError, match="reference_free=True"):
        _make(name, 0.2, 0.1)(pc, pr)


# ---------------------------------------------------------------------------------- DPO: vs float64 loops


@pytest.mark.parametrize("name", list(DPO_CLASSES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_matches_naive_loops(name, seed):
    g = torch.Generator().manual_seed(seed)
    B = 9
    pc, pr, rc, rr = tensors = [-torch.rand(B, generator=g, dtype=F64) * 60 for _ in range(4)]
    nll = torch.rand(B, generator=g, dtype=F64) * 3
    beta, eps = 0.05 + 0.5 * seed, 0.1 * seed
    out = _make(name, beta, eps, nll_weight=0.3)(pc, pr, rc, rr, chosen_nll=nll)
    lpc, lpr, lrc, lrr = (x.tolist() for x in tensors)
    ref_total, ref_losses = naive_dpo(name, lpc, lpr, lrc, lrr, beta, eps, 0.3, nll.tolist())
    assert out.loss.item() == pytest.approx(ref_total, rel=1e-10, abs=1e-12)
    assert out.losses.tolist() == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(
        [beta * (a - b) for a, b in zip(lpc, lrc, strict=True)]
    )
    assert out.rejected_rewards.tolist() == pytest.approx(
        [beta * (a - b) for a, b in zip(lpr, lrr, strict=True)]
    )
    assert not (out.losses.requires_grad or out.chosen_rewards.requires_grad)


@pytest.mark.parametrize("name", list(DPO_CLASSES))
def test_dpo_gradcheck_float64(name):
    g = torch.Generator().manual_seed(3)
    pc, pr = (torch.randn(5, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    rc, rr = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    nll = torch.rand(5, generator=g, dtype=F64).requires_grad_()
    loss_fn = _make(name, 0.7, 0.2, nll_weight=0.5)
    assert torch.autograd.gradcheck(lambda a, b, n: loss_fn(a, b, rc, rr, chosen_nll=n).loss, (pc, pr, nll))


def test_dpo_sigmoid_stable_for_large_margins():
    """A margin of +-1e4 would overflow a naive log(sigmoid(x)); logsigmoid stays finite and exact."""
    out = SigmoidDPOLoss(beta=1.0)(_t(0.0, -1e4), _t(-1e4, 0.0), _t(0.0, 0.0), _t(0.0, 0.0))
    assert out.losses.tolist() == pytest.approx([0.0, 1e4])


@pytest.mark.parametrize("name", list(DPO_CLASSES))
def test_dpo_bf16_inputs_compute_in_float32(name):
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-torch.rand(6, generator=g) * 40 for _ in range(4))
    bf = [x.bfloat16() for x in (pc, pr, rc, rr)]
    out = _make(name, 0.1, 0.1)(*bf)
    assert out.loss.dtype == out.losses.dtype == out.chosen_rewards.dtype == torch.float32
    # The reference sees the same bf16-rounded numbers, so only float32 rounding remains.
    ref_total, _ = naive_dpo(name, *(x.double().tolist() for x in bf), 0.1, 0.1)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref_total, rel=1e-4, abs=1e-4)


def test_dpo_init_validation_names_argument():
    with pytest.raises(ValueError, match="beta"):
        SigmoidDPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        IPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="nll_weight"):
        HingeDPOLoss(nll_weight=-0.1)
    for cls in (SigmoidDPOLoss, RobustDPOLoss):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: label_smoothing must be in \[0, 0.5\)"):
            cls(label_smoothing=0.5)
        with pytest.raises(ValueError, match="label_smoothing"):
            cls(label_smoothing=-0.1)
    with pytest.raises(TypeError):
        DPOLoss()  # abstract: pick a variant


def test_dpo_variant_chosen_by_class_path():
    """The YAML form: `loss: {class_path: lightning_rlhf.losses.IPOLoss, init_args: {beta: 0.5}}`."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--loss", type=DPOLoss)
    cfg = parser.parse_args(
        ["--loss", '{"class_path": "lightning_rlhf.losses.IPOLoss", "init_args": {"beta": 0.5}}']
    )
    loss_fn = parser.instantiate_classes(cfg).loss
    assert isinstance(loss_fn, IPOLoss) and loss_fn.beta == 0.5
    assert repr(loss_fn) == "IPOLoss(beta=0.5, nll_weight=0.0, reference_free=False)"


# -------------------------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_worked():
    """Pairs (r_c, r_r) = (2, 1), (1, 1), (0, 1): diffs 1, 0, -1.
    loss = mean(log(1+e^-1), log 2, log(1+e)) = (0.313262 + 0.693147 + 1.313262)/3 = 0.773223;
    accuracy = (1 + 0.5 + 0)/3 = 0.5 (the tie counts half); margin_mean 0; chosen_mean 1; rejected_mean 1.
    center_coef=0.01 adds 0.01*mean(9, 4, 1) = 0.046667. A margin m=1 on pair 1 alone: -log sigma(0)=log 2."""
    rc, rr = _t(2.0, 1.0, 0.0), _t(1.0, 1.0, 1.0)
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.e)) / 3
    out = bradley_terry_loss(rc, rr)
    assert out.loss.item() == pytest.approx(expected)
    assert out.accuracy.item() == pytest.approx(0.5)
    assert (out.margin_mean.item(), out.chosen_mean.item(), out.rejected_mean.item()) == pytest.approx(
        (0, 1, 1)
    )
    centered = BradleyTerryLoss(center_coef=0.01)(rc, rr)
    assert centered.loss.item() == pytest.approx(expected + 0.01 * 14 / 3)
    assert bradley_terry_loss(_t(2.0), _t(1.0), margin=_t(1.0)).loss.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_matches_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    rc, rr, m = (torch.randn(11, generator=g, dtype=F64) * 3 for _ in range(3))
    rc[3] = rr[3]  # a tie
    out = bradley_terry_loss(rc, rr, margin=m, center_coef=0.05)
    n = len(rc)
    rc, rr, m = rc.tolist(), rr.tolist(), m.tolist()
    loss = sum(_nls(rc[i] - rr[i] - m[i]) + 0.05 * (rc[i] + rr[i]) ** 2 for i in range(n)) / n
    acc = sum(1.0 if rc[i] > rr[i] else 0.5 if rc[i] == rr[i] else 0.0 for i in range(n)) / n
    assert out.loss.item() == pytest.approx(loss, rel=1e-10)
    assert out.accuracy.item() == pytest.approx(acc)
    assert out.margin_mean.item() == pytest.approx(sum(a - b for a, b in zip(rc, rr, strict=True)) / n)
    assert not any(x.requires_grad for x in out[1:])


def test_bradley_terry_gradcheck_bf16_and_validation():
    g = torch.Generator().manual_seed(5)
    rc, rr, m = (torch.randn(6, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: bradley_terry_loss(a, b, margin=c, center_coef=0.1).loss, (rc, rr, m)
    )
    bf = bradley_terry_loss(rc.detach().bfloat16(), rr.detach().bfloat16(), center_coef=0.1)
    ref = bradley_terry_loss(
        rc.detach().bfloat16().double(), rr.detach().bfloat16().double(), center_coef=0.1
    )
    assert bf.loss.dtype == torch.float32
    assert bf.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="center_coef"):
        BradleyTerryLoss(center_coef=-1.0)
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(rc, rr, center_coef=-1.0)


# ---------------------------------------------------------------------------------------------- PPO policy


def test_ppo_policy_hand_worked():
    """clip 0.2; four tokens with log-ratio +-0.3 (r = e^0.3 = 1.349859, e^-0.3 = 0.740818):
      r=1.349859, A=+1: max(-1.349859, -1.2)     = -1.2        clipped branch active
      r=1.349859, A=-1: max( 1.349859,  1.2)     =  1.349859   not clipped
      r=0.740818, A=+1: max(-0.740818, -0.8)     = -0.740818   not clipped
      r=0.740818, A=-1: max( 0.740818,  0.8)     =  0.8        clipped branch active
    loss = (-1.2 + 1.349859 - 0.740818 + 0.8)/4 = 0.052260; clip_fraction = 2/4;
    approx_kl = mean(e^0.3-1-0.3, e^-0.3-1+0.3) = (0.049859 + 0.040818)/2 = 0.045338.
    Dual clip c=1.3 caps token 2 (A=-1) at -c*A = 1.3: loss = (-1.2 + 1.3 - 0.740818 + 0.8)/4 = 0.039796."""
    e, ei = math.exp(0.3), math.exp(-0.3)
    logp = _t(0.3, 0.3, -0.3, -0.3).view(1, 4) - 1.0
    old = torch.full((1, 4), -1.0, dtype=F64)
    adv = _t(1.0, -1.0, 1.0, -1.0).view(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx((-1.2 + e - ei + 0.8) / 4)
    assert out.loss.item() == pytest.approx(0.052260, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(((e - 1.3) + (ei - 0.7)) / 2)
    dual = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=1.3)
    assert dual.loss.item() == pytest.approx((-1.2 + 1.3 - ei + 0.8) / 4)


@pytest.mark.parametrize("dual_clip", [None, 1.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_policy_matches_naive_loops(seed, dual_clip):
    logp, old, adv, mask = _ppo_inputs(seed)
    out = ppo_policy_loss(logp, old, adv, mask, clip_range=0.15, dual_clip=dual_clip)
    ref = naive_ppo_policy(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.15, dual_clip)
    assert [x.item() for x in out] == pytest.approx(list(ref), rel=1e-10, abs=1e-12)
    assert not (out.clip_fraction.requires_grad or out.approx_kl.requires_grad)


def _naive_policy_loss_torch(logp, old, adv, mask, clip, dual):
    """Token-by-token loop on 0-d float64 tensors so autograd can differentiate the reference too."""
    terms = []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r, a = torch.exp(logp[b, t] - old[b, t]), adv[b, t]
                loss = torch.max(-a * r, -a * torch.clamp(r, 1 - clip, 1 + clip))
                terms.append(torch.min(loss, -dual * a) if dual is not None and a < 0 else loss)
    return torch.stack(terms).sum() / len(terms)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_policy_gradient_matches_naive(dual_clip):
    logp, old, adv, mask = _ppo_inputs(7)
    logp.requires_grad_()
    (grad,) = torch.autograd.grad(ppo_policy_loss(logp, old, adv, mask, dual_clip=dual_clip).loss, logp)
    (ref,) = torch.autograd.grad(_naive_policy_loss_torch(logp, old, adv, mask, 0.2, dual_clip), logp)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-14)
    assert grad[~mask].abs().sum() == 0


def test_ppo_policy_empty_mask_and_garbage_padding_stay_finite():
    """Padding may hold -inf log-probs or NaN advantages; no response token at all gives exactly 0."""
    logp, old, adv, mask = _ppo_inputs(8)
    logp, adv = logp.clone(), adv.clone()
    logp[~mask], adv[~mask] = -math.inf, math.nan
    logp.requires_grad_()
    out = ppo_policy_loss(logp, old, adv, mask, dual_clip=2.0)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert all(torch.isfinite(x) for x in out) and torch.isfinite(grad).all()
    clean = naive_ppo_policy(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 2.0)
    assert out.loss.item() == pytest.approx(clean[0])
    empty = torch.zeros_like(mask)
    out = ppo_policy_loss(logp, old, adv, empty)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert [x.item() for x in out] == [0.0, 0.0, 0.0] and (grad == 0).all()


def test_ppo_policy_extreme_log_ratio_is_clamped():
    """A log-ratio of 200 would overflow exp; it is clamped to MAX_LOG_RATIO (documented)."""
    logp, old = torch.tensor([[200.0, -200.0]]), torch.zeros(1, 2)
    out = ppo_policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    assert all(torch.isfinite(x) for x in out)
    assert out.loss.item() == pytest.approx((math.exp(MAX_LOG_RATIO) - 0.8) / 2, rel=1e-6)


def test_ppo_policy_bf16_and_validation():
    logp, old, adv, mask = _ppo_inputs(9, dtype=torch.bfloat16)
    out = ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    ref = naive_ppo_policy(*(x.double().tolist() for x in (logp, old, adv)), mask.tolist(), 0.2, 3.0)
    assert out.loss.dtype == torch.float32
    assert [x.item() for x in out] == pytest.approx(list(ref), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(logp, old, adv, mask, clip_range=0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logp, old, adv, mask, dual_clip=1.0)


# ----------------------------------------------------------------------------------------- PPO value, entropy


def test_ppo_value_hand_worked():
    """c=0.2. Token 1: V=1.5, V_old=1, R=2 -> V_clip=1.2, (V-R)^2=0.25, (V_clip-R)^2=0.64 -> 0.64 (clipped).
    Token 2: V=1.1, V_old=1, R=0 -> V_clip=1.1, both 1.21 -> 1.21 (not clipped).
    loss = 0.5*(0.64+1.21)/2 = 0.4625, clip_fraction 1/2; unclipped: 0.5*(0.25+1.21)/2 = 0.365."""
    v, v_old, ret = _t(1.5, 1.1).view(1, 2), _t(1.0, 1.0).view(1, 2), _t(2.0, 0.0).view(1, 2)
    mask = torch.ones(1, 2)
    out = ppo_value_loss(v, v_old, ret, mask, clip_range_value=0.2)
    assert (out.loss.item(), out.clip_fraction.item()) == pytest.approx((0.4625, 0.5))
    plain = ppo_value_loss(v, v_old, ret, mask, clip_range_value=None)
    assert (plain.loss.item(), plain.clip_fraction.item()) == pytest.approx((0.365, 0.0))


@pytest.mark.parametrize("clip", [None, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_value_matches_naive_loops_with_gradcheck(seed, clip):
    g = torch.Generator().manual_seed(seed)
    v, v_old, ret = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[1] = False
    out = ppo_value_loss(v, v_old, ret, mask, clip_range_value=clip)
    ref = naive_ppo_value(v.tolist(), v_old.tolist(), ret.tolist(), mask.tolist(), clip)
    assert [x.item() for x in out] == pytest.approx(list(ref), rel=1e-10, abs=1e-12)
    v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ppo_value_loss(x, v_old, ret, mask, clip_range_value=clip).loss, (v,)
    )


def test_ppo_value_empty_mask_bf16_and_validation():
    g = torch.Generator().manual_seed(6)
    v, v_old, ret = (torch.randn(2, 4, generator=g) for _ in range(3))
    v = v.bfloat16().requires_grad_()
    out = ppo_value_loss(v, v_old.bfloat16(), ret.bfloat16(), torch.zeros(2, 4))
    (grad,) = torch.autograd.grad(out.loss, v)
    assert out.loss.item() == 0.0 and out.clip_fraction.item() == 0.0 and torch.isfinite(grad).all()
    mask = torch.ones(2, 4)
    bf = ppo_value_loss(v, v_old.bfloat16(), ret.bfloat16(), mask)
    ref = naive_ppo_value(
        *(x.double().tolist() for x in (v, v_old.bfloat16(), ret.bfloat16())), mask.tolist(), 0.2
    )
    assert bf.loss.dtype == torch.float32
    assert bf.loss.item() == pytest.approx(ref[0], rel=1e-5)
    with pytest.raises(ValueError, match="clip_range_value"):
        ppo_value_loss(v, v_old, ret, mask, clip_range_value=0.0)


def test_entropy_bonus_hand_worked_and_naive():
    """Entropies [[1, 2, 9], [3, 9, 9]] with mask [[1, 1, 0], [1, 0, 0]] -> (1+2+3)/3 = 2; no token -> 0."""
    ent = _t(1.0, 2.0, 9.0, 3.0, 9.0, 9.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert entropy_bonus(ent, mask).item() == pytest.approx(2.0)
    assert entropy_bonus(ent, torch.zeros_like(mask)).item() == 0.0
    g = torch.Generator().manual_seed(7)
    ent = torch.rand(4, 6, generator=g, dtype=F64) * 5
    mask = torch.rand(4, 6, generator=g) > 0.5
    vals = [ent[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    assert entropy_bonus(ent, mask).item() == pytest.approx(sum(vals) / len(vals))
    bf = entropy_bonus(ent.bfloat16(), mask)
    assert bf.dtype == torch.float32
    assert bf.item() == pytest.approx(entropy_bonus(ent.bfloat16().double(), mask).item(), rel=1e-6)
    ent = ent.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: entropy_bonus(e, mask), (ent,))
