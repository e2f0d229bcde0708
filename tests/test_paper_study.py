"""The paper study: the Theorem 4.1 bandit (exact numbers), the reward-curve callback, and the --fast study
end to end (files on disk, JSON schema, a table row for every method, finite numbers)."""

import json
import math

import pytest
import torch

from lightning_rlhf.losses import SigmoidDPOLoss
from lightning_rlhf.study.arms import ARMS, COMPARISONS, DPO_LEARNING_RATES, TASKS
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


FAST_MODEL_SIZE = "nano"


@pytest.fixture(scope="module")
def fast_study(tmp_path_factory):
    """The --fast smoke study, one seed, both tasks, every arm (also the budget cuts) and one shift point, on
    the nano testbed models (the tests check the study's plumbing, not its numbers; 62 s of CPU instead of
    138 s with the tiny ones, measured)."""
    pytest.importorskip("matplotlib")
    from lightning_rlhf.study.main import main

    out = tmp_path_factory.mktemp("paper_study")
    # --jobs 2: the program and word jobs in parallel processes (the --jobs path of the study)
    args = ["--fast", "--seeds", "0", "--jobs", "2", "--model-size", FAST_MODEL_SIZE, "--out", str(out)]
    return out, main(args)


def fast_settings():
    """The settings the fixture's study ran with (``FAST`` on the nano models)."""
    from dataclasses import replace

    from lightning_rlhf.study.main import FAST

    return replace(FAST, model_size=FAST_MODEL_SIZE)


def test_fast_study_writes_table_plots_and_json(fast_study):
    out, report = fast_study
    for name in (
        "paper_study.md",
        "paper_study.json",
        "curves_words.png",
        "curves_programs.png",
        "shift.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "paper_study.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "paper_study.md").read_text()
    for task in TASKS:
        for name in ("sft", "dpo", *(n for n in ARMS if ARMS[n].kind != "dpo" and task in ARMS[n].tasks)):
            assert f"| {name} |" in table, (task, name)
    # the rule comes before any number
    assert table.index("Decision rule, fixed before the numbers") < table.index("| advantage normalization")


def test_fast_study_json_schema_and_sane_numbers(fast_study):
    _, report = fast_study
    assert set(report) >= {
        "settings",
        "arms",
        "runs",
        "summary",
        "paired",
        "tiers",
        "shift_summary",
        "theorem",
    }
    assert set(report["runs"]) == set(TASKS)
    for task, runs in report["runs"].items():
        assert [run["seed"] for run in runs] == [0]
        run = runs[0]
        trained = [n for n in ARMS if task in ARMS[n].tasks]
        assert set(run["arms"]) == set(trained)
        assert run["dpo_pick"] in {f"dpo_lr{lr:g}" for lr in DPO_LEARNING_RATES}
        for name, record in run["arms"].items():
            curve = record["curve"]
            assert len(curve) >= 2 and curve[0]["batch"] == 0 and curve[0]["samples"] == 0, name
            # the best point is the first maximum of the validation curve
            rewards = [point["reward"] for point in curve]
            assert record["best_point"] == rewards.index(max(rewards)), name
            assert all(math.isfinite(r) for r in rewards), name
            samples = curve[-1]["samples"]
            expected = 0 if ARMS[name].kind == "dpo" else report["settings"]["samples"][task]
            assert samples == expected, (task, name)  # every on-policy arm samples the same budget
        for key, scores in run["scores"].items():
            per_prompt = scores["per_prompt"]
            assert len(per_prompt) == len(run["scores"]["sft"]["per_prompt"]) > 1, key
            if task == "words":
                assert sum(per_prompt) / len(per_prompt) == pytest.approx(scores["gold_reward"]), key
                assert 0.0 <= scores["win_rate_vs_sft"] <= 1.0
            else:
                every = scores["tiers"]["all"]
                assert 0 <= every["pass@1"] <= every["pass@5"] <= every["pass@10"] <= 1, key
                assert sum(per_prompt) / len(per_prompt) == pytest.approx(every["pass@5"]), key
                assert 0 <= every["false_positive_rate"] <= every["parse_rate"] <= 1, key
    assert report["summary"]["words"]["sft"]["final"]["win_rate_vs_sft"]["values"] == [0.5]
    assert [float(s) for s in report["shift_summary"]] == [0.0, 1.0]  # the sweep point and the main run
    assert report["theorem"] == run_theorem_illustration()


