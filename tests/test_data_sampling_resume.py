"""Resumable samplers: a loader's saved position restores the rest of the epoch exactly, and the next epoch
is unaffected (unit level; tests/test_kill_resume.py checks it through Lightning with real crashes)."""

import pytest

from lightning_rlhf.data.sampling import LengthGroupedSampler, ResumableDataLoader, SeededRandomSampler


def samplers():
    return [SeededRandomSampler(10, seed=3), LengthGroupedSampler([5, 1, 4, 2, 8, 7, 3, 3, 9, 6], 3, seed=3)]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("taken", [0, 1, 3, 4])
def test_saved_position_resumes_the_epoch_exactly(which, taken):
    full = ResumableDataLoader(list(range(10)), batch_size=3, sampler=samplers()[which])
    epoch0, epoch1 = [b.tolist() for b in full], [b.tolist() for b in full]
    assert sorted(sum(epoch0, [])) == list(range(10)) and epoch0 != epoch1  # every row once, new order

    crashed = ResumableDataLoader(list(range(10)), batch_size=3, sampler=samplers()[which])
    iterator = iter(crashed)
    seen = [next(iterator).tolist() for _ in range(taken)]
    state = crashed.state_dict()
    assert state == {"epoch": 0, "position": min(3 * taken, 10)}

    resumed = ResumableDataLoader(list(range(10)), batch_size=3, sampler=samplers()[which])
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # saved again before it iterates: the position is kept
    rest = [b.tolist() for b in resumed]
    assert seen + rest == epoch0
    # A checkpoint taken after the resume counts from the epoch's start, not from the resume point.
    assert resumed.state_dict() == {"epoch": 0, "position": 10}
    assert [b.tolist() for b in resumed] == epoch1


def test_a_saved_position_of_another_epoch_is_ignored():
    loader = ResumableDataLoader(list(range(10)), batch_size=3, sampler=SeededRandomSampler(10, seed=0))
    loader.load_state_dict({"epoch": 2, "position": 6})
    loader.sampler.set_epoch(3)  # Lightning moved on to the next epoch (the checkpoint ended epoch 2)
    assert sorted(i for b in loader for i in b.tolist()) == list(range(10))


def test_a_sampler_that_cannot_resume_warns_instead_of_repeating_silently():
    plain = ResumableDataLoader(list(range(10)), batch_size=3)  # SequentialSampler: no position to restore
    iterator = iter(plain)
    next(iterator)
    assert plain.state_dict() == {"unrestorable_batches": 1}
    with pytest.warns(UserWarning, match="the epoch restarts from its first batch"):
        ResumableDataLoader(list(range(10)), batch_size=3).load_state_dict(plain.state_dict())
