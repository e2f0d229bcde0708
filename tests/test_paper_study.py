"""The paper study: the Theorem 4.1 bandit (exact numbers), the reward-curve callback, and the --fast study
end to end (files on disk, JSON schema, a table row for every method, finite numbers)."""

import json
import math

import pytest
import torch

from lightning_rlhf.losses import SigmoidDPOLoss
from lightning_rlhf.study.runner import METHODS, SHIFT_METHODS
from lightning_rlhf.study.theorem import BanditSettings, response_logps, run_theorem_illustration


def test_theorem_illustration_numbers():
    """Reference: P(a) = 0.1 * 0.9 = 0.09, P(b) = 0.9, P(aa) = 0.1 * 0.1 = 0.01.

    The tabular reward model fitted to 3 x (a > b) and 1 x (b > a) converges to r(a) - r(b) = log 3, split
    symmetrically (+-0.5493) because its gradient is always along e_a - e_b; r(aa) stays at its initial 0.
    PPO's KL-regularised optimum is pi_ref * exp(r / beta) / Z: P(aa) = 0.01 / (0.09 e^5.493 + 0.9 e^-5.493
    + 0.01) = 4.6e-4; after 5000 steps it is at 8.3e-4. DPO's optimum only fixes the a-b log-ratio
    (log 3 / beta = 11 nats above the reference's): the shared first token takes it almost all, and "aa"
    rises with it to ~0.0495, five times the reference's, though it is in no pair and the worst response.
    """
    result = run_theorem_illustration()
    p = {name: row["probabilities"] for name, row in result["policies"].items()}
    assert p["reference"] == pytest.approx({"a": 0.09, "b": 0.9, "aa": 0.01}, abs=1e-12)
    assert result["reward_model"] == pytest.approx(
        {"a": math.log(3) / 2, "b": -math.log(3) / 2, "aa": 0.0}, abs=1e-6
    )
    assert p["dpo"] == pytest.approx({"a": 0.950303, "b": 0.000161, "aa": 0.049536}, abs=2e-6)
    assert p["ppo"] == pytest.approx({"a": 0.998628, "b": 0.000541, "aa": 0.000832}, abs=2e-6)
    assert p["dpo"]["aa"] > 4 * p["reference"]["aa"] > 4 * p["ppo"]["aa"]
    for row in result["policies"].values():
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-12)


def test_theorem_dpo_loss_ignores_the_unseen_response():
    """The theorem's point in one line: moving mass between "a" and "aa" at a fixed a/b log-ratio leaves
    the DPO loss unchanged, because "aa" is in no pair (DPO's solution set contains both policies)."""
    s = BanditSettings()
    ref = response_logps(torch.tensor([0.1, 0.9]).log().double(), torch.tensor([0.9, 0.1]).log().double())
    loss = SigmoidDPOLoss(beta=s.beta)

    def dpo_loss(p_a: float, p_aa: float) -> float:
        logps = torch.tensor([p_a, 1 - p_a - p_aa, p_aa], dtype=torch.float64).log()
        return float(loss(logps[:1], logps[1:2], ref[:1], ref[1:2]).loss)

    # P(a) / P(b) is 0.45 / 0.45 in both; P(aa) is 0.1 in one and 0.01 after moving mass to "a" and "b".
    assert dpo_loss(0.45, 0.10) == pytest.approx(dpo_loss(0.495, 0.01), abs=1e-12)


def test_reward_curve_validates_its_arguments():
    from lightning_rlhf.callbacks import RewardCurve

    with pytest.raises(ValueError, match="prompts"):
        RewardCurve([], lambda p, r: [0.0] * len(p), tokenizer=None)
    with pytest.raises(ValueError, match="every_n_batches"):
        RewardCurve(["x"], lambda p, r: [0.0] * len(p), tokenizer=None, every_n_batches=0)


@pytest.fixture(scope="module")
def fast_study(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from lightning_rlhf.study.main import main

    out = tmp_path_factory.mktemp("paper_study")
    return out, main(["--fast", "--out", str(out)])


def test_fast_study_writes_table_plots_and_json(fast_study):
    out, report = fast_study
    for name in ("paper_study.md", "paper_study.json", "curves.png", "shift.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "paper_study.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "paper_study.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in table, name


def test_fast_study_json_schema_and_sane_numbers(fast_study):
    _, report = fast_study
    assert set(report) >= {"settings", "methods", "runs", "shift_runs", "summary", "shift_summary", "theorem"}
    seeds = list(report["settings"]["seeds"])
    assert [run["seed"] for run in report["runs"]] == seeds
    for name in METHODS:
        for metric in ("gold_reward", "win_rate_vs_sft", "rm_score"):
            stat = report["summary"][name][metric]
            assert len(stat["values"]) == len(seeds)
            assert math.isfinite(stat["mean"]) and math.isfinite(stat["std"]) and stat["std"] >= 0
        gold = report["summary"][name]["gold_reward"]["mean"]
        assert -3.0 < gold < 2.0, name  # the task's rewards lie in about [-1 - 0.25 * 12, 1.5]
        assert 0.0 <= report["summary"][name]["win_rate_vs_sft"]["mean"] <= 1.0
    assert report["summary"]["sft"]["win_rate_vs_sft"]["values"] == [0.5] * len(seeds)
    for run in report["runs"]:
        assert set(run["curves"]) == set(METHODS) - {"sft"}
        for curve in run["curves"].values():
            assert len(curve) >= 2 and curve[0]["batch"] == 0
            assert all(math.isfinite(point["reward"]) for point in curve)
    assert [float(s) for s in report["shift_summary"]] == sorted(report["settings"]["shifts"])
    for row in report["shift_summary"].values():
        assert all(math.isfinite(row[m]["mean"]) for m in SHIFT_METHODS)
    assert report["theorem"] == run_theorem_illustration()


def test_fast_study_reports_paired_differences_with_the_decision_rule_first(fast_study):
    """Per-prompt gold scores are kept for every policy; the report states the rule, then one row per claim
    whose two arms ran, each with its interval around the mean and a verdict of the rule."""
    from lightning_rlhf.study.report import COMPARISONS, paired_section
    from lightning_rlhf.study.stats import bootstrap_interval, paired_differences, verdict

    out, report = fast_study
    lengths = set()
    for run in report["runs"]:
        for name, row in run["policies"].items():
            per_prompt = row["gold_per_prompt"]
            lengths.add(len(per_prompt))
            assert sum(per_prompt) / len(per_prompt) == pytest.approx(row["gold_reward"]), name
    assert len(lengths) == 1 and lengths.pop() > 1  # one score per held-out prompt, the same prompts
    table = (out / "paper_study.md").read_text()
    rule, first_row = (
        table.index("Decision rule, fixed before the numbers"),
        table.index("| advantage normalization"),
    )
    assert rule < first_row
    label, a, b, sign = COMPARISONS[3]  # PPO (paper recipe) beats DPO
    runs = report["runs"]
    result = bootstrap_interval(
        paired_differences(
            [r["policies"][a]["gold_per_prompt"] for r in runs],
            [r["policies"][b]["gold_per_prompt"] for r in runs],
        )
    )
    assert result.low <= result.mean <= result.high
    assert f"| {label} | {a} | {b} | {result.mean:+.3f} |" in table and verdict(result, sign) in table
    old = [{"policies": {"sft": {"gold_reward": 0.1}}}]
    assert "rerun the study" in "\n".join(paired_section(old))
