"""EMAReferenceUpdate: the closed form of the EMA recursion, its schedule, its errors, and resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_rlhf import DPOModule, SigmoidDPOLoss
from lightning_rlhf.callbacks import EMAReferenceUpdate
from lightning_rlhf.testbed.files import tokenizer_corpus
from lightning_rlhf.testbed.models import build_causal_lm
from lightning_rlhf.testbed.task import TaskConfig, WordTask
from lightning_rlhf.testbed.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A nano policy folder and a different 'other' folder (another seed) used as the initial reference."""
    tokenizer = train_tokenizer(tokenizer_corpus(WordTask(TaskConfig(seed=0))))
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("policy", 0), ("other", 1)):
        build_causal_lm("nano", tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def pair_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """n preference batches of B = 2 pairs (right padded, 2 prompt tokens), differing from batch to batch."""
    batches = []
    for k in range(n):
        chosen = [[10, 11, 20 + k, 21, 1], [12, 13, 22, 1, 0]]
        rejected = [[10, 11, 30, 1, 0], [12, 13, 31 + k, 32, 1]]
        lengths = [5, 4, 4, 5]
        attention = torch.tensor([[1] * m + [0] * (5 - m) for m in lengths])
        response = attention.clone()
        response[:, :2] = 0
        batches.append(
            {
                "input_ids": torch.tensor(chosen + rejected),
                "attention_mask": attention,
                "response_mask": response,
                "index": torch.tensor([2 * k, 2 * k + 1]),
            }
        )
    return batches


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the EMA averages (parameters, floating buffers) as float64 copies."""
    out = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    out.update(
        {name: b.detach().double().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    )
    return out


class PolicySnapshots(L.Callback):
    """Records the policy after each optimizer step; goes *before* the EMA callback (they run in order)."""

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step[trainer.global_step] = named_tensors(pl_module.policy)


def dpo_module(model_dirs: Path, **kwargs) -> DPOModule:
    kwargs = {"reference_model": str(model_dirs / "other"), "learning_rate": 1e-2, **kwargs}
    return DPOModule(str(model_dirs / "policy"), diagnostic_batches=0, **kwargs)


def fit(module, callbacks, root: Path, max_steps: int, ckpt_path=None, checkpoint=None, same_batches=False):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks + ([checkpoint] if checkpoint is not None else []),
    )
    # A resumed run restarts a plain (not resumable) loader from its first batch: with identical batches the
    # data it sees after the resume is the same as the uninterrupted run's.
    batches = pair_batches(1) * 12 if same_batches else pair_batches(12)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def replay(
    initial: dict[str, torch.Tensor], snapshots, steps: list[int], eta: float
) -> dict[str, torch.Tensor]:
    """ref_k = (1 - η) ref_{k-1} + η policy(step_k), in float64, over the given update steps."""
    ref = {name: t.clone() for name, t in initial.items()}
    for step in steps:
        for name in ref:
            ref[name] = (1 - eta) * ref[name] + eta * snapshots.after_step[step][name]
    return ref


def assert_tensors_close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def test_dpo_reference_follows_the_closed_form_on_schedule(model_dirs, tmp_path):
    """every_n_steps=2, start_step=3 over 8 DPO steps: updates after steps 3, 5 and 7 (not 2: too early;
    not 4: only one step since 3). The reference must equal the float64 recursion replayed over the policy
    snapshots taken after exactly those steps, starting from the 'other' model."""
    eta = 0.25
    module = dpo_module(model_dirs)
    module.configure_model()
    initial = named_tensors(module.reference)
    snapshots = PolicySnapshots()
    ema = EMAReferenceUpdate(decay=eta, every_n_steps=2, start_step=3)
    trainer = fit(module, [snapshots, ema], tmp_path, max_steps=8)

    assert trainer.global_step == 8
    assert (ema.updates, ema.last_update_step) == (3, 7)
    assert ema.state_dict() == {"updates": 3, "last_update_step": 7}
    final = named_tensors(module.reference)
    assert_tensors_close(final, replay(initial, snapshots, [3, 5, 7], eta))
    # Numbers, not motion: the reference moved far beyond the tolerance, and a wrong schedule is detectable.
    moved = max(float((final[n] - initial[n]).abs().max()) for n in final)
    assert moved > 1e-2
    wrong = replay(initial, snapshots, [2, 4, 6, 8], eta)
    assert max(float((final[n] - wrong[n]).abs().max()) for n in final) > 1e-4


class Holder(L.LightningModule):
    """A bare module with `policy` and `reference` attributes (what the callback needs, nothing else)."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.reference = reference


class Tiny(nn.Module):
    def __init__(self, weight: list[float], scale: float, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight, dtype=dtype), requires_grad=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype))
        self.register_buffer("count", torch.tensor(5))


