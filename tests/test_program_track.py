"""The program testbed's RL track (#14): the per-tier report, the Python-rendered reward, PPO on exact
rewards raising held-out pass@1 over SFT, and ``quickstart --task programs``."""

import json
import random
from dataclasses import replace

import pytest
import torch

from lightning_rlhf.evaluate import PolicySamples
from lightning_rlhf.metrics import Submission
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.pipeline import PROGRAM_SETTINGS, train_ppo
from lightning_rlhf.testbed.program_eval import evaluate_programs, tier_report
from lightning_rlhf.testbed.programs import (
    OPS,
    ProgramReward,
    ProgramsConfig,
    ProgramTask,
    PythonProgramReward,
)


def _policy(name, scores, submissions=None):
    n = len(scores)
    return PolicySamples(name, ["x"] * n, [True] * n, [2] * n, {"tests": scores}, submissions)


def test_tier_report_splits_prompts_by_tier_hand_worked():
    """3 prompts x 2 samples: intro (pass, fail), intro (fail, fail), competition (pass, pass)."""
    sub = lambda hidden: Submission(True, ("c", hidden), hidden)  # noqa: E731
    scores = [10.0, 0.0, 0.0, 0.0, 10.0, 10.0]
    subs = [sub(s > 0) for s in scores]
    report = tier_report(
        [_policy("p", scores, subs)],
        ["intro", "intro", "competition"],
        num_samples=2,
        pass_k=(1, 2),
        n_at_k=("1@2",),
    )["p"]
    assert list(report) == ["intro", "competition", "all"]  # TIERS order, empty tiers left out, then all
    assert report["intro"]["pass@1"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert report["intro"]["pass@2"] == pytest.approx(0.5)
    assert report["competition"]["pass@1"] == pytest.approx(1.0)
    assert report["all"]["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert report["intro"]["prompts"] == 2 and report["all"]["prompts"] == 3
    assert report["competition"]["1@2"] == 1.0 and report["intro"]["eos_rate"] == 1.0


def test_python_program_reward_agrees_with_the_in_process_checker():
    """The same rows scored by rendering each response as Python and running it in the sandbox."""
    rng = random.Random(3)
    task = ProgramTask(ProgramsConfig(seed=3))
    problems = [task.sample(tier, rng) for tier in ("intro", "interview", "competition") for _ in range(4)]
    responses = []
    for i, p in enumerate(problems):
        if i % 3 == 0:
            responses.append(" " + " ".join(p.program))  # the reference: passes
        elif i % 3 == 1:
            responses.append(" " + " ".join(rng.choice(list(OPS)) for _ in p.program))  # mostly fails
        else:
            responses.append(" rev bogus")  # does not parse: no code
    tests = [json.dumps(p.tests) for p in problems]
    prompts = [p.prompt for p in problems]
    exact = ProgramReward()(prompts, responses, tests=tests)
    code = PythonProgramReward(num_workers=2)
    assert code(prompts, responses, tests=tests) == exact
    assert exact.count(10.0) >= 4
    metrics = code.metrics()
    assert metrics["pass_rate"] == exact.count(10.0) / len(exact)
    assert metrics["no_code_rate"] == pytest.approx(4 / 12)


@pytest.fixture(scope="module")
def intro_sft(tmp_path_factory):
    """An intro-tier program testbed (tiny model) after 100 SFT steps with the calibrated settings: held-out
    pass@1 about 0.33, so the exact reward has signal and room."""
    from lightning_rlhf.pipeline import PROGRAM_SETTINGS, train_sft
    from lightning_rlhf.testbed.files import ProgramSplitSizes, write_program_testbed

    out = tmp_path_factory.mktemp("program_rl")
    sizes = ProgramSplitSizes(
        sft_train=3200, sft_eval=32, pairs_train=8, pairs_eval=8, prompts_train=512, prompts_eval=64
    )
    write_program_testbed(out, ProgramsConfig(tiers=("intro",)), sizes, model_size="tiny")
    train_sft(out, PROGRAM_SETTINGS, seed=0, validate=False)
    return out


# 8 rollouts of 128 prompts (2 epochs of 512), 4 mini-batches each: 32 optimizer steps. Measured 0.330 ->
# 0.370; at lr 1e-4 over 32 rollouts it was 0.330 -> 0.364 (the budget here is the test's, not a tuning).
PPO_SETTINGS = replace(PROGRAM_SETTINGS, ppo_epochs=2, ppo_rollout_batch=128, ppo_lr=3e-4)


def _pass_at_1(out, folder):
    report = evaluate_programs(
        {folder: str(out / folder)}, str(out / "prompts_eval.jsonl"), num_samples=16, pass_k=(1,), n_at_k=()
    )
    return report[folder]["intro"]["pass@1"]


def test_ppo_on_the_exact_reward_raises_held_out_pass_at_1(intro_sft):
    """PPO from the SFT policy on the tests' reward alone (no reward model), scored by the in-process
    checker: held-out pass@1 (64 new problems x 16 samples, same seed) goes up."""
    train_ppo(intro_sft, PPO_SETTINGS, seed=0, exact_reward=ProgramReward(), save_as="ppo_in_process")
    before, after = _pass_at_1(intro_sft, "sft_policy"), _pass_at_1(intro_sft, "ppo_in_process")
    assert before > 0.1  # SFT solves some problems: the reward has signal
    assert after >= before + 0.02, (before, after)


def test_the_sandboxed_reward_trains_the_very_weights_of_the_in_process_one(intro_sft):
    """Rendering each program as Python and running it in the sandbox (CodeExecutionReward, 4 workers)
    gives the in-process checker's rewards: two seeded 2-rollout PPO runs of the settings above, one per
    reward, train the very same weights, bit for bit, and those moved away from SFT. (The whole 8-rollout
    run took ~4x as long with the sandbox for the same weights; 2 rollouts show the same thing.)"""
    short = {"epochs": 1, "limit_rollouts": 2}
    train_ppo(
        intro_sft, PPO_SETTINGS, seed=0, exact_reward=ProgramReward(), save_as="short_in_process", **short
    )
    sandboxed = PythonProgramReward(num_workers=4)
    train_ppo(intro_sft, PPO_SETTINGS, seed=0, exact_reward=sandboxed, save_as="short_python", **short)
    python, in_process, sft = (
        load_causal_lm(str(intro_sft / name)) for name in ("short_python", "short_in_process", "sft_policy")
    )
    pairs = zip(python.parameters(), in_process.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(python.parameters(), sft.parameters(), strict=True))


def test_program_quickstart_fast_prints_pass_at_k_per_tier(tmp_path, capsys):
    from lightning_rlhf.quickstart import main

    report = main(["--task", "programs", "--fast", "--model-size", "nano", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for policy in ("untrained", "sft", "dpo", "dpo_iter", "ppo"):
        tiers = report["policies"][policy]
        assert list(tiers) == ["intro", "interview", "competition", "all"]
        for metrics in tiers.values():
            assert 0.0 <= metrics["pass@1"] <= metrics["pass@5"] <= metrics["pass@10"] <= 1.0
            assert 0.0 <= metrics["10@64"] <= 1.0
        assert f"{policy:<10}intro" in printed
    assert "pass@1" in printed and "10@64" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["policies"]["sft"]["all"]["pass@1"] == pytest.approx(
        report["policies"]["sft"]["all"]["pass@1"]
    )