def test_fast_study_paired_rows_recompute_from_the_per_prompt_scores(fast_study):
    from lightning_rlhf.study.report import policy_key
    from lightning_rlhf.study.stats import bootstrap_interval, paired_differences, verdict

    _, report = fast_study
    for task, rows in report["paired"].items():
        runs = report["runs"][task]
        assert {row["label"] for row in rows} == {
            c.label for c in COMPARISONS if all(_ran_on(task, name) for name in (c.a, c.b))
        }
        for row in rows:
            for ckpt in ("best", "final"):
                diffs = paired_differences(
                    [r["scores"][policy_key(r, row["a"], ckpt)]["per_prompt"] for r in runs],
                    [r["scores"][policy_key(r, row["b"], ckpt)]["per_prompt"] for r in runs],
                )
                result = bootstrap_interval(diffs)
                assert row[ckpt]["mean"] == pytest.approx(result.mean)
                assert (row[ckpt]["low"], row[ckpt]["high"]) == (result.low, result.high)
                if row["sign"]:
                    assert row[ckpt]["verdict"] == verdict(result, row["sign"])


def _ran_on(task: str, name: str) -> bool:
    return name in ("sft", "dpo") or task in ARMS[name].tasks


def test_best_checkpoint_folder_scores_what_its_curve_point_recorded(fast_study):
    """The saved best policy, sampled on the validation prompts with the curve's seed, gives the validation
    reward its point recorded: the folder holds the weights of that point, not the final ones."""
    from transformers import AutoTokenizer

    from lightning_rlhf.models import load_causal_lm
    from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
    from lightning_rlhf.study.runner import _validation

    settings = fast_settings()
    out, report = fast_study
    job = out / "words_seed0"
    prompts, reward = _validation(job, settings, "words", 0)
    tokenizer = AutoTokenizer.from_pretrained(job / "tokenizer")
    checked = 0
    for name, record in report["runs"]["words"][0]["arms"].items():
        for folder, point in ((f"{name}_best", record["best_point"]), (f"{name}_final", -1)):
            texts = generate_texts(
                load_causal_lm(str(job / folder)),
                tokenizer,
                prompts,
                SamplingConfig(max_new_tokens=settings.word_stages.max_new_tokens),
                seed=0,
            ).texts
            score = sum(reward(prompts, texts)) / len(prompts)
            assert score == pytest.approx(record["curve"][point]["reward"], abs=1e-9), folder
            checked += 1
    assert checked == 2 * len(report["runs"]["words"][0]["arms"])


def test_interrupted_study_resumes_and_retrains_only_what_is_missing(fast_study):
    """A job whose result.json and one arm's record are gone retrains only that arm (bit-identically, the
    runs are deterministic) and reproduces every score; a rerun with other settings is refused."""
    from dataclasses import replace

    from lightning_rlhf.study.main import check_same_settings
    from lightning_rlhf.study.runner import run_job

    settings = fast_settings()
    out, report = fast_study
    job = out / "words_seed0"
    kept = {p.name: p.stat().st_mtime_ns for p in (job / "arms").glob("*.json") if p.stem != "ppo_B"}
    (job / "result.json").unlink()
    (job / "arms" / "ppo_B.json").unlink()
    # the fixture's jobs ran in 2 worker processes with half the threads each; float sums depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        again = run_job(job, replace(settings, seeds=(0,)), "words", 0)
    finally:
        torch.set_num_threads(threads)
    before = report["runs"]["words"][0]
    assert again["scores"] == before["scores"]
    assert again["arms"]["ppo_B"]["curve"] == before["arms"]["ppo_B"]["curve"]
    assert {p.name: p.stat().st_mtime_ns for p in (job / "arms").glob("*.json") if p.stem != "ppo_B"} == kept
    with pytest.raises(SystemExit, match="other settings.*samples"):
        check_same_settings(out, replace(settings, seeds=(0,), samples={"words": 256, "programs": 256}))