def test_update_hand_worked_with_buffers_and_bf16_reference():
    """η = 0.25: weight 1 + 0.25 (3 - 1) = 1.5 and 2 + 0.25 (2.5 - 2) = 2.125; float buffer scale
    4 + 0.25 (8 - 4) = 5; the integer buffer is not averaged. A bf16 reference keeps its dtype and gets
    the same values (exact in bf16)."""
    policy = Tiny([3.0, 2.5], scale=8.0)
    policy.count.fill_(9)
    for dtype in (torch.float32, torch.bfloat16):
        reference = Tiny([1.0, 2.0], scale=4.0, dtype=dtype)
        holder = Holder(policy, reference)
        ema = EMAReferenceUpdate(decay=0.25)
        ema.on_fit_start(None, holder)
        ema.on_train_batch_end(SimpleNamespace(global_step=1), holder, None, None, 0)
        assert reference.weight.dtype == dtype
        assert reference.weight.tolist() == [1.5, 2.125]
        assert reference.scale.item() == 5.0
        assert reference.count.item() == 5
        # Same global step again (gradient accumulation): no second update.
        ema.on_train_batch_end(SimpleNamespace(global_step=1), holder, None, None, 1)
        assert reference.weight.tolist() == [1.5, 2.125]
        assert (ema.updates, ema.last_update_step) == (1, 1)


def test_errors_name_the_problem(model_dirs, tmp_path):
    cached = dpo_module(model_dirs, reference_model=None, precompute_reference=True)
    with pytest.raises(ValueError, match="no live reference model.*precompute_reference=True"):
        fit(cached, [EMAReferenceUpdate()], tmp_path, max_steps=1)
    free = dpo_module(model_dirs, reference_model=None, loss=SigmoidDPOLoss(reference_free=True))
    with pytest.raises(ValueError, match="reference_free loss"):
        fit(free, [EMAReferenceUpdate()], tmp_path, max_steps=1)

    mismatch = Holder(nn.Linear(2, 3), nn.Linear(2, 4))
    with pytest.raises(ValueError, match=r"different shapes: \['bias: reference \(4,\) vs policy \(3,\)'"):
        EMAReferenceUpdate().on_fit_start(None, mismatch)
    renamed = Holder(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Only in the reference: \['bias', 'weight'\]"):
        EMAReferenceUpdate().on_fit_start(None, renamed)
    same = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="the policy object itself"):
        EMAReferenceUpdate().on_fit_start(None, Holder(same, same))
    with pytest.raises(TypeError, match="needs a module with a `policy`"):
        EMAReferenceUpdate().on_fit_start(None, L.LightningModule())


