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


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_shipped_critic_free_configs_raise_the_gold_reward_over_sft(
    report, method, tmp_path, monkeypatch
):
    """configs/grpo/testbed.yaml and configs/rloo/testbed.yaml as shipped (48 rollouts of 16 prompts x 4,
    against the quickstart's reward model, from its SFT policy; ~15 s each): the held-out gold reward rises
    clearly (measured, seed 0, December 7 2026: SFT -0.010, GRPO 0.248, RLOO 0.286, the quickstart's PPO
    0.394; on the image of December 4: -0.006, 0.357, 0.372 and 0.422)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from lightning_rlhf.cli import cli_main
    from lightning_rlhf.models import load_causal_lm
    from lightning_rlhf.quickstart import EVAL_SAMPLES, read_prompts
    from lightning_rlhf.testbed.evaluate import evaluate_policy
    from lightning_rlhf.testbed.files import load_task

    out, result = report
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "testbed").symlink_to(out)  # the layout the testbed configs name
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / method / "testbed.yaml"
    cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "false"])
    policy = load_causal_lm(str(out / f"{method}_policy"))
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompts = read_prompts(out / "prompts_eval.jsonl")
    scored = evaluate_policy(
        policy, tokenizer, load_task(out), prompts, samples_per_prompt=EVAL_SAMPLES, seed=0
    )
    sft = result["policies"]["sft"]["gold_reward"]
    assert scored["gold_reward"] > sft + 0.15, (sft, scored)
