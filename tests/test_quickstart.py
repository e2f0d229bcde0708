"""The main job: SFT -> reward model -> DPO, DPO-Iter, PPO on the testbed (about two minutes on 2 cores)."""

import json

import pytest

from lightning_rlhf.quickstart import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, main(["--out", str(out), "--seed", "0"])


def test_reward_model_is_within_a_tenth_of_the_gold_ceiling(report):
    """Labels are Bradley-Terry draws, so even the gold reward agrees with only ~75% of them: the ceiling.

    The bar is 0.1 below it (about 0.65 on 1000 held-out pairs: 9 standard errors above chance). It was
    90 % of the ceiling (0.673), which sat inside the spread of one seed's result: the study measured
    0.694 ± 0.032 over seeds, and the same code and seed gave 0.699 on one machine image, 0.667 on the next.
    """
    _, result = report
    assert 0.6 < result["gold_pairwise_accuracy"] < 0.9
    assert result["reward_model_accuracy"] >= result["gold_pairwise_accuracy"] - 0.1


def test_each_stage_moves_the_gold_reward(report):
    _, result = report
    gold = {name: row["gold_reward"] for name, row in result["policies"].items()}
    assert gold["sft"] > gold["untrained"] + 0.8
    for method in ("dpo", "dpo_iter", "ppo"):
        assert gold["sft"] + 0.1 < gold[method] < result["best_gold_reward"], method


def test_every_stage_is_saved_and_reported(report, capsys):
    out, result = report
    for folder in ("sft_policy", "reward_model", "dpo_policy", "dpo_iter_policy", "ppo_policy"):
        assert (out / folder / "config.json").is_file() and (out / folder / "tokenizer.json").is_file()
    assert json.loads((out / "results.json").read_text()) == result
    assert list((out / "reference_logps").glob("train-*.pt")), "DPO did not cache its reference log-probs"
