"""Evaluation metrics as pure functions: pass@k, n@k (the paper's 10@1k) and win rate.

Each takes plain Python numbers / lists, so it can be checked by hand and against brute force.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement from the n
    include a correct one. Computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge
    binomials (n = 1000, k = 100 stays exact to float precision).
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers (got n={n!r}, c={c!r}, k={k!r})")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n (got c={c}, n={n})")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (got k={k}, n={n}); sample at least k responses")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(samples: Sequence[int], correct: Sequence[int], k: int) -> float:
    """Mean pass@k over problems: ``samples[i]`` responses to problem i, ``correct[i]`` of them correct."""
    if len(samples) != len(correct):
        raise ValueError(f"mean_pass_at_k: {len(samples)} sample counts but {len(correct)} correct counts")
    if not samples:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(n, c, k) for n, c in zip(samples, correct, strict=True)) / len(samples)


class Submission(NamedTuple):
    """One sampled program as n@k sees it."""

    passes_public: bool
    """It passes the examples shown in the problem statement (filtering)."""
    cluster: Hashable
    """Its behaviour on extra inputs, e.g. the tuple of its outputs (programs that agree share a cluster)."""
    passes_hidden: bool
    """It passes the hidden tests (what decides whether the problem is solved)."""


def solved_at(submissions: Sequence[Submission], n: int) -> bool:
    """AlphaCode's n@k for one problem, given its k samples in sampling order.

    Keep the samples that pass the public tests; group them by ``cluster``; submit one representative (the
    first sampled) from each of the ``n`` largest clusters (ties: the cluster sampled first); the problem
    is solved if any submission passes the hidden tests.
    """
    if n < 1:
        raise ValueError(f"n@k: n must be >= 1 (got {n})")
    clusters: dict[Hashable, list[Submission]] = {}
    for s in submissions:
        if s.passes_public:
            clusters.setdefault(s.cluster, []).append(s)
    # dicts keep insertion order and sorted() is stable: equal sizes stay in first-sampled order
    largest = sorted(clusters.values(), key=len, reverse=True)[:n]
    return any(members[0].passes_hidden for members in largest)


def n_at_k(problems: Sequence[Sequence[Submission]], n: int, k: int) -> float:
    """Share of problems solved by n submissions chosen from the first ``k`` samples of each (n@k)."""
    if not problems:
        raise ValueError("n_at_k: no problems")
    if k < n:
        raise ValueError(f"n_at_k: k ({k}) must be >= n ({n}): n submissions are chosen from k samples")
    short = [i for i, p in enumerate(problems) if len(p) < k]
    if short:
        raise ValueError(
            f"n_at_k: problem {short[0]} has {len(problems[short[0]])} samples, fewer than k={k}; "
            "sample at least k responses per problem"
        )
    return sum(solved_at(p[:k], n) for p in problems) / len(problems)


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of paired responses where ``scores[i] > baseline[i]``, ties counting 1/2."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores but {len(baseline)} baseline scores")
    if not scores:
        raise ValueError("win_rate: no scores")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline, strict=True))
    return wins / len(scores)
