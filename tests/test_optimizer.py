"""The modules' default optimizer: AdamW (fused kernel where it can run), decay on matrices only."""

import torch

from lightning_rlhf.modules.base import adamw, adamw_param_groups, fused_adamw_allowed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_adamw_is_fused_on_cpu_and_steps_like_the_looped_kernel():
    fused_model, looped_model = _model(), _model()
    fused = adamw(adamw_param_groups(fused_model, 0.1), lr=1e-2)
    looped = torch.optim.AdamW(adamw_param_groups(looped_model, 0.1), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(5, 4)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (looped_model, looped)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), looped_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adamw_first_step_by_hand():
    # Step 1 of Adam: m/(sqrt(v)+eps) = g/(|g|+eps) ~ sign(g); decoupled decay multiplies p by 1 - lr*wd.
    weight = torch.nn.Parameter(torch.tensor([[2.0, -1.0]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = adamw([{"params": [weight], "weight_decay": 0.5}, {"params": [bias], "weight_decay": 0.0}], lr=0.1)
    weight.grad = torch.tensor([[3.0, -0.25]], dtype=torch.float64)
    bias.grad = torch.tensor([-2.0], dtype=torch.float64)
    opt.step()
    eps = 1e-8
    expected_w = torch.tensor(
        [[2.0 * 0.95 - 0.1 * 3 / (3 + eps), -1.0 * 0.95 + 0.1 * 0.25 / (0.25 + eps)]], dtype=torch.float64
    )
    torch.testing.assert_close(weight.detach(), expected_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        bias.detach(), torch.tensor([0.5 + 0.1 * 2 / (2 + eps)], dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_adamw_falls_back_where_fused_cannot_run():
    meta = torch.nn.Linear(2, 2, device="meta")
    assert not adamw(adamw_param_groups(meta, 0.0)).defaults["fused"]
    assert not adamw([{"params": []}], lr=1e-3).defaults["fused"]


def test_adamw_is_not_fused_under_amp():
    """Lightning's AMP plugin cannot clip a fused optimizer's gradients (see fused_adamw_allowed)."""
    from lightning import Trainer

    assert fused_adamw_allowed(None) and fused_adamw_allowed(Trainer(accelerator="cpu", precision="32-true"))
    assert not fused_adamw_allowed(Trainer(accelerator="cpu", precision="bf16-mixed"))
    assert not adamw(adamw_param_groups(_model(), 0.0), fused=False).defaults["fused"]
