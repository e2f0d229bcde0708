"""Score policies on the program testbed's held-out prompts: pass@k and n@k per difficulty tier.

Sampling and scoring are :func:`lightning_rlhf.evaluate.evaluate`'s (the ``lightning-rlhf evaluate``
command), with the in-process :class:`~lightning_rlhf.testbed.programs.ProgramReward` as the test-case
scorer; this module only splits its samples by the rows' ``tier`` column and summarizes each tier.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from lightning_rlhf.evaluate import PolicySamples, evaluate, parse_n_at_k, summarize
from lightning_rlhf.metrics import pass_at_k
from lightning_rlhf.rollout.generation import SamplingConfig
from lightning_rlhf.testbed.programs import TIERS, ProgramReward

PROGRAM_SAMPLING = SamplingConfig(max_new_tokens=10, temperature=1.0)
"""How the program testbed samples (evaluation and RL): temperature 1, at most 10 tokens (8 ops + EOS)."""

SCORER = "tests"


def _subset(policy: PolicySamples, prompts: Sequence[int], k: int) -> PolicySamples:
    """The samples of the prompts at ``prompts`` (prompt-major, ``k`` per prompt)."""
    index = [p * k + j for p in prompts for j in range(k)]
    pick = lambda values: [values[i] for i in index]  # noqa: E731
    return replace(
        policy,
        responses=pick(policy.responses),
        ended=pick(policy.ended),
        lengths=pick(policy.lengths),
        scores={name: pick(values) for name, values in policy.scores.items()},
        submissions=None if policy.submissions is None else pick(policy.submissions),
    )


def sample_programs(
    policies: Mapping[str, str],
    prompts_file: str,
    *,
    num_samples: int = 64,
    n_at_k: Sequence[str] = ("10@64",),
    sampling: SamplingConfig = PROGRAM_SAMPLING,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[PolicySamples], list[str]]:
    """Each policy's ``num_samples`` programs per row of ``prompts_file`` scored by the hidden tests (with
    n@k submissions when ``n_at_k`` is not empty), and every row's tier."""
    names = list(policies)
    _, found, rendered = evaluate(
        [policies[n] for n in names],
        prompts_file,
        reward_functions={SCORER: ProgramReward()},
        num_samples=num_samples,
        n_at_k=n_at_k,
        submission_scorer=SCORER,
        sampling=sampling,
        columns=["tests", "public_tests", "tier"],
        apply_chat_template=False,
        batch_size=256,
        seed=seed,
        progress=progress,
    )
    samples = [replace(policy, name=name) for name, policy in zip(names, found, strict=True)]
    tiers = _row_tiers(prompts_file)
    if len(tiers) != len(rendered):
        raise ValueError(
            f"{prompts_file}: {len(tiers)} rows but {len(rendered)} prompts were evaluated "
            "(rows were dropped; see the log above)"
        )
    return samples, tiers


def evaluate_programs(
    policies: Mapping[str, str],
    prompts_file: str,
    *,
    num_samples: int = 64,
    pass_k: Sequence[int] = (1, 5, 10),
    n_at_k: Sequence[str] = ("10@64",),
    sampling: SamplingConfig = PROGRAM_SAMPLING,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{policy name: {tier: {"pass@1": .., "10@64": .., "eos_rate": .., "prompts": n}}}`` plus an
    ``"all"`` tier, for the policy folders in ``policies`` (name -> folder) on ``prompts_file``'s rows
    (which need ``tests``, ``public_tests`` and ``tier`` columns, as the testbed writes them)."""
    samples, tiers = sample_programs(
        policies,
        prompts_file,
        num_samples=num_samples,
        n_at_k=n_at_k,
        sampling=sampling,
        seed=seed,
        progress=progress,
    )
    return tier_report(samples, tiers, num_samples=num_samples, pass_k=pass_k, n_at_k=n_at_k)


def per_prompt_pass_at_k(policy: PolicySamples, num_samples: int, k: int) -> list[float]:
    """The unbiased pass@k of each prompt (``num_samples`` samples per prompt, prompt-major)."""
    values = policy.scores[SCORER]
    threshold = ProgramReward().pass_score
    return [
        pass_at_k(num_samples, sum(v >= threshold for v in values[i : i + num_samples]), k)
        for i in range(0, len(values), num_samples)
    ]


def submission_rates(policy: PolicySamples) -> dict[str, float]:
    """``parse_rate`` (samples that parse as a program) and ``false_positive_rate`` (samples that pass the
    public examples but fail the hidden tests), each a share of all samples; needs ``submissions``."""
    subs = policy.submissions or []
    n = max(len(subs), 1)
    return {
        "parse_rate": sum(s.cluster is not None for s in subs) / n,
        "false_positive_rate": sum(s.passes_public and not s.passes_hidden for s in subs) / n,
    }


def tier_report(
    samples: Sequence[PolicySamples],
    tiers: Sequence[str],
    *,
    num_samples: int,
    pass_k: Sequence[int],
    n_at_k: Sequence[str] = (),
) -> dict[str, dict[str, dict[str, float]]]:
    """Pure: :func:`~lightning_rlhf.evaluate.summarize` of each tier's prompts (``tiers[i]`` is prompt i's
    tier) and of all of them (``"all"``), keyed by policy name then tier; tiers in :data:`TIERS` order."""
    groups = {tier: [i for i, t in enumerate(tiers) if t == tier] for tier in TIERS}
    groups = {tier: rows for tier, rows in groups.items() if rows}
    groups["all"] = list(range(len(tiers)))
    report: dict[str, dict[str, dict[str, float]]] = {s.name: {} for s in samples}
    for tier, rows in groups.items():
        summary = summarize(
            [_subset(s, rows, num_samples) for s in samples],
            num_samples=num_samples,
            pass_k=pass_k,
            pass_scorer=SCORER,
            pass_threshold=ProgramReward().pass_score,
            n_at_k_pairs=parse_n_at_k(n_at_k, num_samples),
        )
        for policy, row in zip(samples, summary, strict=True):
            metrics = {k: float(v) for k, v in row.items() if k != "policy" and not k.startswith("score/")}
            if policy.submissions is not None:
                metrics.update(submission_rates(_subset(policy, rows, num_samples)))
            report[policy.name][tier] = {**metrics, "prompts": float(len(rows))}
    return report


def _row_tiers(prompts_file: str) -> list[str]:
    rows = [json.loads(line) for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line]
    return [str(r.get("tier", "")) for r in rows]


def format_tier_table(report: Mapping[str, Mapping[str, Mapping[str, float]]], columns: Sequence[str]) -> str:
    """A plain-text table: one line per policy and tier with the named metric columns (percent)."""
    head = f"{'policy':<10}{'tier':<13}" + "".join(f"{c:>9}" for c in columns)
    lines = [head]
    for name, tiers in report.items():
        for tier, metrics in tiers.items():
            cells = "".join(f"{100 * metrics[c]:>8.1f}%" for c in columns)
            lines.append(f"{name:<10}{tier:<13}{cells}")
    return "\n".join(lines)
