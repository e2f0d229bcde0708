"""``lightning-rlhf study``: the paper's findings on the testbed, written as a table, plots and a JSON.

For every seed: SFT -> reward model -> DPO, DPO after SFT on the preferred responses, DPO-Iter, and PPO
naive / with each of the paper's three tricks alone / with all three; every final policy is scored on the
held-out prompts (gold reward, win rate against SFT under the gold reward, reward-model score). Then a
sweep of the preference data's behaviour shift (DPO and PPO), and the Theorem 4.1 bandit. Files in --out::

    paper_study.md      the tables (mean ± std over seeds)
    paper_study.json    every number: settings, per-seed results and curves, summaries, theorem
    curves.png          gold reward against training progress per method
    shift.png           final gold reward against the behaviour shift
    seed<k>/, shift<x>_seed<k>/   each job's testbed, models and result.json (a rerun skips finished jobs)
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

from lightning_rlhf.pipeline import StageSettings
from lightning_rlhf.study.report import (
    check_finite,
    markdown_report,
    plot_curves,
    plot_shift,
    require_matplotlib,
    summarise,
    summarise_shift,
)
from lightning_rlhf.study.runner import METHODS, SHIFT_METHODS, StudySettings, run_job, settings_dict
from lightning_rlhf.study.theorem import format_theorem_table, run_theorem_illustration
from lightning_rlhf.testbed.files import SplitSizes
from lightning_rlhf.testbed.task import TaskConfig

# The full study trains PPO for half the quickstart's rollouts (12 x 512 prompts instead of 24) so that
# 3 seeds x 5 PPO variants, the shift sweep and everything else fit in 30 minutes on 2 cores.
FULL = StudySettings(stages=StageSettings(ppo_epochs=6))
FAST = StudySettings(
    stages=StageSettings(
        sft_epochs=1,
        reward_epochs=1,
        dpo_epochs=1,
        iterative_dpo_epochs=1,
        ppo_epochs=1,
        ppo_rollout_batch=32,
    ),
    sizes=SplitSizes(
        sft_train=256, sft_eval=32, pairs_train=256, pairs_eval=64, prompts_train=64, prompts_eval=32
    ),
    seeds=(0, 1),
    shifts=(0.0, 1.0, 3.0),
    shift_seeds=(0,),
    small_rollout_batch=8,
    eval_samples=1,
    curve_prompts=8,
    curve_points=4,
)


def _worker(job: tuple[str, StudySettings, int, float | None, int]) -> dict:
    out, settings, seed, shift, threads = job
    from lightning_rlhf.quickstart import quiet_training_output

    quiet_training_output()
    torch.set_num_threads(threads)
    label = f"seed {seed}" + ("" if shift is None else f", behaviour shift {shift:g}")
    print(f"[study] start {label}", flush=True)
    result = run_job(Path(out), settings, seed, shift)
    print(f"[study] done {label} ({result['seconds']:.0f} s)", flush=True)
    return result


def run_study(out: Path, settings: StudySettings, *, jobs: int = 1) -> dict:
    """Run (or resume) every job, then write the report files into ``out``; returns the report."""
    require_matplotlib()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    theorem = run_theorem_illustration()
    print("Theorem 4.1 illustration:\n" + format_theorem_table(theorem), flush=True)
    default_shift = TaskConfig.behaviour_shift
    threads = max(1, torch.get_num_threads() // jobs) if jobs > 1 else torch.get_num_threads()
    main_jobs = [(str(out / f"seed{s}"), settings, s, None, threads) for s in settings.seeds]
    # The main runs already are the sweep's point at the default shift for their seeds.
    sweep = [
        (str(out / f"shift{x:g}_seed{s}"), settings, s, x, threads)
        for x in settings.shifts
        for s in settings.shift_seeds
        if not (x == default_shift and s in settings.seeds)
    ]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_worker, main_jobs + sweep))
    else:
        results = [_worker(job) for job in main_jobs + sweep]
    runs, sweep_runs = results[: len(main_jobs)], results[len(main_jobs) :]
    reused = [
        {**run, "policies": {m: run["policies"][m] for m in SHIFT_METHODS}}
        for run in runs
        if default_shift in settings.shifts
        and run["seed"] in settings.shift_seeds
        and set(SHIFT_METHODS) <= set(run["policies"])
    ]
    methods = ("sft", *(m for m in settings.methods if m != "sft"))
    report = {
        "settings": settings_dict(settings),
        "methods": {m: METHODS[m] for m in methods},
        "runs": runs,
        "shift_runs": reused + sweep_runs,
        "summary": summarise(runs, methods),
        "shift_summary": summarise_shift(reused + sweep_runs),
        "theorem": theorem,
        "job_seconds": sum(r["seconds"] for r in results),
    }
    check_finite(report)
    plot_curves(report, out / "curves.png")
    if report["shift_summary"]:
        plot_shift(report, out / "shift.png")
    report["seconds"] = time.perf_counter() - start
    (out / "paper_study.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "paper_study.md").write_text(markdown_report(report) + "\n")
    print("\n" + markdown_report(report), flush=True)
    print(f"Study written to {out}/ ({report['seconds']:.0f} s)", flush=True)
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
    parser.add_argument("--model-size", default=None, help="testbed model size (nano, tiny, small)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=None,
        help="methods of the main runs (default: all)",
    )
    parser.add_argument(
        "--ppo-epochs", type=int, default=None, help="epochs over the prompts of every PPO run"
    )
    parser.add_argument(
        "--shifts", type=float, nargs="*", default=None, help="behaviour shifts of the sweep (none: no sweep)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (got {args.jobs})")
    settings = FAST if args.fast else FULL
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.model_size:
        settings = replace(settings, model_size=args.model_size)
    if args.methods:
        settings = replace(settings, methods=tuple(args.methods))
    if args.ppo_epochs:
        settings = replace(settings, stages=replace(settings.stages, ppo_epochs=args.ppo_epochs))
    if args.shifts is not None:
        settings = replace(settings, shifts=tuple(args.shifts))
    return run_study(Path(args.out), settings, jobs=args.jobs)


if __name__ == "__main__":
    main()
