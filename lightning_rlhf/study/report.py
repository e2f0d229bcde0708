"""Turn the study's job results into numbers over seeds, a markdown report and two PNG plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lightning_rlhf.study.runner import METHODS, SHIFT_METHODS
from lightning_rlhf.study.stats import bootstrap_interval, paired_differences, verdict
from lightning_rlhf.study.theorem import format_theorem_table

METRICS = ("gold_reward", "win_rate_vs_sft", "rm_score")
# Xu et al. (2024), Table 2, HH-RLHF, OpenAssistant reward: what the testbed's ordering is compared with.
PAPER_HH_RLHF = {"dpo": 0.611, "ppo_paper": 0.718}


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


def summarise(runs: list[dict], methods: tuple[str, ...]) -> dict[str, dict]:
    """``{method: {metric: mean_std}}`` over the runs (seeds)."""
    return {
        name: {metric: mean_std([run["policies"][name][metric] for run in runs]) for metric in METRICS}
        for name in methods
    }


def summarise_shift(shift_runs: list[dict]) -> dict[str, dict]:
    """``{shift: {"reward_model_accuracy": ..., method: gold mean_std}}``, shifts as sorted string keys."""
    by_shift: dict[float, list[dict]] = {}
    for run in shift_runs:
        by_shift.setdefault(run["behaviour_shift"], []).append(run)
    return {
        f"{shift:g}": {
            "reward_model_accuracy": mean_std([r["reward_model_accuracy"] for r in runs]),
            **{m: mean_std([r["policies"][m]["gold_reward"] for r in runs]) for m in SHIFT_METHODS},
        }
        for shift, runs in sorted(by_shift.items())
    }


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_report(report: dict) -> str:
    """The study's tables: methods, the shift sweep and the Theorem 4.1 illustration."""
    seeds = report["settings"]["seeds"]
    lines = [
        f"## Methods (testbed behaviour shift 1.0; mean ± std over seeds {', '.join(map(str, seeds))})",
        "",
        "| method | gold reward | win rate vs SFT (gold) | reward-model score | what it is |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["summary"].items():
        cells = " | ".join(_pm(row[m]) for m in METRICS)
        lines.append(f"| {name} | {cells} | {METHODS[name]} |")
    accuracy = mean_std([run["reward_model_accuracy"] for run in report["runs"]])
    paper = ", ".join(f"{name} {value}" for name, value in PAPER_HH_RLHF.items())
    lines += [
        "",
        f"Reward model pairwise accuracy on held-out pairs: {_pm(accuracy)}.",
        f"The paper (HH-RLHF, OpenAssistant reward; another scale): {paper}.",
        "",
    ]
    lines += paired_section(report["runs"])
    if report["shift_summary"]:
        shift_seeds = ", ".join(map(str, report["settings"]["shift_seeds"]))
        lines += [
            f"## Distribution shift (gold reward; seeds {shift_seeds})",
            "",
            "| behaviour shift | SFT | DPO | PPO (paper recipe) | reward-model accuracy |",
            "|---|---|---|---|---|",
        ]
        for shift, row in report["shift_summary"].items():
            cells = " | ".join(_pm(row[m]) for m in SHIFT_METHODS)
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


# (label, arm A, arm B, +1 when the paper finds B better than A): the paper's claims these arms can test.
COMPARISONS = (
    ("advantage normalization helps PPO", "ppo_naive", "ppo_adv_norm", 1),
    ("a large rollout batch helps PPO", "ppo_naive", "ppo_large_batch", 1),
    ("an EMA reference helps PPO", "ppo_naive", "ppo_ema", 1),
    ("PPO (paper recipe) beats DPO", "dpo", "ppo_paper", 1),
    ("PPO (paper recipe) beats DPO-Iter", "dpo_iter", "ppo_paper", 1),
    ("DPO-Iter beats DPO", "dpo", "dpo_iter", 1),
)


def paired_section(runs: list[dict]) -> list[str]:
    """The paired-difference table (gold reward per held-out prompt, B − A), the decision rule first.

    Runs written before per-prompt scores were recorded have none: the section then says so."""
    header = [
        "## Paired differences (gold reward per held-out prompt, B − A)",
        "",
        "Decision rule, fixed before the numbers: a claim is *reproduced* only if the 95 % bootstrap",
        "interval of the mean paired difference (prompts resampled within each seed) excludes 0 on the",
        "paper's side, *contradicted* if it excludes 0 on the other side, else *inconclusive*.",
        "",
    ]
    if not runs or any("gold_per_prompt" not in row for run in runs for row in run["policies"].values()):
        return [*header, "(These runs carry no per-prompt scores: rerun the study to get this table.)", ""]
    lines = [
        *header,
        "| claim | A | B | mean B − A | 95 % interval | units | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, a, b, sign in COMPARISONS:
        if a not in runs[0]["policies"] or b not in runs[0]["policies"]:
            continue
        diffs = paired_differences(
            [run["policies"][a]["gold_per_prompt"] for run in runs],
            [run["policies"][b]["gold_per_prompt"] for run in runs],
        )
        result = bootstrap_interval(diffs)
        lines.append(
            f"| {label} | {a} | {b} | {result.mean:+.3f} | [{result.low:+.3f}, {result.high:+.3f}] | "
            f"{result.units} | {verdict(result, sign)} |"
        )
    return [*lines, ""]


def _curve_stats(runs: list[dict], name: str) -> tuple[list[float], list[float], list[float]]:
    """x (fraction of the method's training batches), mean and std of the gold reward over seeds."""
    histories = [run["curves"][name] for run in runs]
    length = min(len(h) for h in histories)
    last = max(histories[0][length - 1]["batch"], 1)
    xs = [histories[0][i]["batch"] / last for i in range(length)]
    values = [[h[i]["reward"] for h in histories] for i in range(length)]
    means = [statistics.fmean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return xs, means, stds


def plot_curves(report: dict, path: Path) -> None:
    """Gold reward against training progress, one line per method (mean over seeds, band = ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    groups = (
        ("DPO family", ("dpo", "dpo_sft", "dpo_iter")),
        ("PPO ablations", tuple(m for m in METHODS if m.startswith("ppo"))),
    )
    sft = report["summary"]["sft"]["gold_reward"]["mean"]
    for ax, (title, names) in zip(axes, groups, strict=True):
        names = [name for name in names if name in report["runs"][0]["curves"]]
        for name in names:
            xs, means, stds = _curve_stats(report["runs"], name)
            ax.plot(xs, means, marker="o", markersize=3, label=name)
            ax.fill_between(
                xs,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                alpha=0.15,
            )
        ax.axhline(sft, color="grey", linestyle=":", label="SFT (final eval)")
        ax.set_title(title)
        ax.set_xlabel("training progress (fraction of the method's training batches)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"gold reward ({report['settings']['curve_prompts']} held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shift(report: dict, path: Path) -> None:
    """Final gold reward of SFT, DPO and PPO against the preference data's behaviour shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    shifts = list(report["shift_summary"])
    xs = [float(s) for s in shifts]
    for name in SHIFT_METHODS:
        means = [report["shift_summary"][s][name]["mean"] for s in shifts]
        stds = [report["shift_summary"][s][name]["std"] for s in shifts]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xlabel("behaviour shift of the preference data (0 = the SFT distribution)")
    ax.set_ylabel("gold reward (held-out prompts)")
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