def test_arguments_are_validated_and_state_keys_differ():
    for kwargs, message in (
        ({"decay": 0.0}, "decay must be in"),
        ({"decay": 1.5}, "decay must be in"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_n_steps": 1.5}, "every_n_steps must be an integer >= 1"),
        ({"start_step": -1}, "start_step must be an integer >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            EMAReferenceUpdate(**kwargs)
    with pytest.warns(UserWarning, match="use decay=0.001"):
        EMAReferenceUpdate(decay=0.999)
    assert EMAReferenceUpdate().state_key != EMAReferenceUpdate(every_n_steps=2).state_key
    assert EMAReferenceUpdate(decay=0.01).state_key == EMAReferenceUpdate(decay=0.01).state_key


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(model_dirs, tmp_path):
    """every_n_steps=3: updates after steps 3 and 6 of 6. Resuming at step 4 must restore the reference
    weights (module state) *and* last_update_step=3 (callback state): a fresh counter would update at
    step 5 (5 - 0 >= 3) instead of 6 and end with a different reference."""
    eta = 0.2
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    full = dpo_module(model_dirs)
    full_ema = EMAReferenceUpdate(decay=eta, every_n_steps=3)
    fit(full, [full_ema], tmp_path / "full", max_steps=6, checkpoint=checkpoint, same_batches=True)
    assert (full_ema.updates, full_ema.last_update_step) == (2, 6)

    saved = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    assert saved["callbacks"][full_ema.state_key] == {"updates": 1, "last_update_step": 3}
    assert any(key.startswith("reference.") for key in saved["state_dict"])

    resumed = dpo_module(model_dirs)
    resumed_ema = EMAReferenceUpdate(decay=eta, every_n_steps=3)
    ckpt_path = str(tmp_path / "ckpt" / "step=4.ckpt")
    trainer = fit(
        resumed, [resumed_ema], tmp_path / "resumed", max_steps=6, ckpt_path=ckpt_path, same_batches=True
    )
    assert trainer.global_step == 6
    assert resumed_ema.state_dict() == full_ema.state_dict() == {"updates": 2, "last_update_step": 6}
    assert_tensors_close(named_tensors(resumed.reference), named_tensors(full.reference))
    assert_tensors_close(named_tensors(resumed.policy), named_tensors(full.policy))


def test_decay_per_sample_keeps_the_same_share_whatever_the_rollout_sizes():
    """η per sequence: updates after 4, 8 and 20 sequences (batch rows x num_generations x ranks) leave
    (1 - 0.01)^32 of the initial reference when the policy is all zeros: the share depends on the samples
    seen, not on how they were batched. Counters are the callback's state and survive a reload."""
    policy = Tiny([0.0, 0.0], scale=0.0)
    reference = Tiny([1.0, 2.0], scale=4.0)
    holder = Holder(policy, reference)
    holder.hparams["num_generations"] = 2
    ema = EMAReferenceUpdate(decay_per_sample=0.01)
    ema.on_fit_start(None, holder)
    step = 0
    for rows, ranks in ((2, 1), (2, 2), (5, 2)):  # 4, 8 and 20 sequences
        step += 1
        batch = {"prompt": ["p"] * rows, "input_ids": torch.zeros(rows, 3)}
        ema.on_train_batch_end(SimpleNamespace(global_step=step, world_size=ranks), holder, None, batch, 0)
        assert ema.last_eta == pytest.approx(1 - 0.99 ** (2 * rows * ranks))
    share = 0.99**32
    assert reference.weight.tolist() == pytest.approx([share, 2 * share], rel=1e-6)
    assert reference.scale.item() == pytest.approx(4 * share, rel=1e-6)

    # Samples accumulate until an update (every_n_steps=2): one update after 3 + 3 rows.
    every = EMAReferenceUpdate(decay_per_sample=0.1, every_n_steps=2)
    holder = Holder(Tiny([1.0, 1.0], scale=1.0), Tiny([0.0, 0.0], scale=0.0))
    every.on_fit_start(None, holder)
    trainer = SimpleNamespace(global_step=1, world_size=1)
    every.on_train_batch_end(trainer, holder, None, {"x": torch.zeros(3, 1)}, 0)
    assert every.updates == 0 and every.state_dict()["samples_since_update"] == 3
    restored = EMAReferenceUpdate(decay_per_sample=0.1, every_n_steps=2)
    restored.load_state_dict(every.state_dict())
    restored.on_fit_start(None, holder)
    restored.on_train_batch_end(
        SimpleNamespace(global_step=2, world_size=1), holder, None, {"x": torch.zeros(3, 1)}, 1
    )
    assert restored.updates == 1 and restored.samples_since_update == 0
    assert holder.reference.weight.tolist() == pytest.approx([1 - 0.9**6] * 2)
    with pytest.raises(ValueError, match="decay_per_sample must be"):
        EMAReferenceUpdate(decay_per_sample=1.0)
    assert EMAReferenceUpdate().state_key != EMAReferenceUpdate(decay_per_sample=0.01).state_key
    assert "decay_per_sample" not in EMAReferenceUpdate().state_key  # older checkpoints keep their key


def test_decay_per_sample_counts_the_rows_of_a_real_fit(model_dirs, tmp_path):
    """In a DPO fit each batch holds 2 pairs = 4 sequences (chosen and rejected rows), one update per step."""
    ema = EMAReferenceUpdate(decay_per_sample=0.01)
    fit(dpo_module(model_dirs), [ema], tmp_path, max_steps=2)
    assert ema.updates == 2 and ema.last_eta == pytest.approx(1 - 0.99**4)
