"""Turn the study's job results into numbers over seeds, paired comparisons, a markdown report and plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lightning_rlhf.study.arms import ARMS, COMPARISONS, CONTROLS, DPO_LEARNING_RATES, Comparison
from lightning_rlhf.study.runner import PAIRED_PASS_K, PROGRAM_SUBMISSIONS, SHIFT_COLUMNS
from lightning_rlhf.study.stats import bootstrap_interval, paired_differences, verdict
from lightning_rlhf.study.theorem import format_theorem_table

WORD_METRICS = ("gold_reward", "win_rate_vs_sft", "rm_score")


def program_metrics(samples: int) -> tuple[str, ...]:
    """The program table's columns when every test prompt got ``samples`` samples (10@64 in the full run)."""
    return (
        "pass@1",
        "pass@5",
        "pass@10",
        f"{PROGRAM_SUBMISSIONS}@{samples}",
        "parse_rate",
        "false_positive_rate",
    )


CHECKPOINTS = ("best", "final")
TIER_ORDER = ("intro", "interview", "competition")


def require_matplotlib() -> None:
    """Fail before hours of training, not after, when the plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "lightning-rlhf study draws its plots with matplotlib, which is not installed: "
            "pip install 'lightning-rlhf[study]' (or pip install matplotlib)"
        ) from err


def mean_std(values: list[float]) -> dict[str, float | list[float]]:
    """Mean and sample standard deviation (0 for a single value) of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def policy_key(run: dict, name: str, checkpoint: str) -> str:
    """The key of arm ``name``'s ``checkpoint`` in ``run["scores"]`` ("dpo" is the run's grid pick)."""
    if name == "sft":
        return "sft"
    if name == "dpo":
        name = run["dpo_pick"]
    return f"{name}/{checkpoint}"


def _ran(run: dict, name: str) -> bool:
    if name == "sft":
        return True
    if name == "dpo":
        return bool(run["dpo_pick"])
    return f"{name}/final" in run["scores"]


def runs_with(runs: list[dict], *names: str) -> list[dict]:
    """The runs (seeds) that trained every arm of ``names`` (controls may run on fewer seeds)."""
    return [run for run in runs if all(_ran(run, name) for name in names)]


def has_arm(runs: list[dict], name: str) -> bool:
    return bool(runs_with(runs, name))


def report_arms(runs: list[dict]) -> list[str]:
    """The arms a task's table lists, in order: SFT, the DPO pick, then every trained non-grid arm."""
    names = ["sft"] + (["dpo"] if has_arm(runs, "dpo") else [])
    return names + [n for n in ARMS if ARMS[n].kind != "dpo" and has_arm(runs, n)]


def summarise(task: str, runs: list[dict], samples: int) -> dict[str, dict]:
    """``{arm: {checkpoint: {metric: mean_std}}}`` over the runs (seeds) of one task (``samples``: per test
    prompt; it names the n@k column)."""
    names = WORD_METRICS if task == "words" else program_metrics(samples)
    out: dict[str, dict] = {}
    every_run = runs
    for arm in report_arms(every_run):
        runs = runs_with(every_run, arm)
        out[arm] = {"seeds": [run["seed"] for run in runs]}
        for ckpt in CHECKPOINTS:
            keys = [policy_key(run, arm, ckpt) for run in runs]
            available = [
                m for m in names if all(m in _all(run, task, k) for run, k in zip(runs, keys, strict=True))
            ]
            out[arm][ckpt] = {
                m: mean_std([_all(run, task, k)[m] for run, k in zip(runs, keys, strict=True)])
                for m in available
            }
    return out


def _all(run: dict, task: str, key: str) -> dict:
    scores = run["scores"][key]
    return scores if task == "words" else scores["tiers"]["all"]


