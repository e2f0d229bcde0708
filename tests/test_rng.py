"""Which RNG state each rank restores from a checkpoint (unit level; tests/test_kill_resume_ranks.py checks
exact resumes on 2 ranks through Lightning, with real crashes)."""

import warnings

import pytest
import torch

from lightning_rlhf import SFTModule
from lightning_rlhf.modules.rng import (
    collect_rng_states,
    gather_rng_states,
    rng_state_for_rank,
    set_rng_states,
)


def states(n: int) -> list[dict]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(collect_rng_states())
    return out


def test_each_rank_takes_its_own_state():
    saved = {"rng": states(1)[0], "rng_per_rank": states(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picked = [rng_state_for_rank(saved, rank, 3) for rank in range(3)]
    for rank, state in enumerate(picked):
        assert torch.equal(state["torch"], saved["rng_per_rank"][rank]["torch"])
    set_rng_states(picked[2])
    torch.manual_seed(2)
    expected = torch.rand(3)
    set_rng_states(picked[2])
    assert torch.equal(torch.rand(3), expected)


def test_another_number_of_ranks_warns_and_cycles_through_the_saved_states():
    saved = {"rng_per_rank": states(2)}
    with pytest.warns(
        UserWarning, match="states of 2 rank.*resumes on 3: rank r restores the state of rank r % 2"
    ):
        third = rng_state_for_rank(saved, 2, 3)
    assert torch.equal(third["torch"], saved["rng_per_rank"][0]["torch"])


def test_a_checkpoint_with_one_state_still_loads():
    """Checkpoints written before rng_per_rank: every rank restores the one state (with a warning on several
    ranks, whose draws cannot match the uninterrupted run); none at all gives None."""
    (only,) = states(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rng_state_for_rank({"rng": only}, 0, 1) is only
        assert rng_state_for_rank({}, 1, 2) is None
    with pytest.warns(UserWarning, match="RNG state of one rank only"):
        assert rng_state_for_rank({"rng": only}, 1, 2) is only


def test_without_a_process_group_the_gather_is_this_rank_alone():
    (only,) = states(1)
    assert gather_rng_states(only, 1) == [only]
    assert gather_rng_states(only, 2) == [only]  # no process group initialised in this process


def test_a_checkpoint_saved_during_validation_holds_the_state_training_goes_on_with():
    """ModelCheckpoint's on_validation_end runs before the module's, which puts the training state back: a
    checkpoint saved there must hold that state, not the one validation's sampling moved on to."""
    module = SFTModule("unused-model")
    torch.manual_seed(5)
    module.on_validation_start()
    training = torch.get_rng_state()
    torch.rand(7)  # validation draws
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["lightning_rlhf_state"]
    assert torch.equal(state["rng_per_rank"][0]["torch"], training)
    assert torch.equal(state["rng"]["torch"], training)
    module.on_validation_end()
    assert torch.equal(torch.get_rng_state(), training)
