"""``lightning-rlhf study``: the paper's cumulative PPO ablation, DPO, DPO-Iter and GRPO on both testbeds.

For every task (words ~ HH-RLHF with a learned reward model; programs ~ APPS / CodeContests with an exact
10/0 reward) and seed: a testbed and its SFT policy (and, for words, a reward model), then every arm of
``study/arms.py`` from that SFT policy at the same sample budget, each with a best-validation and a final
checkpoint scored on the test prompts; then the word task's behaviour-shift sweep and the Theorem 4.1 bandit.
Files in --out::

    paper_study.md      the decision rule, then per task the paired comparisons and every arm's numbers
    paper_study.json    every number: settings, per-job results and curves, summaries, comparisons, theorem
    curves_<task>.png   validation score against training samples and against optimizer steps
    shift.png           gold reward against the behaviour shift
    <task>_seed<k>/, shift<x>_seed<k>/   each job's testbed, models, arms/*.json and result.json
                        (a rerun skips every finished arm and job)
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from lightning_rlhf.pipeline import PROGRAM_SETTINGS, StageSettings
from lightning_rlhf.study.arms import ARMS, BUDGET_CUTS, TASKS, task_arms
from lightning_rlhf.study.report import (
    check_finite,
    markdown_report,
    paired_table,
    plot_curves,
    plot_shift,
    report_arms,
    require_matplotlib,
    summarise,
    summarise_shift,
    tier_summary,
)
from lightning_rlhf.study.runner import SHIFT_ARMS, StudySettings, run_job, settings_dict
from lightning_rlhf.study.theorem import format_theorem_table, run_theorem_illustration
from lightning_rlhf.testbed.files import ProgramSplitSizes, SplitSizes
from lightning_rlhf.testbed.task import TaskConfig

FULL = StudySettings(arms=tuple(name for name in ARMS if name not in BUDGET_CUTS), shifts=(3.0,))
"""The committed study (docs/paper_study.md): every arm but E (``arms.BUDGET_CUTS``: the 30-minute budget on
2 cores), 3 seeds, and a shift sweep that adds one point (3.0) to the main runs' 1.0."""
FAST = StudySettings(
    seeds=(0, 1),
    samples={"words": 128, "programs": 128},
    word_stages=StageSettings(sft_epochs=1, reward_epochs=1, dpo_epochs=1, ppo_rollout_batch=512),
    program_stages=replace(PROGRAM_SETTINGS, dpo_epochs=1),
    word_sizes=SplitSizes(
        sft_train=256, sft_eval=32, pairs_train=256, pairs_eval=64, prompts_train=128, prompts_eval=32
    ),
    program_sizes=ProgramSplitSizes(
        sft_train=512, sft_eval=32, pairs_train=256, pairs_eval=64, prompts_train=128, prompts_eval=30
    ),
    iterative_dpo_rounds=2,
    iterative_dpo_epochs=1,
    shifts=(0.0,),
    checkpoints=2,
    validation_samples={"words": 1, "programs": 2},
    eval_samples={"words": 1, "programs": 16},
    batch_scale=8,
)
"""A smoke run (CI): every arm on both tasks, two seeds, 128 samples per arm, rollouts of 8 and 64 prompts,
16 samples per test program (so 10@16 instead of 10@64)."""


def _worker(job: tuple[str, StudySettings, str, int, float | None, int]) -> dict:
    out, settings, task, seed, shift, threads = job
    from lightning_rlhf.quickstart import quiet_training_output

    quiet_training_output()
    torch.set_num_threads(threads)
    label = f"{task} seed {seed}" + ("" if shift is None else f", behaviour shift {shift:g}")
    print(f"[study] start {label}", flush=True)
    result = run_job(Path(out), settings, task, seed, shift)
    print(f"[study] done {label} ({result['seconds']:.0f} s)", flush=True)
    return result


def check_same_settings(out: Path, settings: StudySettings) -> None:
    """A rerun resumes the jobs in ``out``: refuse when they were trained with other settings (their arms
    would be mixed with new ones). The settings are written on the first run."""
    path = out / "study_settings.json"
    current = json.loads(json.dumps(settings_dict(settings)))
    if not path.is_file():
        path.write_text(json.dumps(current, indent=1) + "\n")
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in current.keys() | before.keys() if current.get(k) != before.get(k))
    if changed:
        raise SystemExit(
            f"lightning-rlhf study: {out}/ holds a study run with other settings ({', '.join(changed)} "
            "differ); resume it with the same flags, or pass another --out (or delete the folder)"
        )


def record_invocation(out: Path, seconds: float, jobs: int, trained: int) -> list[dict]:
    """Append this invocation to ``out/invocations.json`` (wall time, --jobs, jobs it ran rather than
    reused): the report's wall time is the sum over the invocations that trained, not a resumed rerun's."""
    path = out / "invocations.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"seconds": seconds, "jobs": jobs, "jobs_run": trained})
    path.write_text(json.dumps(history, indent=1) + "\n")
    return history


BEGIN, END = "<!-- study tables: begin -->", "<!-- study tables: end -->"


def fill_doc(doc: Path, tables: str) -> None:
    """Replace what lies between the BEGIN and END markers of ``doc`` with ``tables`` (the study's report),
    so the document's numbers are the study's, never typed by hand."""
    text = doc.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(
            f"lightning-rlhf study: {doc} needs one '{BEGIN}' line and, after it, one '{END}' line"
        )
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    doc.write_text(f"{head}{BEGIN}\n{tables.strip()}\n{END}{tail}", encoding="utf-8")


