"""Paired comparisons of two study arms: per-prompt differences, a bootstrap interval and a verdict.

The decision rule (stated in the report before any number): arm B *reproduces* the paper's claim "B beats A"
only when the 95 % bootstrap interval of the mean paired difference B − A excludes 0 on the paper's side;
an interval that excludes 0 on the other side *contradicts* it; anything else is *inconclusive*.

Units are (seed, held-out prompt) pairs: both arms of a seed start from the same SFT policy and are scored on
the same prompts with the same sampling seed, so their difference on a prompt removes the prompt's own
difficulty. The bootstrap resamples prompts within each seed (every seed keeps its prompt count), so the
interval covers prompt-sampling noise; with several seeds it also averages over their training noise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"


@dataclass(frozen=True)
class PairedResult:
    """Mean of the paired differences B − A over all units and its bootstrap interval."""

    mean: float
    low: float
    high: float
    units: int


def paired_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[list[float]]:
    """``b − a`` unit by unit, per seed: ``a[s][i]`` is arm A's score of prompt ``i`` in seed ``s``."""
    if len(a) != len(b):
        raise ValueError(f"paired_differences: {len(a)} seeds of arm A but {len(b)} of arm B")
    out = []
    for seed, (xs, ys) in enumerate(zip(a, b, strict=True)):
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"paired_differences: seed {seed} has {len(xs)} prompts in A and {len(ys)} in B")
        out.append([y - x for x, y in zip(xs, ys, strict=True)])
    return out


def _mean(groups: Sequence[Sequence[float]]) -> float:
    return sum(sum(g) for g in groups) / sum(len(g) for g in groups)


def bootstrap_interval(
    differences: Sequence[Sequence[float]], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> PairedResult:
    """Percentile bootstrap of the mean difference, resampling prompts with replacement within each seed."""
    if not differences or any(not d for d in differences):
        raise ValueError("bootstrap_interval needs at least one prompt in every seed")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(
            f"bootstrap_interval: need 0 < level < 1 and resamples >= 1 (got {level}, {resamples})"
        )
    rng = random.Random(seed)
    means = sorted(
        _mean([[d[rng.randrange(len(d))] for _ in d] for d in differences]) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    low = means[int(tail * (resamples - 1) + 0.5)]
    high = means[int((1 - tail) * (resamples - 1) + 0.5)]
    return PairedResult(_mean(differences), low, high, sum(len(d) for d in differences))


def verdict(result: PairedResult, paper_sign: int) -> str:
    """The decision rule of the module docstring; ``paper_sign`` is +1 when the paper finds B > A."""
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 or -1 (got {paper_sign})")
    if result.low > 0 or result.high < 0:
        return REPRODUCED if (result.low > 0) == (paper_sign > 0) else CONTRADICTED
    return INCONCLUSIVE
