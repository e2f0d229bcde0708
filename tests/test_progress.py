"""RLHFProgressBar (#16 items 5 and 9): rollouts counted against the plan, phases shown, no 'Epoch 0/-2'."""

from types import SimpleNamespace

import lightning as L
import pytest
from lightning import Callback

from lightning_rlhf import IterativeDPOModule, PPOModule, PromptDataModule, RLHFProgressBar
from lightning_rlhf.callbacks.progress import planned_batches
from lightning_rlhf.cli import build_cli
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig


def fake(batches, max_steps, global_step, steps_per_batch=None):
    module = SimpleNamespace()
    if steps_per_batch is not None:
        module.optimizer_steps_per_batch = lambda: steps_per_batch
    trainer = SimpleNamespace(num_training_batches=batches, max_steps=max_steps, global_step=global_step)
    return trainer, module


@pytest.mark.parametrize(
    ("batches", "max_steps", "global_step", "per_batch", "planned"),
    [
        (16, -1, 0, 4, 16),  # no max_steps: the epoch's batches
        (16, 8, 0, 4, 2),  # 8 steps at 4 a rollout: 2 rollouts (Lightning's bar said 8)
        (16, 10, 0, 4, 3),  # a partial last rollout still runs
        (16, 10, 8, 4, 1),  # resumed after 8 steps
        (2, 100, 0, 4, 2),  # the epoch ends first
        (16, 5, 0, None, 5),  # a module without the method: one step per batch, as Lightning counts
    ],
)
def test_planned_batches(batches, max_steps, global_step, per_batch, planned):
    assert planned_batches(*fake(batches, max_steps, global_step, per_batch)) == planned


def test_an_open_number_of_epochs_is_not_shown_as_minus_two():
    bar = RLHFProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(1) == "Epoch 1"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1) == "Epoch 1/2"
    bar._phase = "updating (612 tok/s)"
    assert bar._get_train_description(1) == "Epoch 1/2 · updating (612 tok/s)"


class Phases(Callback):
    def __init__(self):
        self.seen, self.totals = [], []

    def on_phase(self, trainer, pl_module, text):
        self.seen.append(text)

    def on_train_epoch_start(self, trainer, pl_module):
        bar = next(c for c in trainer.callbacks if isinstance(c, RLHFProgressBar))
        self.totals.append(bar.total_train_batches)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    sizes = SplitSizes(
        sft_train=32, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=64, prompts_eval=8
    )
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def fit(module, testbed, tmp_path, batch_size):
    phases = Phases()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[RLHFProgressBar(), phases],
        default_root_dir=tmp_path,
    )
    data = PromptDataModule(
        str(testbed / "init_policy"), str(testbed / "prompts_train.jsonl"), batch_size=batch_size
    )
    trainer.fit(module, data)
    return trainer, phases


def test_ppo_counts_rollouts_and_reports_each_phase(testbed, tmp_path):
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        ppo_epochs=1,
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=4,
    )
    trainer, phases = fit(module, testbed, tmp_path, batch_size=8)  # 2 steps a rollout, 6 steps: 3
    assert module.optimizer_steps_per_batch() == 2 and phases.totals == [3]
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    assert phases.seen[0::3] == ["sampling"] * 3
    assert all(p.startswith("updating (") and p.endswith(" tok/s)") for p in phases.seen[1::3])
    assert all(", update " in p for p in phases.seen[2::3])
    assert {"rollout/score", "rollout/kl"} <= set(trainer.progress_bar_metrics)


def test_iterative_dpo_counts_its_batches_and_reports_phases(testbed, tmp_path):
    module = IterativeDPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        num_samples=2,
        mini_batch_size=2,
        micro_batch_size=2,
        max_new_tokens=4,
    )
    trainer, phases = fit(module, testbed, tmp_path, batch_size=4)  # 2 steps a batch, 6 steps: 3
    assert phases.totals == [3]
    assert phases.seen[0::2] == ["sampling"] * 3
    assert "iteration/score_mean" in trainer.progress_bar_metrics


def test_the_cli_adds_the_bar_unless_the_config_has_one(testbed, tmp_path):
    base = [
        "--model=lightning_rlhf.SFTModule",
        f"--model.model={testbed / 'init_policy'}",
        "--data=lightning_rlhf.SFTDataModule",
        f"--data.train_file={testbed / 'sft_train.jsonl'}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert type(build_cli(base, run=False).trainer.progress_bar_callback) is RLHFProgressBar
    own = build_cli([*base, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], run=False)
    assert type(own.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"
    off = build_cli([*base, "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None
