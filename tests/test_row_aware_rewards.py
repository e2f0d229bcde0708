"""Dataset columns travel with their prompts to the reward functions of PPO and DPO-Iter, end to end."""

import json

import lightning as L
import pytest
import torch

from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.losses import SigmoidDPOLoss
from lightning_rlhf.modules.iterative_dpo import IterativeDPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig

SIZES = SplitSizes(sft_train=8, sft_eval=4, pairs_train=8, pairs_eval=4, prompts_train=16, prompts_eval=8)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    write_testbed(out, TaskConfig(seed=0), SIZES, model_size="nano")
    rows = [json.loads(line) for line in (out / "prompts_train.jsonl").read_text().splitlines()]
    # A nested column (a test-case-like object) and a plain one, both derived from the row itself so that a
    # reward function can check it was handed the values of *its* row.
    with (out / "rows.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            tests = {"inputs": [row["prompt"]], "outputs": [str(i)]}
            f.write(json.dumps({"prompt": row["prompt"], "tests": tests, "row": i, "unused": "x"}) + "\n")
    return out, rows


class RowChecker:
    """Scores ``row`` / 100; fails the run if a column value is not the one of its prompt's row."""

    def __init__(self, rows):
        self.by_prompt = {r["prompt"]: i for i, r in enumerate(rows)}
        self.calls = 0
        self.seen = 0

    def __call__(self, prompts, responses, tests, row):
        self.calls += 1
        for prompt, t, r in zip(prompts, tests, row, strict=True):
            assert self.by_prompt[prompt] == r, "a column value reached the reward with another row's prompt"
            assert t == {"inputs": [prompt], "outputs": [str(r)]}  # nested JSON stays a Python dict
        self.seen += len(responses)
        return [r / 100 for r in row]

    def metrics(self):
        return {"rows_seen": float(self.seen)}


def trainer(**kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def test_the_datamodule_carries_every_other_column_by_default(testbed):
    out, rows = testbed
    dm = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["columns"]) == ["row", "tests", "unused"]
    for prompt, r, t in zip(batch["prompt"], batch["columns"]["row"], batch["columns"]["tests"], strict=True):
        assert rows[r]["prompt"] == prompt and t["outputs"] == [str(r)]
    only = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=4, columns=["row"])
    only.setup("fit")
    assert list(next(iter(only.train_dataloader()))["columns"]) == ["row"]
    none = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=4, columns=[])
    none.setup("fit")
    assert next(iter(none.train_dataloader()))["columns"] == {}


def test_ppo_calls_the_reward_with_each_rows_columns_and_logs_its_metrics(testbed):
    out, rows = testbed
    reward = RowChecker(rows)
    module = PPOModule(
        str(out / "init_policy"),
        reward_function=reward,
        mini_batch_size=8,  # one optimizer step per rollout: max_steps=2 is two rollouts
        micro_batch_size=4,
        max_new_tokens=4,
    )
    fit = trainer(max_steps=2)
    fit.fit(module, PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=8))
    assert reward.calls == 2 and reward.seen == 16
    assert fit.callback_metrics["rollout/rows_seen"] == 16.0
    # scores are row numbers / 100 and the rows are 0..15
    assert 0.0 <= float(fit.callback_metrics["rollout/function_score"]) <= 0.15


def test_dpo_iter_repeats_the_columns_with_the_samples_of_each_prompt(testbed):
    out, rows = testbed
    reward = RowChecker(rows)
    module = IterativeDPOModule(
        str(out / "init_policy"),
        reward_function=reward,
        loss=SigmoidDPOLoss(beta=0.1),
        num_samples=3,
        max_new_tokens=4,
        mini_batch_size=4,
        micro_batch_size=2,
    )
    fit = trainer(max_epochs=1, limit_train_batches=1)
    torch.manual_seed(0)
    fit.fit(module, PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=4))
    assert reward.calls == 1 and reward.seen == 12  # 4 prompts x 3 samples, each with its own row's values
    assert fit.callback_metrics["rollout/rows_seen"] == 12.0


def test_a_reward_that_needs_a_column_the_data_lacks_is_named(testbed):
    out, rows = testbed
    module = PPOModule(
        str(out / "init_policy"),
        reward_function=RowChecker(rows),
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=4,
    )
    data = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=8, columns=["row"])
    with pytest.raises(ValueError, match=r"reward_function needs the column 'tests'.*carries \['row'\]"):
        trainer(max_steps=1).fit(module, data)


def test_ppo_trains_on_code_execution_rewards_and_logs_their_rates(testbed):
    """The sandboxed test runner as PPO's reward: each response runs against its own row's tests. The
    testbed policy writes words, not Python, so every program fails (score 0) — the rates say how."""
    from lightning_rlhf.rewards import CodeExecutionReward

    out, _ = testbed
    reward = CodeExecutionReward(tests_column="tests", timeout_s=2.0, num_workers=2)
    module = PPOModule(
        str(out / "init_policy"),
        reward_function=reward,
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=4,
    )
    fit = trainer(max_steps=1)
    fit.fit(module, PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=8))
    logged = fit.callback_metrics
    assert float(logged["rollout/function_score"]) == 0.0 and float(logged["rollout/pass_rate"]) == 0.0
    # what is logged is what the reward reports of the rollout it scored (8 responses, one status each)
    assert reward.metrics() and all(
        float(logged[f"rollout/{k}"]) == pytest.approx(v) for k, v in reward.metrics().items()
    )
    assert len(reward._last) == 8 and all(r.status != "passed" for r in reward._last)


def test_a_fit_that_would_train_on_nothing_stops_and_exports_nothing(testbed, tmp_path):
    """16 prompts with batch_size 64 and drop_last: no batch at all. The run stops naming the numbers, and
    HFExport never writes the untrained policy (here or when a fit makes no optimizer step at all)."""
    from lightning_rlhf import HFExport
    from lightning_rlhf.data.loading import DataError

    out, _ = testbed
    export = tmp_path / "ppo_policy"

    def ppo():
        return PPOModule(
            str(out / "init_policy"),
            reward_function=lambda p, r: [0.0] * len(r),
            mini_batch_size=8,
            micro_batch_size=8,
            max_new_tokens=4,
        )

    data = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=64)
    message = r"rows\.jsonl: 16 training prompts over 1 rank\(s\) give 16 per rank, fewer than batch_size=64"
    with pytest.raises(DataError, match=message + r".*Set data batch_size <= 16"):
        trainer(max_steps=1, callbacks=[HFExport(str(export))]).fit(ppo(), data)
    assert not export.exists()
    small = PromptDataModule(str(out / "tokenizer"), str(out / "rows.jsonl"), batch_size=8)
    with pytest.raises(RuntimeError, match="HFExport: the fit made no optimizer step, so .* was not written"):
        trainer(max_steps=1, limit_train_batches=0, callbacks=[HFExport(str(export))]).fit(ppo(), small)
    assert not export.exists()
