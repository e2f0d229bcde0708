"""AdvantageNormalization: hand-worked whitening over the whole rollout, and across two gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_rlhf.callbacks import AdvantageNormalization
from lightning_rlhf.rollout.types import Rollout
from tests.gloo import run_on_two_gloo_ranks


def make_rollout(advantages: torch.Tensor, mask: torch.Tensor) -> Rollout:
    """A Rollout with the given advantages and response mask; every other field is a zero placeholder."""
    n, r = advantages.shape
    zeros = torch.zeros(n, r)
    return Rollout(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        response_ids=torch.zeros(n, r, dtype=torch.long),
        response_mask=mask,
        logprobs=zeros,
        ref_logprobs=zeros,
        values=zeros,
        scores=torch.zeros(n),
        raw_scores=torch.zeros(n),
        ended=torch.ones(n, dtype=torch.bool),
        kl=zeros,
        rewards=zeros,
        advantages=advantages,
        returns=advantages + 1.0,
    )


def hand_rollout() -> Rollout:
    """Valid advantages 8, 8, 10 (row 0) and 12, 12 (row 1); padding holds junk that must not count."""
    advantages = torch.tensor([[8.0, 8.0, 10.0, -50.0], [12.0, 12.0, 99.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return make_rollout(advantages, mask)


def test_whitens_over_the_whole_rollout_hand_worked() -> None:
    """Valid values [8, 8, 10, 12, 12]: mean 10, deviations [-2, -2, 0, 2, 2], unbiased var 16 / 4 = 4.

    Whitened over the whole batch: (x - 10) / 2 = [-1, -1, 0, 1, 1] (per row it would differ: row 0 alone
    has mean 26/3). Padding becomes 0. Returns (value targets) are left as they were.
    """
    rollout = hand_rollout()
    returns = rollout.returns.clone()
    AdvantageNormalization().on_rollout_end(None, None, rollout)
    expected = torch.tensor([[-1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rollout.advantages, expected, atol=1e-6, rtol=0)
    assert rollout.advantages.dtype == torch.float32
    assert torch.equal(rollout.returns, returns)


def test_shift_mean_false_and_eps_hand_worked() -> None:
    """shift_mean=False adds the mean back: [-1, -1, 0, 1, 1] + 10 = [9, 9, 10, 11, 11].
    eps=12 enters under the root: (x - 10) / sqrt(4 + 12) = (x - 10) / 4 = [-0.5, -0.5, 0, 0.5, 0.5]."""
    rollout = hand_rollout()
    AdvantageNormalization(shift_mean=False).on_rollout_end(None, None, rollout)
    torch.testing.assert_close(
        rollout.advantages, torch.tensor([[9.0, 9.0, 10.0, 0.0], [11.0, 11.0, 0.0, 0.0]]), atol=1e-6, rtol=0
    )
    rollout = hand_rollout()
    AdvantageNormalization(eps=12.0).on_rollout_end(None, None, rollout)
    torch.testing.assert_close(
        rollout.advantages, torch.tensor([[-0.5, -0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]), atol=1e-6, rtol=0
    )


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="eps must be > 0"):
        AdvantageNormalization(eps=0.0)
    with pytest.raises(TypeError, match="shift_mean must be a bool"):
        AdvantageNormalization(shift_mean="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- two gloo ranks

_RANK0_ROWS = 2  # rank 0 gets rows [0, 2) (9 valid tokens), rank 1 rows [2, 5) (6 valid tokens)
_LENGTHS = [6, 3, 0, 5, 1]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    advantages = torch.randn(5, 6, generator=gen) * 3.0 + 1.5
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in _LENGTHS])
    return advantages, mask


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        advantages, mask = _batch()
        rows = slice(0, _RANK0_ROWS) if rank == 0 else slice(_RANK0_ROWS, None)
        out = {}
        for shift_mean in (True, False):
            rollout = make_rollout(advantages[rows].clone(), mask[rows])
            AdvantageNormalization(shift_mean=shift_mean).on_rollout_end(None, None, rollout)
            out[shift_mean] = rollout.advantages
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    run_on_two_gloo_ranks(_worker, tmp_path)

    advantages, mask = _batch()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Naive float64 reference over the 15 valid tokens of the whole batch.
    valid = advantages.double()[mask.bool()]
    mean, std = valid.mean(), valid.std(unbiased=True)
    for shift_mean in (True, False):
        single = make_rollout(advantages.clone(), mask)
        AdvantageNormalization(shift_mean=shift_mean).on_rollout_end(None, None, single)
        joined = torch.cat([ranks[0][shift_mean], ranks[1][shift_mean]])
        torch.testing.assert_close(joined, single.advantages, atol=1e-6, rtol=0)
        naive = (advantages.double() - mean) / std + (0.0 if shift_mean else mean)
        naive = torch.where(mask.bool(), naive, torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(joined.double(), naive, atol=1e-6, rtol=0)
    # Whitened per rank instead, rank 0's values would differ: the statistics really were global.
    local = make_rollout(advantages[:_RANK0_ROWS].clone(), mask[:_RANK0_ROWS])
    AdvantageNormalization().on_rollout_end(None, None, local)
    assert (local.advantages - ranks[0][True]).abs().max() > 0.05
