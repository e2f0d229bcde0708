"""The study protocol's pieces (#18), without training: the sample schedule, the EMA's SFT share, DPO's
validation pick, the held-out split, the program metrics per prompt, control arms on fewer seeds."""

import json
import math
from dataclasses import replace

import pytest

from lightning_rlhf.callbacks import EMAReferenceUpdate
from lightning_rlhf.evaluate import PolicySamples
from lightning_rlhf.metrics import Submission
from lightning_rlhf.study.arms import ARMS, BUDGET_CUTS, COMPARISONS, CONTROLS, task_arms
from lightning_rlhf.study.report import paired, runs_with, summarise
from lightning_rlhf.study.runner import StudySettings, pick_dpo, schedule, split_held_out
from lightning_rlhf.testbed.program_eval import per_prompt_pass_at_k, submission_rates


def test_schedule_fills_the_budget_exactly():
    """4096 samples: batch 64 -> 64 rollouts = 4 epochs of the 1024 prompts x 16; batch 512 -> 4 x 2;
    GRPO 64 prompts x 8 -> 8 rollouts of 512 (part of one epoch); DPO-Iter rounds of 256 prompts x 4 -> 4."""
    assert schedule(4096, 64, 1024, 64) == (4, 16)
    assert schedule(4096, 512, 1024, 512) == (4, 2)
    assert schedule(4096, 512, 1024, 64) == (1, 8)
    assert schedule(4096, 1024, 1024, 256) == (1, 4)
    for samples, per_batch, rows, prompts in ((4096, 64, 1024, 64), (4096, 512, 1024, 64)):
        epochs, batches = schedule(samples, per_batch, rows, prompts)
        assert epochs * batches * per_batch == samples
    with pytest.raises(ValueError, match="multiple"):
        schedule(1000, 64, 1024, 64)
    with pytest.raises(ValueError, match="whole epochs"):
        schedule(64 * 24, 64, 1024, 64)  # 24 rollouts: 1.5 epochs of 16


