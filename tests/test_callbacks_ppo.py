"""The paper's PPO switches on a real PPOModule run: whitened advantages, EMA reference, sample table."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_rlhf.callbacks import AdvantageNormalization, EMAReferenceUpdate, SampleTable
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig

ETA = 0.2


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(sft_train=4, sft_eval=2, pairs_train=4, pairs_eval=2, prompts_train=32, prompts_eval=4)
    write_testbed(root, TaskConfig(seed=0), sizes, model_size="nano")
    return root


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().clone() for name, p in model.named_parameters()}


class RolloutProbe(L.Callback):
    """Copies the advantages as this callback sees them in on_rollout_end (callbacks run in list order)."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_rollout_end(self, trainer, pl_module, rollout) -> None:
        self.seen.append((rollout.advantages.clone(), rollout.response_mask.clone()))


class WeightProbe(L.Callback):
    """Snapshots `policy` or `reference` at the end of every training batch (i.e. after each rollout)."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute
        self.after_rollout: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_rollout.append((trainer.global_step, snapshot(getattr(pl_module, self.attribute))))


def test_ppo_with_the_paper_callbacks(testbed, tmp_path):
    """Rollouts of 16 prompts, mini-batches of 8: 2 optimizer steps per rollout, 2 rollouts (max_steps=4).

    * The probe after AdvantageNormalization sees advantages with masked mean 0 and unbiased std 1 (the
      update reads the same rollout object after every hook), equal to float64 whitening of what the probe
      before it saw.
    * EMAReferenceUpdate(decay=0.2) runs once per rollout (at global steps 2 and 4):
      ref_1 = 0.8 ref_0 + 0.2 policy(step 2), ref_2 = 0.8 ref_1 + 0.2 policy(step 4), ref_0 = init_policy.
    * SampleTable(every_n_steps=1, num_samples=3) writes 3 rows per rollout with the gold score.
    """
    module = PPOModule(
        model=str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        gold_function=GoldReward(str(testbed)),
        mini_batch_size=8,
        micro_batch_size=4,
        max_new_tokens=8,
        learning_rate=1e-3,
        critic_learning_rate=1e-3,
    )
    data = PromptDataModule(str(testbed / "init_policy"), str(testbed / "prompts_train.jsonl"), batch_size=16)
    module.configure_model()
    ref_0 = snapshot(module.reference)
    raw, whitened = RolloutProbe(), RolloutProbe()
    policy_probe, reference_probe = WeightProbe("policy"), WeightProbe("reference")
    ema = EMAReferenceUpdate(decay=ETA)
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            raw,
            AdvantageNormalization(),
            whitened,
            SampleTable(every_n_steps=1, num_samples=3),
            policy_probe,
            ema,
            reference_probe,
        ],
    )
    trainer.fit(module, data)
    assert trainer.global_step == 4

    # --- advantages
    assert len(whitened.seen) == 2
    for (before, mask), (after, _) in zip(raw.seen, whitened.seen, strict=True):
        valid = after.double()[mask.bool()]
        assert abs(float(valid.mean())) < 1e-6
        assert float(valid.std(unbiased=True)) == pytest.approx(1.0, abs=1e-6)
        assert torch.all(after[~mask.bool()] == 0)
        raw_valid = before.double()[mask.bool()]
        expected = (raw_valid - raw_valid.mean()) / raw_valid.std(unbiased=True)
        torch.testing.assert_close(valid, expected, atol=1e-5, rtol=0)
        assert not (abs(float(raw_valid.mean())) < 1e-3 and abs(float(raw_valid.std()) - 1) < 1e-3)

    # --- EMA reference: once per rollout, closed form
    assert (ema.updates, ema.last_update_step) == (2, 4)
    assert [step for step, _ in policy_probe.after_rollout] == [2, 4]
    ref = ref_0
    for (_, policy), (_, reference) in zip(
        policy_probe.after_rollout, reference_probe.after_rollout, strict=True
    ):
        ref = {name: (1 - ETA) * ref[name] + ETA * policy[name] for name in ref}
        for name in ref:
            torch.testing.assert_close(reference[name], ref[name], atol=1e-6, rtol=0, msg=name)
    moved = max(float((ref[n] - ref_0[n]).abs().max()) for n in ref)
    assert moved > 1e-4

    # --- sample table
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert [(r["step"], r["global_step"], r["index"]) for r in rows] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 0, 2),
        (1, 2, 0),
        (1, 2, 1),
        (1, 2, 2),
    ]
    gold = GoldReward(str(testbed))
    for row in rows:
        assert set(row) == {"step", "global_step", "index", "prompt", "response", "score", "gold"}
        assert row["prompt"] and isinstance(row["response"], str)
        expected = gold([row["prompt"]], [row["response"]])[0]
        assert row["score"] == pytest.approx(expected, abs=1e-6)  # reward_function = gold function here
        assert row["gold"] == pytest.approx(expected, abs=1e-6)
