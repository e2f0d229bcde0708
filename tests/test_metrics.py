"""pass@k, n@k and win rate against hand-worked values and brute force."""

import itertools
import math
import random

import pytest

from lightning_rlhf.metrics import Submission, mean_pass_at_k, n_at_k, pass_at_k, solved_at, win_rate


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n samples (the first c correct) and count those holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_worked():
    """n=5, c=2, k=2: C(3,2)/C(5,2) = 3/10 of pairs miss both correct ones -> 0.7.
    n=4, c=1, k=1: 1/4. n=10, c=0: 0. n=3, c=2, k=2: only 1 wrong sample, every pair has a correct one: 1."""
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0
    assert pass_at_k(7, 7, 7) == 1.0


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_at_n_1000():
    """Against exact integer binomials (Python ints do not overflow) for the paper's 1k samples."""
    for c, k in [(1, 1), (3, 10), (17, 100), (500, 1000), (2, 999)]:
        exact = 1 - math.comb(1000 - c, k) / math.comb(1000, k)
        assert pass_at_k(1000, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="need 1 <= k <= n .got k=5, n=4.; sample at least k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)
    assert mean_pass_at_k([5, 4], [2, 1], 1) == pytest.approx((0.4 + 0.25) / 2)
    with pytest.raises(ValueError, match="2 sample counts but 1 correct"):
        mean_pass_at_k([5, 4], [2], 1)


def s(public, cluster, hidden):
    return Submission(public, cluster, hidden)


def test_n_at_k_hand_worked():
    """Problem 0: clusters among public-passing samples: A (3 samples, wrong on hidden), B (2, right), C (1).
    1@k submits A only -> unsolved; 2@k submits A and B -> solved.
    Problem 1: the only hidden-passing sample fails the public tests: never submitted -> unsolved.
    Problem 2: tie of sizes between D (first) and E: 1@k submits D (right) -> solved."""
    p0 = [
        s(True, "A", False),
        s(True, "B", True),
        s(False, "Z", True),
        s(True, "A", False),
        s(True, "B", True),
        s(True, "A", False),
        s(True, "C", True),
    ]
    p1 = [
        s(False, "X", True),
        s(True, "Y", False),
        s(True, "Y", False),
        s(True, "W", False),
        s(True, "Y", False),
        s(True, "W", False),
        s(True, "V", False),
    ]
    p2 = [
        s(True, "D", True),
        s(True, "E", False),
        s(True, "D", True),
        s(True, "E", False),
        s(False, "F", False),
        s(False, "F", False),
        s(False, "F", False),
    ]
    assert [solved_at(p, 1) for p in (p0, p1, p2)] == [False, False, True]
    assert [solved_at(p, 2) for p in (p0, p1, p2)] == [True, False, True]
    assert n_at_k([p0, p1, p2], n=1, k=7) == pytest.approx(1 / 3)
    assert n_at_k([p0, p1, p2], n=2, k=7) == pytest.approx(2 / 3)
    # only the first k samples count: in p0's first 2 samples, A and B are size 1; A was sampled first
    assert n_at_k([p0], n=1, k=2) == 0.0 and n_at_k([p0], n=2, k=2) == 1.0


def test_n_at_k_brute_force_when_every_cluster_is_submitted():
    """With n >= the number of clusters every public-passing cluster is submitted: solved iff some
    public-passing cluster's first sample passes hidden tests (checked on random problems)."""
    rng = random.Random(0)
    for _ in range(200):
        subs = [s(rng.random() < 0.6, rng.randrange(4), rng.random() < 0.4) for _ in range(6)]
        firsts = {}
        for x in subs:
            if x.passes_public:
                firsts.setdefault(x.cluster, x)
        assert solved_at(subs, 4) == any(x.passes_hidden for x in firsts.values())


def test_n_at_k_checks_its_arguments():
    with pytest.raises(ValueError, match="problem 0 has 1 samples, fewer than k=2"):
        n_at_k([[s(True, 0, True)]], n=1, k=2)
    with pytest.raises(ValueError, match="k .1. must be >= n .2."):
        n_at_k([[s(True, 0, True)]], n=2, k=1)


def test_win_rate_counts_ties_as_half():
    """(3 > 1) win, (2 = 2) tie, (0 < 5) loss, (4 > 3) win: (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    assert win_rate([3, 2, 0, 4], [1, 2, 5, 3]) == 0.625
    with pytest.raises(ValueError, match="2 scores but 1 baseline"):
        win_rate([1, 2], [1])
