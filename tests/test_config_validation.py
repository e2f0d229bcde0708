"""Impossible settings fail at construction, and so at CLI parse time, with the flag and its allowed range
named; checked both by building the objects directly and through ``lightning-rlhf`` (LightningCLI)."""

import pytest

from lightning_rlhf import (
    AdvantageNormalization,
    DPOModule,
    EMAReferenceUpdate,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
)
from lightning_rlhf.cli import build_cli
from lightning_rlhf.losses import BradleyTerryLoss, IPOLoss, SigmoidDPOLoss
from lightning_rlhf.validation import ConfigError, check, check_divides

PPO = {"model": "m", "reward_function": len}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SigmoidDPOLoss(beta=-0.1), r"SigmoidDPOLoss: beta must be > 0 \(got -0.1\)"),
        (lambda: IPOLoss(beta=float("nan")), r"IPOLoss: beta must be > 0 \(got nan\)"),
        (lambda: BradleyTerryLoss(center_coef=-1), "BradleyTerryLoss: center_coef must be >= 0"),
        (lambda: DPOModule("m", learning_rate=0), r"DPOModule: learning_rate must be > 0 \(got 0\)"),
        (lambda: RewardModule("m", weight_decay=-1), "RewardModule: weight_decay must be >= 0"),
        (lambda: DPOModule("m", nonfinite="ignore"), "DPOModule: nonfinite must be one of 'raise', 'skip'"),
        (lambda: PPOModule(**PPO, clip_range=0), r"PPOModule: clip_range must be > 0 \(got 0\)"),
        (lambda: PPOModule(**PPO, clip_range_value=-1), "PPOModule: clip_range_value must be > 0 or null"),
        (
            lambda: PPOModule(**PPO, max_new_tokens=0),
            r"PPOModule: max_new_tokens must be an integer >= 1 \(got 0\)",
        ),
        (lambda: PPOModule(**PPO, max_new_tokens=2.5), r"max_new_tokens must be an integer >= 1"),
        (
            lambda: PPOModule(**PPO, mini_batch_size=4, micro_batch_size=8),
            r"micro_batch_size \(8\) must divide mini_batch_size \(4\) evenly, so it must also be <=",
        ),
        (lambda: PPOModule(**PPO, top_p=0), r"PPOModule: top_p must be in \(0, 1\]"),
        (lambda: PPOModule(**PPO, top_k=-1), "PPOModule: top_k must be an integer >= 0"),
        (lambda: PPOModule(**PPO, lam=-0.1), r"PPOModule: lam must be in \[0, 1\]"),
        (lambda: PPOModule(**PPO, kl_estimator="k4"), "PPOModule: kl_estimator must be one of 'k1', 'k2'"),
        (lambda: PPOModule(**PPO, temperature=0), "PPOModule: temperature must be > 0"),
        (lambda: EMAReferenceUpdate(decay=1.5), r"EMAReferenceUpdate: decay must be in \(0, 1\] \(got 1.5\)"),
        (lambda: AdvantageNormalization(eps=0), "AdvantageNormalization: eps must be > 0"),
        (lambda: PreferenceDataModule("t", "x.jsonl", batch_size=0), "batch_size must be an integer >= 1"),
        (
            lambda: PromptDataModule("t", "x.jsonl", max_prompt_length=0),
            "max_prompt_length must be an integer",
        ),
    ],
)
def test_direct_construction_names_the_flag_and_range(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_helper():
    check("X", "n", 3, gt=0, integer=True)
    check("X", "p", None, gt=0, optional=True)
    with pytest.raises(ConfigError, match=r"X: n must be an integer > 0 \(got True\)"):
        check("X", "n", True, gt=0, integer=True)  # bools are not counts
    with pytest.raises(ConfigError, match=r"X: p must be > 0 \(got None\)"):
        check("X", "p", None, gt=0)
    with pytest.raises(ConfigError, match=r"X: a \(3\) must divide b \(8\) evenly.*; use 4"):
        check_divides("X", ("a", 3), ("b", 8), "use 4")


def cli(*args):
    base = ["--data", "lightning_rlhf.PromptDataModule", "--data.train_file", "x.jsonl"]
    return build_cli(["--model", "lightning_rlhf.PPOModule", "--model.model", "m", *base, *args], run=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.clip_range", "-0.2"], "PPOModule: clip_range must be > 0"),
        (["--model.mini_batch_size", "4", "--model.micro_batch_size", "8"], "micro_batch_size \\(8\\) must"),
        (["--model.max_new_tokens", "0"], "PPOModule: max_new_tokens must be an integer >= 1"),
        (["--model.nonfinite", "skip", "--model.gamma", "2"], r"PPOModule: gamma must be in \[0, 1\]"),
        (["--data.batch_size", "0"], "PromptDataModule: batch_size must be an integer >= 1"),
    ],
)
def test_cli_fails_at_parse_naming_the_flag(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        cli(*args)


def test_cli_rejects_a_negative_beta_and_an_unknown_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dpo = ["--model", "lightning_rlhf.DPOModule", "--model.model", "m"]
    data = ["--data", "lightning_rlhf.PreferenceDataModule", "--data.train_file", "x.jsonl"]
    with pytest.raises(ValueError, match=r"SigmoidDPOLoss: beta must be > 0 \(got -1.0\)"):
        build_cli([*dpo, "--model.loss", "SigmoidDPOLoss", "--model.loss.beta", "-1", *data], run=False)
    with pytest.raises(SystemExit):
        build_cli([*dpo, "--model.loss", "NoSuchLoss", *data], run=False)
    assert "NoSuchLoss" in capsys.readouterr().err  # jsonargparse names the value it could not resolve


def test_rollout_batch_must_split_into_mini_batches_at_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data batch_size=6\) is not divisible by model mini_batch_size=4"):
        cli("--data.batch_size", "6", "--model.mini_batch_size", "4", "--model.micro_batch_size", "2")
    cli("--data.batch_size", "8", "--model.mini_batch_size", "4", "--model.micro_batch_size", "2")
