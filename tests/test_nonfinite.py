"""The non-finite guard: a NaN loss term or gradient raises with context (step, rows, term) under
nonfinite="raise" (the default), or skips that optimizer step and counts it under nonfinite="skip"."""

import lightning as L
import pytest
import torch

from lightning_rlhf import DPOModule, PPOModule, RewardModule
from lightning_rlhf.modules.base import NonFiniteError
from lightning_rlhf.testbed.models import build_causal_lm

NAN = float("nan")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("policy")
    build_causal_lm("nano", tokenizer, seed=0).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def pair_batch(index=(0, 1)) -> dict[str, torch.Tensor]:
    chosen, rejected = [[10, 11, 20, 21, 1], [12, 13, 22, 1, 0]], [[10, 11, 30, 1, 0], [12, 13, 31, 32, 1]]
    attention = torch.tensor([[1] * n + [0] * (5 - n) for n in (5, 4, 4, 5)])
    response = attention.clone()
    response[:, :2] = 0
    return {
        "input_ids": torch.tensor(chosen + rejected),
        "attention_mask": attention,
        "response_mask": response,
        "margin": torch.zeros(2),
        "index": torch.tensor(index),
    }


def fit(module, steps=3, loader=None, max_epochs=None):
    loader = loader or torch.utils.data.DataLoader(
        [pair_batch((2 * i, 2 * i + 1)) for i in range(steps)], None
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


class nan_on_call:  # noqa: N801 (used like a function)
    """Wrap a loss object so that its ``call``-th call (0-based) returns a NaN ``field``."""

    def __init__(self, loss, call: int, field: str) -> None:
        self.loss, self.call, self.field, self.calls = loss, call, field, 0

    def __getattr__(self, name):
        return getattr(self.loss, name)  # reference_free and friends

    def __call__(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        self.calls += 1
        if self.calls - 1 == self.call:
            return out._replace(**{self.field: getattr(out, self.field) * NAN})
        return out


@pytest.mark.parametrize("cls", [RewardModule, DPOModule])
def test_nan_loss_raises_with_step_rows_and_term(policy_dir, cls):
    extra = {"diagnostic_batches": 0} if cls is DPOModule else {}
    module = cls(policy_dir, learning_rate=1e-3, **extra)
    module.configure_model()
    module.loss = nan_on_call(module.loss, 1, "loss")
    with pytest.raises(NonFiniteError, match=r"non-finite loss .*at global step 1, batch rows \[2, 3\]"):
        fit(module)


@pytest.mark.parametrize("cls", [RewardModule, DPOModule])
def test_nan_loss_is_skipped_and_counted(policy_dir, cls):
    extra = {"diagnostic_batches": 0} if cls is DPOModule else {}
    module = cls(policy_dir, learning_rate=1e-3, nonfinite="skip", **extra)
    module.configure_model()
    module.loss = nan_on_call(module.loss, 1, "loss")
    trainer = fit(module)
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1.0
    assert all(torch.isfinite(p).all() for p in module.trained_model().parameters())


def test_nan_gradient_raises_or_is_skipped(policy_dir):
    for policy in ("raise", "skip"):
        module = DPOModule(policy_dir, learning_rate=1e-3, diagnostic_batches=0, nonfinite=policy)
        module.configure_model()
        weight = module.policy.lm_head.weight
        weight.register_hook(lambda g: g * NAN)  # finite loss, NaN gradient on every step
        before = weight.detach().clone()
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="non-finite gradient \\(first in policy.*global step 0"):
                fit(module)
        else:
            fit(module, steps=2)
            assert module.nonfinite_skipped == 2
            torch.testing.assert_close(weight.detach(), before)  # no step: not even weight decay


def test_ppo_names_the_value_loss_or_skips_the_mini_batch(policy_dir):
    prompts = {"input_ids": torch.tensor([[10, 11], [12, 13]]), "attention_mask": torch.ones(2, 2).long()}
    loader = torch.utils.data.DataLoader([{**prompts, "prompt": ["a b", "c d"]}] * 2, batch_size=None)
    for policy in ("raise", "skip"):
        module = PPOModule(
            policy_dir,
            reward_function=lambda p, r: [1.0] * len(r),
            max_new_tokens=3,
            mini_batch_size=2,
            micro_batch_size=1,
            nonfinite=policy,
        )
        module.configure_model()
        original = module._micro_loss
        calls = [0]

        def nan_value_loss(mb, original=original, calls=calls):
            loss, metrics = original(mb)
            calls[0] += 1
            if calls[0] == 2:  # the second micro-batch of the first mini-batch
                return loss * NAN, {**metrics, "ppo/value_loss": metrics["ppo/value_loss"] * NAN}
            return loss, metrics

        module._micro_loss = nan_value_loss
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="non-finite value_loss .*global step 0, batch rows"):
                fit(module, steps=2, loader=loader)
        else:
            fit(module, steps=1, loader=loader)
            assert module.nonfinite_skipped == 1
            assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_grpo_and_dpo_iter_name_the_term_or_skip_the_mini_batch(policy_dir):
    """The shared on-policy update loop guards the critic-free methods and DPO-Iter like PPO."""
    from lightning_rlhf import IterativeDPOModule
    from lightning_rlhf.rollout.advantages import GRPO

    prompts = {"input_ids": torch.tensor([[10, 11], [12, 13]]), "attention_mask": torch.ones(2, 2).long()}
    batch = {**prompts, "prompt": ["a b", "c d"], "index": torch.tensor([0, 1])}
    loader = torch.utils.data.DataLoader([batch] * 2, batch_size=None)
    scores = lambda p, r: [float(len(x)) for x in r]  # noqa: E731 (responses differ, so groups do too)
    for policy in ("raise", "skip"):
        grpo = PPOModule(
            policy_dir,
            reward_function=scores,
            advantage=GRPO(),
            num_generations=2,
            max_new_tokens=3,
            mini_batch_size=4,
            micro_batch_size=2,
            nonfinite=policy,
        )
        grpo.configure_model()
        assert grpo.critic is None
        original = grpo._micro_loss
        calls = [0]

        def nan_policy_loss(mb, original=original, calls=calls):
            loss, metrics = original(mb)
            calls[0] += 1
            if calls[0] == 2:  # the second micro-batch of the first rollout's only mini-batch
                return loss * NAN, {**metrics, "ppo/policy_loss": metrics["ppo/policy_loss"] * NAN}
            return loss, metrics

        grpo._micro_loss = nan_policy_loss
        dpo_iter = IterativeDPOModule(
            policy_dir,
            reward_function=scores,
            max_new_tokens=3,
            mini_batch_size=2,
            micro_batch_size=1,
            nonfinite=policy,
        )
        dpo_iter.configure_model()
        dpo_iter.loss = nan_on_call(dpo_iter.loss, 0, "loss")
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="non-finite policy_loss .*global step 0, batch rows"):
                fit(grpo, steps=2, loader=loader, max_epochs=1)
            with pytest.raises(NonFiniteError, match="non-finite loss .*global step 0, batch rows"):
                fit(dpo_iter, steps=2, loader=loader, max_epochs=1)
        else:
            fit(grpo, steps=1, loader=loader, max_epochs=1)  # rollout 1 is skipped, rollout 2 steps
            assert grpo.nonfinite_skipped == 1
            assert all(torch.isfinite(p).all() for p in grpo.policy.parameters())
            before = [p.detach().clone() for p in dpo_iter.policy.parameters()]
            fit(dpo_iter, steps=1, loader=loader, max_epochs=1)
            assert dpo_iter.nonfinite_skipped >= 1
            assert all(torch.isfinite(p).all() for p in dpo_iter.policy.parameters())
            assert any(
                not torch.equal(a, b) for a, b in zip(before, dpo_iter.policy.parameters(), strict=True)
            )


def test_sft_names_the_nll_or_skips(policy_dir):
    from lightning_rlhf import SFTModule

    batch = {
        "input_ids": torch.tensor([[10, 11, 20, 1]]),
        "attention_mask": torch.ones(1, 4).long(),
        "response_mask": torch.tensor([[0, 0, 1, 1]]),
        "index": torch.tensor([7]),
    }
    loader = torch.utils.data.DataLoader([batch] * 2, batch_size=None)
    for policy in ("raise", "skip"):
        module = SFTModule(policy_dir, learning_rate=1e-3, nonfinite=policy)
        module.configure_model()
        original = module._loss
        module._loss = lambda b, original=original: original(b) * NAN
        if policy == "raise":
            with pytest.raises(NonFiniteError, match=r"non-finite nll .*global step 0, batch rows \[7\]"):
                fit(module, steps=2, loader=loader)
        else:
            fit(module, steps=2, loader=loader)
            assert module.nonfinite_skipped == 2