def test_ema_per_sample_leaves_the_same_sft_share_at_any_rollout_size():
    """The study sets eta per sample so (1 - eta)^budget = ema_sft_share: whatever the rollout size, the
    product of (1 - eta_update) over the updates is 0.5 (one update per rollout, as PPO applies it)."""
    budget, share = 4096, StudySettings().ema_sft_share
    per_sample = 1 - share ** (1 / budget)
    for rollout in (64, 512, 4096):
        ema = EMAReferenceUpdate(decay_per_sample=per_sample)
        kept = 1.0
        for _ in range(budget // rollout):
            ema.samples_since_update = rollout
            kept *= 1 - ema.eta()
        assert kept == pytest.approx(share, rel=1e-9), rollout


def test_dpo_pick_is_the_best_validation_and_ties_take_the_smaller_rate():
    records = {"dpo_lr0.0003": {"best_validation": 0.2}, "dpo_lr0.001": {"best_validation": 0.5}}
    records["dpo_lr0.003"] = {"best_validation": 0.4}
    assert pick_dpo(records) == "dpo_lr0.001"
    records["dpo_lr0.0003"]["best_validation"] = 0.5
    assert pick_dpo(records) == "dpo_lr0.0003"
    assert pick_dpo({"ppo_A": {"best_validation": 1.0}}) is None


def test_held_out_split_by_row_parity_keeps_every_row_and_the_tier_balance(tmp_path):
    rows = [{"prompt": f"p{i}", "tier": ("intro", "interview", "competition")[i % 3]} for i in range(12)]
    (tmp_path / "prompts_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    split_held_out(tmp_path)
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    val, test = read("prompts_val.jsonl"), read("prompts_test.jsonl")
    assert [r["prompt"] for r in test] == [f"p{i}" for i in range(0, 12, 2)]
    assert [r["prompt"] for r in val] == [f"p{i}" for i in range(1, 12, 2)]
    for split in (val, test):
        assert sorted(r["tier"] for r in split) == sorted(["intro", "interview", "competition"] * 2)


def test_program_metrics_per_prompt_and_submission_rates_by_hand():
    """Two prompts x 4 samples. Prompt 0: 2 of 4 pass -> pass@1 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6.
    Prompt 1: none pass -> 0. Submissions: 6 of 8 parse; 2 pass public but fail hidden -> FP 2/8."""
    ok, bad = 10.0, 0.0
    policy = PolicySamples(
        "p",
        responses=[""] * 8,
        ended=[True] * 8,
        lengths=[1] * 8,
        scores={"tests": [ok, bad, ok, bad, bad, bad, bad, bad]},
        submissions=[
            Submission(True, 1, True),
            Submission(True, 2, False),
            Submission(True, 1, True),
            Submission(False, None, False),
            Submission(True, 3, False),
            Submission(False, 4, False),
            Submission(False, None, False),
            Submission(False, 5, False),
        ],
    )
    assert per_prompt_pass_at_k(policy, 4, 1) == pytest.approx([0.5, 0.0])
    assert per_prompt_pass_at_k(policy, 4, 2) == pytest.approx([5 / 6, 0.0])
    assert submission_rates(policy) == {"parse_rate": 6 / 8, "false_positive_rate": 2 / 8}


def _run(seed: int, arms: dict[str, list[float]]) -> dict:
    scores = {"sft": {"per_prompt": [0.0, 0.0], "gold_reward": 0.0, "win_rate_vs_sft": 0.5, "rm_score": 0}}
    for name, per_prompt in arms.items():
        for ckpt in ("best", "final"):
            row = {"per_prompt": per_prompt, "win_rate_vs_sft": 0.5, "rm_score": 0.0}
            scores[f"{name}/{ckpt}"] = {**row, "gold_reward": sum(per_prompt) / len(per_prompt)}
    return {"seed": seed, "dpo_pick": None, "scores": scores}


def test_controls_on_fewer_seeds_are_compared_on_the_seeds_they_ran():
    runs = [_run(0, {"ppo_D": [0.5, 0.5], "grpo": [1.0, 1.0]}), _run(1, {"ppo_D": [0.2, 0.4]})]
    assert [r["seed"] for r in runs_with(runs, "ppo_D", "grpo")] == [0]
    grpo_row = next(c for c in COMPARISONS if c.b == "grpo")
    result = paired(runs, grpo_row, "best")
    assert result["mean"] == pytest.approx(0.5) and result["units"] == 2
    assert result["verdict"] == "B > A"  # no paper claim: the wording says only that they differ
    summary = summarise("words", runs, 4)
    assert summary["grpo"]["seeds"] == [0] and summary["ppo_D"]["seeds"] == [0, 1]
    assert summary["ppo_D"]["best"]["gold_reward"]["values"] == pytest.approx([0.5, 0.3])


def test_study_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown study arms"):
        StudySettings(arms=("ppo_Z",))
    with pytest.raises(ValueError, match="unknown study task"):
        StudySettings(tasks=("chess",))
    with pytest.raises(ValueError, match="multiple of arm ppo_C's 512"):
        StudySettings(samples={"words": 256, "programs": 4096})
    with pytest.raises(ValueError, match="ema_sft_share"):
        StudySettings(ema_sft_share=1.0)
    assert task_arms("words", tuple(ARMS)) == tuple(n for n in ARMS if "words" in ARMS[n].tasks)
    assert set(BUDGET_CUTS) <= set(CONTROLS) and all(math.isfinite(ARMS[n].lr_scale) for n in ARMS)
    assert replace(StudySettings(), control_seeds=(0,)).control_seeds == (0,)


def test_fill_doc_replaces_only_the_marked_block(tmp_path):
    from lightning_rlhf.study.main import BEGIN, END, fill_doc

    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\nprose before\n{BEGIN}\nold table\n{END}\nprose after\n")
    fill_doc(doc, "| new | table |\n")
    assert doc.read_text() == f"# Title\nprose before\n{BEGIN}\n| new | table |\n{END}\nprose after\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="doc.md needs one"):
        fill_doc(doc, "x")


def test_the_committed_study_doc_is_the_study_output_unedited():
    """docs/paper_study.md's tables are the committed run's report, and that report is what today's
    report code writes from the committed JSON: no number in them was typed by hand."""
    from pathlib import Path

    from lightning_rlhf.study.main import BEGIN, END
    from lightning_rlhf.study.report import markdown_report

    docs = Path(__file__).resolve().parents[1] / "docs"
    generated = (docs / "paper_study" / "paper_study.md").read_text(encoding="utf-8")
    report = json.loads((docs / "paper_study" / "paper_study.json").read_text(encoding="utf-8"))
    assert markdown_report(report) + "\n" == generated
    block = (docs / "paper_study.md").read_text(encoding="utf-8").split(BEGIN)[1].split(END)[0]
    assert block.strip() == generated.strip()