def run_study(out: Path, settings: StudySettings, *, jobs: int = 1, doc: Path | None = None) -> dict:
    """Run (or resume) every job, then write the report files into ``out``; returns the report."""
    require_matplotlib()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    check_same_settings(out, settings)
    theorem = run_theorem_illustration()
    print("Theorem 4.1 illustration:\n" + format_theorem_table(theorem), flush=True)
    default_shift = TaskConfig.behaviour_shift
    threads = max(1, torch.get_num_threads() // jobs) if jobs > 1 else torch.get_num_threads()
    # The program jobs first: they are the longest (their SFT alone is 48000 demonstrations).
    order = sorted(settings.tasks, key=lambda t: t != "programs")
    main_jobs = [
        (str(out / f"{task}_seed{s}"), settings, task, s, None, threads)
        for task in order
        for s in settings.seeds
    ]
    # The word runs already are the sweep's point at the default shift for their seeds.
    sweep = [
        (str(out / f"shift{x:g}_seed{s}"), settings, "words", s, x, threads)
        for x in settings.shifts
        for s in settings.shift_seeds
        if "words" in settings.tasks
        and not (x == default_shift and s in settings.seeds)
        and set(SHIFT_ARMS) <= set(task_arms("words", settings.arms))
    ]
    finished = sum((Path(job[0]) / "result.json").is_file() for job in main_jobs + sweep)
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_worker, main_jobs + sweep))
    else:
        results = [_worker(job) for job in main_jobs + sweep]
    main_results, sweep_runs = results[: len(main_jobs)], results[len(main_jobs) :]
    runs = {task: [r for r in main_results if r["task"] == task] for task in settings.tasks}
    # The main word runs are the sweep's point at the default shift (1.0) for the sweep's seeds.
    reused = [run for run in runs.get("words", []) if sweep and run["seed"] in settings.shift_seeds]
    report = {
        "settings": settings_dict(settings),
        "arms": {name: ARMS[name].doc for name in settings.arms},
        "runs": runs,
        "shift_runs": reused + sweep_runs,
        "summary": {
            task: summarise(task, task_runs, settings.eval_samples[task]) for task, task_runs in runs.items()
        },
        "tiers": {
            "programs": {
                arm: tier_summary(runs["programs"], arm, settings.eval_samples["programs"])
                for arm in report_arms(runs["programs"])
            }
        }
        if "programs" in runs
        else {},
        "paired": paired_table(runs),
        "shift_summary": summarise_shift(reused + sweep_runs) if sweep_runs else {},
        "theorem": theorem,
        "job_seconds": sum(r["seconds"] for r in results),
        "jobs": jobs,
    }
    check_finite(report)
    for task in runs:
        plot_curves(report, task, out / f"curves_{task}.png")
    if report["shift_summary"]:
        plot_shift(report, out / "shift.png")
    report["seconds"] = time.perf_counter() - start
    report["invocations"] = record_invocation(out, report["seconds"], jobs, len(main_jobs + sweep) - finished)
    (out / "paper_study.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "paper_study.md").write_text(markdown_report(report) + "\n")
    print("\n" + markdown_report(report), flush=True)
    if doc is not None:
        fill_doc(doc, markdown_report(report))
    print(
        f"Study written to {out}/ ({report['seconds']:.0f} s)" + (f"; tables in {doc}" if doc else ""),
        flush=True,
    )
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf study",
        description="Reproduce the paper's findings on the testbed (see docs/paper_study.md).",
    )
    parser.add_argument("--out", default="runs/paper_study", help="folder for every job and the report files")
    parser.add_argument("--fast", action="store_true", help="a smoke run on tiny data (a few minutes)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs (seeds, shift points) run in parallel")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the main runs")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="testbeds (default: both)")
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        default=None,
        metavar="ARM",
        help=f"arms of the main runs, from {', '.join(ARMS)} (default: all but {', '.join(BUDGET_CUTS)})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="training samples of every on-policy arm on both tasks, a multiple of 512 (default 4096)",
    )
    parser.add_argument("--model-size", default=None, help="testbed model size (nano, tiny, small)")
    parser.add_argument(
        "--shifts", type=float, nargs="*", default=None, help="behaviour shifts of the sweep (none: no sweep)"
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help=f"a markdown file whose block between '{BEGIN}' and '{END}' gets the tables",
    )
    args = parser.parse_args(argv)
    if args.doc is not None and not args.doc.is_file():
        parser.error(f"--doc {args.doc}: no such file")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (got {args.jobs})")
    settings = FAST if args.fast else FULL
    changes: dict = {}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.tasks:
        changes["tasks"] = tuple(args.tasks)
    if args.arms:
        changes["arms"] = tuple(args.arms)
    if args.samples:
        if args.samples < 1:
            parser.error(f"--samples must be >= 1 (got {args.samples})")
        changes["samples"] = {task: args.samples for task in TASKS}
    if args.model_size:
        changes["model_size"] = args.model_size
    if args.shifts is not None:
        changes["shifts"] = tuple(args.shifts)
    try:
        settings = replace(settings, **changes)
    except ValueError as err:
        parser.error(str(err))
    return run_study(Path(args.out), settings, jobs=args.jobs, doc=args.doc)


if __name__ == "__main__":
    main()