def tier_summary(runs: list[dict], name: str, samples: int) -> dict[str, dict]:
    """Programs: ``{tier: {metric: mean_std}}`` of arm ``name``'s best checkpoint over the runs."""
    columns = ("pass@5", f"{PROGRAM_SUBMISSIONS}@{samples}")
    runs = runs_with(runs, name)
    keys = [policy_key(run, name, "best") for run in runs]
    tiers = [
        t
        for t in TIER_ORDER
        if all(t in run["scores"][k]["tiers"] for run, k in zip(runs, keys, strict=True))
    ]
    return {
        tier: {
            m: mean_std([run["scores"][k]["tiers"][tier][m] for run, k in zip(runs, keys, strict=True)])
            for m in columns
            if all(m in run["scores"][k]["tiers"][tier] for run, k in zip(runs, keys, strict=True))
        }
        for tier in tiers
    }


def paired(runs: list[dict], comparison: Comparison, checkpoint: str) -> dict | None:
    """Mean paired difference B − A (per test prompt, per seed), its bootstrap interval and the verdict."""
    runs = runs_with(runs, comparison.a, comparison.b)
    if not runs:
        return None
    diffs = paired_differences(
        [run["scores"][policy_key(run, comparison.a, checkpoint)]["per_prompt"] for run in runs],
        [run["scores"][policy_key(run, comparison.b, checkpoint)]["per_prompt"] for run in runs],
    )
    result = bootstrap_interval(diffs)
    if comparison.sign:
        call = verdict(result, comparison.sign)
    else:  # no paper claim: say only whether the interval separates the arms
        call = "B > A" if result.low > 0 else "B < A" if result.high < 0 else "no difference shown"
    return {
        "mean": result.mean,
        "low": result.low,
        "high": result.high,
        "units": result.units,
        "verdict": call,
    }


