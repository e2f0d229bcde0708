"""modules/reference.py: the one place that says which model is the reference and how it moves."""

import pytest
import torch
from torch import nn

from lightning_rlhf.lora import AdapterReference, AdaptersDisabled
from lightning_rlhf.modules.reference import move_towards_policy, reference_model


class Tiny(nn.Module):
    def __init__(self, weight: float, dtype=torch.float32):
        super().__init__()
        self.linear = nn.Linear(1, 1, bias=False, dtype=dtype)
        nn.init.constant_(self.linear.weight, weight)
        self.register_buffer("scale", torch.tensor([weight], dtype=dtype))
        self.register_buffer("steps", torch.tensor([int(weight)]))


def test_ema_step_is_the_hand_worked_average_and_eta_one_copies_everything():
    """eta = 0.25: 0.75 * 2 + 0.25 * 6 = 3 for the weight and the float buffer; the int buffer stays."""
    reference, policy = Tiny(2.0), Tiny(6.0)
    move_towards_policy(reference, policy, 0.25)
    assert float(reference.linear.weight) == 3.0 and float(reference.scale) == 3.0
    assert int(reference.steps) == 2  # not averaged
    move_towards_policy(reference, policy, 1.0)  # DPO-Iter's refresh: an exact copy, buffers included
    assert float(reference.linear.weight) == 6.0 and int(reference.steps) == 6


def test_ema_step_on_bf16_averages_in_float32_and_rounds_once():
    """1 + 0.001 * (2 - 1) = 1.001 rounds to 1.0 in bf16 (its step at 1 is 2**-7); float64 says so too."""
    reference, policy = Tiny(1.0, torch.bfloat16), Tiny(2.0, torch.bfloat16)
    move_towards_policy(reference, policy, 0.001)
    want = torch.tensor(1.0 * 0.999 + 2.0 * 0.001, dtype=torch.float64).to(torch.bfloat16)
    assert reference.linear.weight.dtype == torch.bfloat16 and reference.linear.weight.item() == want.item()
    move_towards_policy(reference, policy, 0.5)
    assert reference.linear.weight.item() == 1.5


def test_a_reference_of_another_architecture_is_named():
    class Other(Tiny):
        def __init__(self):
            super().__init__(0.0)
            self.extra = nn.Linear(1, 1)

    with pytest.raises(KeyError, match="extra.weight"):
        move_towards_policy(Other(), Tiny(1.0), 0.5)


def test_reference_model_names_the_right_model(monkeypatch):
    from types import SimpleNamespace

    import lightning_rlhf.modules.reference as reference

    separate = Tiny(0.0)
    assert reference_model(SimpleNamespace(reference=separate, policy=Tiny(1.0))) is separate
    assert reference_model(SimpleNamespace(reference=None, policy=Tiny(1.0))) is None  # reference-free
    monkeypatch.setattr(reference, "is_peft_model", lambda model: True)
    monkeypatch.setattr(AdaptersDisabled, "__init__", lambda self, model: setattr(self, "model", model))
    policy = Tiny(1.0)
    adapters_off = reference_model(SimpleNamespace(reference=None, policy=policy))
    assert type(adapters_off) is AdaptersDisabled and adapters_off.model is policy
    refreshed = reference_model(SimpleNamespace(reference=None, policy=policy, adapter_refresh=True))
    assert type(refreshed) is AdapterReference and refreshed.model is policy
