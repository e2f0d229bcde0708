"""Advantage estimators against hand-worked numbers and float64 loops; REINFORCE++ over 2 gloo ranks."""

import math

import pytest
import torch

from lightning_rlhf.ops import gae
from lightning_rlhf.rollout.advantages import (
    GAE,
    GRPO,
    RLOO,
    REINFORCEPlusPlus,
    discounted_returns,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    sequence_to_tokens,
)
from tests.gloo import run_on_two_gloo_ranks


def test_grpo_hand_worked():
    """Group (1, 2, 3): mean 2, sample std 1 -> (-1, 0, 1)/(1+eps); group (5, 5, 5): std 0 -> zeros."""
    out = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, eps=1e-4)
    torch.testing.assert_close(
        out, torch.tensor([-1, 0, 1, 0, 0, 0.0]) / torch.tensor([1 + 1e-4] * 3 + [1] * 3)
    )
    dr = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scale_rewards=False)
    torch.testing.assert_close(dr, torch.tensor([-1, 0, 1, 0, 0, 0.0]))


def test_rloo_hand_worked():
    """(1, 2, 3): 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5 (= 3/2 x the centred values)."""
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0, 1.5])
    )
    with pytest.raises(ValueError, match="at least 2 responses"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 3)


def test_discounted_returns_hand_worked():
    """r = (1, 0, 2 | pad), gamma 0.5: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5; padding stays 0."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), torch.tensor([[1.5, 1.0, 2.0, 0.0]]))


def loop_references(scores, group_size):
    """float64 loops of the group estimators."""
    s = [float(x) for x in scores]
    grpo, rloo = [], []
    for g in range(0, len(s), group_size):
        group = s[g : g + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        for x in group:
            grpo.append((x - mean) / (std + 1e-4))
            rloo.append(x - (sum(group) - x) / (len(group) - 1))
    return torch.tensor(grpo, dtype=torch.float64), torch.tensor(rloo, dtype=torch.float64)


def test_group_estimators_match_float64_loops():
    torch.manual_seed(0)
    scores = torch.randn(24)
    grpo, rloo = loop_references(scores, 4)
    torch.testing.assert_close(grpo_advantages(scores, 4).double(), grpo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rloo_advantages(scores, 4).double(), rloo, atol=1e-5, rtol=1e-5)


def test_reinforce_plus_plus_matches_a_float64_loop():
    torch.manual_seed(1)
    rewards, mask = torch.randn(5, 7), (torch.rand(5, 7) > 0.2).int()
    mask[:, 0] = 1
    mask = torch.cumprod(mask, 1)  # right-padded
    rows = []
    for b in range(5):
        g, row = 0.0, [0.0] * 7
        for t in reversed(range(7)):
            if mask[b, t]:
                g = float(rewards[b, t]) + 0.9 * g
                row[t] = g
        rows.append(row)
    values = [rows[b][t] for b in range(5) for t in range(7) if mask[b, t]]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    expected = torch.tensor(
        [[(rows[b][t] - mean) / std if mask[b, t] else 0.0 for t in range(7)] for b in range(5)],
        dtype=torch.float64,
    )
    out = reinforce_plus_plus_advantages(rewards, mask, gamma=0.9)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_estimator_objects_use_the_sequence_return_score_minus_kl():
    """Token rewards (-0.1 KL each, score on the last token): return = score - 0.1 x tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    rewards = -0.1 * mask.float()
    last = mask.sum(1) - 1
    rewards[torch.arange(4), last] += scores
    returns = torch.tensor([0.8, -0.3, 1.9, 1.7])
    kwargs = {"rewards": rewards, "values": None, "mask": mask, "scores": scores, "group_size": 2}
    adv, _ = GRPO(scale_rewards=False)(**kwargs, gamma=1.0, lam=1.0)
    torch.testing.assert_close(
        adv, sequence_to_tokens(grpo_advantages(returns, 2, scale_rewards=False), mask)
    )
    torch.testing.assert_close(adv[0], torch.tensor([0.55, 0.55, 0.0]))  # 0.8 - (0.8 - 0.3) / 2
    adv, _ = RLOO()(**kwargs, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.1, -1.1, 0.2, -0.2]))
    values = torch.randn(4, 3)
    adv, ret = GAE()(**{**kwargs, "values": values}, gamma=0.9, lam=0.8)
    ref = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close((adv, ret), ref)
    assert GAE.needs_critic and not GRPO().needs_critic and not RLOO.needs_critic


def test_reinforce_baseline_subtracts_the_group_mean_score():
    """baseline=True: scores (1, 3) -> (-1, 1) before the returns; with no KL the whitened returns of the
    last tokens are then what plain REINFORCE++ gives for scores centred by hand."""
    mask = torch.tensor([[1, 1], [1, 1]])
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    kwargs = {"values": None, "mask": mask, "scores": torch.tensor([1.0, 3.0]), "group_size": 2}
    with_baseline, _ = REINFORCEPlusPlus(baseline=True)(rewards=rewards, **kwargs, gamma=1.0, lam=1.0)
    centred = torch.tensor([[0.0, -1.0], [0.0, 1.0]])
    by_hand = reinforce_plus_plus_advantages(centred, mask)
    torch.testing.assert_close(with_baseline, by_hand)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        REINFORCEPlusPlus(baseline=True)(rewards=rewards, **{**kwargs, "group_size": 1}, gamma=1.0, lam=1.0)


def _two_rank_whitening(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(3)
    rewards, mask = torch.randn(6, 5), torch.ones(6, 5, dtype=torch.int64)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    whole = reinforce_plus_plus_advantages(rewards, mask, gamma=0.95, all_reduce=False)
    mine = slice(0, 3) if rank == 0 else slice(3, 6)
    split = reinforce_plus_plus_advantages(rewards[mine], mask[mine], gamma=0.95)
    torch.testing.assert_close(split, whole[mine], atol=1e-6, rtol=1e-6)
    # Groups live on one rank: each rank's GRPO equals the single-process result on its rows.
    torch.testing.assert_close(grpo_advantages(rewards[mine, 0], 3), grpo_advantages(rewards[:, 0], 3)[mine])
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    run_on_two_gloo_ranks(_two_rank_whitening, tmp_path)


def test_loss_aggregations_hand_worked():
    """losses (1, 2, 3 | 4), lengths 3 and 1: token mean 10/4 = 2.5; sequence mean (6/3 + 4/1)/2 = 3;
    constant-length sum with L = 4: (6/4 + 4/4)/2 = 1.25. Padding (9s) never counts."""
    from lightning_rlhf.losses import aggregate_token_losses

    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate_token_losses(losses, mask, "token_mean")) == pytest.approx(2.5)
    assert float(aggregate_token_losses(losses, mask, "sequence_mean")) == pytest.approx(3.0)
    assert float(aggregate_token_losses(losses, mask, "constant_length_sum", max_length=4)) == pytest.approx(
        1.25
    )
    with pytest.raises(ValueError, match="needs max_length"):
        aggregate_token_losses(losses, mask, "constant_length_sum")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_token_losses(losses, mask, "sum")