def paired_table(task_runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``{task: [{"label", "a", "b", "paper", "best": .., "final": ..}]}`` for every testable comparison."""
    out: dict[str, list[dict]] = {}
    for task, runs in task_runs.items():
        rows = []
        for c in COMPARISONS:
            best = paired(runs, c, "best")
            if best is None:
                continue
            rows.append(
                {
                    "label": c.label,
                    "a": c.a,
                    "b": c.b,
                    "sign": c.sign,
                    "paper": c.paper.get(task, ""),
                    "seeds": [run["seed"] for run in runs_with(runs, c.a, c.b)],
                    "best": best,
                    "final": paired(runs, c, "final"),
                }
            )
        out[task] = rows
    return out


def summarise_shift(shift_runs: list[dict]) -> dict[str, dict]:
    """``{shift: {"reward_model_accuracy": ..., "sft"/arm: gold mean_std}}`` (best checkpoints)."""
    by_shift: dict[float, list[dict]] = {}
    for run in shift_runs:
        by_shift.setdefault(run["behaviour_shift"], []).append(run)
    return {
        f"{shift:g}": {
            "reward_model_accuracy": mean_std([r["reward_model_accuracy"] for r in runs]),
            **{
                name: mean_std([r["scores"][policy_key(r, name, "best")]["gold_reward"] for r in runs])
                for name in SHIFT_COLUMNS
            },
        }
        for shift, runs in sorted(by_shift.items())
    }


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _interval(row: dict | None, scale: float) -> str:
    if row is None:
        return "–"
    return (
        f"{scale * row['mean']:+.3f} [{scale * row['low']:+.3f}, {scale * row['high']:+.3f}] {row['verdict']}"
    )


DECISION_RULE = [
    "Decision rule, fixed before the numbers: for each comparison B − A the units are (seed, test prompt)",
    "pairs — both arms start from that seed's SFT policy and are scored on the same prompts with the same",
    "sampling seed. A claim of the paper counts as *reproduced* only if the 95 % bootstrap interval of the",
    "mean paired difference (prompts resampled within each seed, 2000 resamples) excludes 0 on the paper's",
    "side, *contradicted* if it excludes 0 on the other side, else *inconclusive*. The verdict that counts",
    "uses each arm's best-validation checkpoint (the paper's selection rule); the final checkpoint is shown",
    "beside it. Scores per prompt: the word task's mean gold reward, the program task's",
    f"pass@{PAIRED_PASS_K} (the paper's APPS metric in Table 3). Rows without a paper claim only say whether",
    "the arms differ.",
]


def run_lines(report: dict) -> list[str]:
    """What this run was: its arms, budget, seeds, the arms left out, and how long it took."""
    s = report["settings"]
    left_out = [name for name in ARMS if name not in s["arms"]]
    controls = (
        "every seed" if s["control_seeds"] is None else "seeds " + ", ".join(map(str, s["control_seeds"]))
    )
    samples = ", ".join(f"{task} {n}" for task, n in s["samples"].items() if task in s["tasks"])
    lines = [
        f"- Tasks {', '.join(s['tasks'])}; seeds {', '.join(map(str, s['seeds']))}; training samples per "
        f"on-policy arm: {samples}; control arms ({', '.join(CONTROLS)}) on {controls}.",
        f"- Arms not run: {', '.join(left_out) or 'none'}"
        + (" (cut for the time budget, in the order the protocol fixed)." if left_out else "."),
        f"- EMA reference: η per sample so that {s['ema_sft_share']:g} of the SFT weights remain after the "
        f"budget; DPO learning rates {', '.join(f'{lr:g}' for lr in DPO_LEARNING_RATES)} (picked on "
        f"validation); DPO-Iter {s['iterative_dpo_rounds']} rounds x {s['iterative_dpo_epochs']} epochs.",
        f"- Validation: {s['checkpoints']} checkpoints per arm after the start; test samples per prompt: "
        + ", ".join(f"{task} {n}" for task, n in s["eval_samples"].items() if task in s["tasks"])
        + ".",
    ]
    trained = [run for run in report.get("invocations", []) if run["jobs_run"]]
    if trained:
        wall = sum(run["seconds"] for run in trained)
        jobs = ", ".join(sorted({str(run["jobs"]) for run in trained}))
        lines.append(
            f"- Wall time {wall:.0f} s ({wall / 60:.1f} min) with --jobs {jobs} over {len(trained)} "
            f"invocation(s) that trained; {report['job_seconds']:.0f} s summed over the jobs."
        )
    return lines


def markdown_report(report: dict) -> str:
    """The study's tables: per task the arms and the paired comparisons, the shift sweep, the bandit."""
    s = report["settings"]
    lines = ["## This run", "", *run_lines(report), "", "## Decision rule", "", *DECISION_RULE, ""]
    for task, runs in report["runs"].items():
        seeds = ", ".join(str(run["seed"]) for run in runs)
        summary = report["summary"][task]
        scale, unit = (1.0, "gold reward") if task == "words" else (100.0, f"pass@{PAIRED_PASS_K} in points")
        lines += [
            f"## {task}: paired comparisons (B − A, {unit}; seeds {seeds})",
            "",
            "| comparison | paper | best-validation checkpoint | final checkpoint |",
            "|---|---|---|---|",
        ]
        for row in report["paired"][task]:
            fewer = "" if len(row["seeds"]) == len(runs) else f" (seeds {', '.join(map(str, row['seeds']))})"
            lines.append(
                f"| {row['label']}{fewer} | {row['paper'] or '–'} | {_interval(row['best'], scale)} | "
                f"{_interval(row['final'], scale)} |"
            )
        names = WORD_METRICS if task == "words" else program_metrics(s["eval_samples"][task])
        lines += [
            "",
            f"## {task}: every arm (mean ± std over seeds {seeds}; {s['samples'][task]} training samples per "
            "on-policy arm)",
            "",
            "| arm | checkpoint | " + " | ".join(names) + " | what it is |",
            "|---|---|" + "---|" * len(names) + "---|",
        ]
        for arm, by_ckpt in summary.items():
            doc = (
                "SFT policy (every arm starts here)"
                if arm == "sft"
                else (
                    "DPO at the validation pick of the lr grid: "
                    + ", ".join(sorted({run["dpo_pick"] for run in runs}))
                    if arm == "dpo"
                    else ARMS[arm].doc
                )
            )
            if len(by_ckpt["seeds"]) != len(runs):
                doc += f" (seeds {', '.join(map(str, by_ckpt['seeds']))})"
            for ckpt in ("final",) if arm == "sft" else CHECKPOINTS:
                row = by_ckpt[ckpt]
                cells = " | ".join(_pm(row[m]) if m in row else "–" for m in names)
                lines.append(f"| {arm} | {ckpt if arm != 'sft' else '–'} | {cells} | {doc} |")
        if task == "words":
            accuracy = mean_std([run["reward_model_accuracy"] for run in runs])
            lines += ["", f"Reward model pairwise accuracy on held-out pairs: {_pm(accuracy)}."]
        else:
            n_at_k = f"{PROGRAM_SUBMISSIONS}@{s['eval_samples'][task]}"
            lines += ["", f"By tier (best-validation checkpoints; pass@5 / {n_at_k}, mean over seeds):", ""]
            tiers = report["tiers"][task]
            tier_names = [t for t in TIER_ORDER if t in next(iter(tiers.values()))]
            lines += ["| arm | " + " | ".join(tier_names) + " |", "|---|" + "---|" * len(tier_names)]
            for arm, by_tier in tiers.items():
                cells = " | ".join(
                    " / ".join(f"{stat['mean']:.3f}" for stat in by_tier[t].values()) for t in tier_names
                )
                lines.append(f"| {arm} | {cells} |")
        lines.append("")
    if report["shift_summary"]:
        shift_seeds = ", ".join(map(str, s["shift_seeds"]))
        lines += [
            f"## Distribution shift (words, gold reward of best checkpoints; seeds {shift_seeds})",
            "",
            "| behaviour shift | SFT | DPO (validation pick of the grid) | PPO D (paper recipe) | "
            "reward-model accuracy |",
            "|---|---|---|---|---|",
        ]
        for shift, row in report["shift_summary"].items():
            cells = " | ".join(_pm(row[m]) for m in SHIFT_COLUMNS)
            lines.append(f"| {shift} | {cells} | {_pm(row['reward_model_accuracy'])} |")
        lines.append("")
    lines += [
        "## Theorem 4.1 illustration (exact, deterministic)",
        "",
        format_theorem_table(report["theorem"]),
    ]
    reward = ", ".join(f'"{y}": {v:.4f}' for y, v in report["theorem"]["reward_model"].items())
    lines += ["", f'Reward model fitted on the pairs: {reward} (it never sees "aa").', ""]
    return "\n".join(lines)


def _curve_stats(runs: list[dict], name: str, x: str) -> tuple[list[float], list[float]]:
    """x (samples or optimizer steps) and the mean validation score over seeds."""
    histories = [run["arms"][name]["curve"] for run in runs if name in run["arms"]]
    length = min(len(h) for h in histories)
    xs = [histories[0][i][x] for i in range(length)]
    means = [statistics.fmean(h[i]["reward"] for h in histories) for i in range(length)]
    return xs, means


def plot_curves(report: dict, task: str, path: Path) -> None:
    """Validation score against training samples (on-policy arms) and against optimizer steps (all arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"][task]
    names = [n for n in ARMS if any(n in run["arms"] for run in runs)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(ARMS)}  # one colour per arm, both panels
    for ax, x in zip(axes, ("samples", "global_step"), strict=True):
        for name in names:
            if x == "samples" and ARMS[name].kind == "dpo":
                continue  # offline: it samples nothing
            xs, means = _curve_stats(runs, name, x)
            ax.plot(xs, means, marker="o", markersize=3, label=name, color=colours[name])
        ax.set_xlabel("training samples" if x == "samples" else "optimizer steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    if task == "programs":
        axes[1].set_xscale("symlog", linthresh=10)
    unit = "gold reward" if task == "words" else "mean exact reward (10 x pass rate)"
    axes[0].set_ylabel(f"validation {unit}, mean over seeds")
    fig.suptitle(f"{task}: validation curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shift(report: dict, path: Path) -> None:
    """Gold reward of SFT, DPO and PPO D against the preference data's behaviour shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    shifts = list(report["shift_summary"])
    xs = [float(s) for s in shifts]
    for name in SHIFT_COLUMNS:
        means = [report["shift_summary"][s][name]["mean"] for s in shifts]
        stds = [report["shift_summary"][s][name]["std"] for s in shifts]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("behaviour shift of the preference data (0 = the SFT distribution)")
    ax.set_ylabel("gold reward (test prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_finite(report: dict) -> None:
    """Every number the report states must be finite: a NaN in a table is a bug, not a result."""

    def walk(value, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"study report: {where} is {value}")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        if isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    walk(report, "report")
