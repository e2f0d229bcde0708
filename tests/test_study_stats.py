"""The study's paired statistics (#18 item 2): differences, the bootstrap interval and the decision rule,
against hand-worked values and an exhaustive enumeration of every resample."""

import itertools

import pytest

from lightning_rlhf.study.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    REPRODUCED,
    PairedResult,
    bootstrap_interval,
    paired_differences,
    verdict,
)


def test_paired_differences_are_b_minus_a_per_seed_and_shapes_are_checked():
    assert paired_differences([[1.0, 2.0], [0.0]], [[1.5, 1.0], [2.0]]) == [[0.5, -1.0], [2.0]]
    with pytest.raises(ValueError, match="seed 1 has 1 prompts in A and 2 in B"):
        paired_differences([[1.0], [0.0]], [[1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="2 seeds of arm A but 1 of arm B"):
        paired_differences([[1.0], [0.0]], [[1.0]])


def test_a_constant_difference_has_a_point_interval():
    result = bootstrap_interval([[0.25] * 5, [0.25] * 3])
    assert result == PairedResult(0.25, 0.25, 0.25, 8)


def _exhaustive_quantiles(differences, level=0.95):
    """Every resample (each seed's prompts drawn with replacement), each equally likely: exact quantiles."""
    per_seed = [list(itertools.product(d, repeat=len(d))) for d in differences]
    means = sorted(
        sum(sum(draw) for draw in draws) / sum(len(d) for d in differences)
        for draws in itertools.product(*per_seed)
    )
    tail = (1 - level) / 2
    return means[int(tail * (len(means) - 1) + 0.5)], means[int((1 - tail) * (len(means) - 1) + 0.5)]


def test_the_bootstrap_interval_matches_an_exhaustive_enumeration():
    """Two seeds of 4 prompts: 4^4 x 4^4 = 65536 equally likely resamples; 20000 random ones agree on the
    2.5 % / 97.5 % quantiles to within a grid step (the mean moves in steps of 1/8 of a difference)."""
    differences = [[1.0, 0.0, 0.0, -1.0], [2.0, 1.0, 0.0, 1.0]]
    low, high = _exhaustive_quantiles(differences)
    result = bootstrap_interval(differences, resamples=20000, seed=3)
    assert result.mean == pytest.approx(0.5) and result.units == 8
    assert abs(result.low - low) <= 0.125 + 1e-12 and abs(result.high - high) <= 0.125 + 1e-12
    assert result.low < result.mean < result.high
    assert bootstrap_interval(differences, seed=3) == bootstrap_interval(differences, seed=3)  # seeded


def test_the_decision_rule():
    assert verdict(PairedResult(0.2, 0.05, 0.3, 10), paper_sign=1) == REPRODUCED
    assert verdict(PairedResult(-0.2, -0.3, -0.05, 10), paper_sign=1) == CONTRADICTED
    assert verdict(PairedResult(-0.2, -0.3, -0.05, 10), paper_sign=-1) == REPRODUCED
    assert verdict(PairedResult(0.1, -0.01, 0.3, 10), paper_sign=1) == INCONCLUSIVE
    assert (
        verdict(PairedResult(0.0, 0.0, 0.2, 10), paper_sign=1) == INCONCLUSIVE
    )  # touching 0 is not excluding
    with pytest.raises(ValueError, match="paper_sign must be"):
        verdict(PairedResult(0, 0, 0, 1), paper_sign=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        bootstrap_interval([[1.0], []])
