"""Resumable samplers: a loader's saved position restores the rest of the epoch exactly, and the next epoch
is unaffected (unit level; tests/test_kill_resume.py checks it through Lightning with real crashes)."""

import pytest

from lightning_rlhf.data.sampling import (
    LengthGroupedSampler,
    ResumableDataLoader,
    SeededRandomSampler,
    ShardedResumableSampler,
)


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


def sharded(which: int, world: int) -> list[ShardedResumableSampler]:
    return [ShardedResumableSampler(samplers()[which], num_replicas=world, rank=r) for r in range(world)]


@pytest.mark.parametrize("which", [0, 1])
def test_ranks_take_strided_shares_of_the_sampler_order(which):
    """Rank r takes positions r, r + 3, ... of the sampler's own order (Lightning's wrapper would shuffle it
    again): 10 indices on 3 ranks are 4 each, the first two repeated at the end as DistributedSampler pads."""
    order = samplers()[which].order(0)
    shares = [list(s) for s in sharded(which, 3)]
    padded = order + order[:2]
    assert shares == [padded[0::3], padded[1::3], padded[2::3]]
    assert [list(s) for s in sharded(which, 3)][0] == shares[0]  # a fresh sampler: the same epoch 0
    second = sharded(which, 3)
    for s in second:
        s.set_epoch(1)
    assert [list(s) for s in second][0] == (samplers()[which].order(1) + samplers()[which].order(1)[:2])[0::3]


def test_length_grouped_batches_stay_grouped_across_ranks():
    """With num_replicas = W, each step's W local batches come from one length-sorted global batch."""
    lengths = list(range(40))

    def base():
        return LengthGroupedSampler(lengths, 2, seed=0, num_replicas=2, mega_batch_factor=1)

    global_batches = base().batches(0)
    ranks = [
        ResumableDataLoader(lengths, batch_size=2, sampler=ShardedResumableSampler(base(), 2, r))
        for r in range(2)
    ]
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert sorted(a.tolist() + b.tolist()) == sorted(global_batches[step])


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("taken", [0, 1, 2])
def test_rank_zeros_saved_position_resumes_every_rank_exactly(which, taken):
    """Batches of 2 on 2 ranks: 5 indices each, 3 batches (the last short). Rank 0's loader state (the one a
    checkpoint holds) restores both ranks; a later state counts from the epoch's start."""

    def loaders():
        return [ResumableDataLoader(list(range(10)), batch_size=2, sampler=s) for s in sharded(which, 2)]

    full = [[b.tolist() for b in loader] for loader in loaders()]
    crashed = loaders()
    iterators = [iter(loader) for loader in crashed]
    seen = [[next(it).tolist() for _ in range(taken)] for it in iterators]
    state = crashed[0].state_dict()
    assert state == crashed[1].state_dict() == {"epoch": 0, "position": 4 * taken, "num_replicas": 2}

    resumed = loaders()
    for loader in resumed:
        loader.load_state_dict(state)
    rest = [[b.tolist() for b in loader] for loader in resumed]
    assert [s + r for s, r in zip(seen, rest, strict=True)] == full
    assert resumed[0].state_dict() == {"epoch": 0, "position": 10, "num_replicas": 2}
    ended = loaders()
    for loader in ended:
        loader.load_state_dict(resumed[0].state_dict())
    assert [list(loader) for loader in ended] == [[], []]  # saved at the epoch's end: nothing left


def test_a_position_saved_on_other_ranks_repeats_rather_than_skips():
    one_rank = ResumableDataLoader(list(range(10)), batch_size=3, sampler=SeededRandomSampler(10, seed=3))
    next(iter(one_rank))
    state = one_rank.state_dict()  # 3 indices used: not a multiple of 2 ranks
    resumed = [ResumableDataLoader(list(range(10)), batch_size=3, sampler=s) for s in sharded(0, 2)]
    with pytest.warns(UserWarning, match="from position 2 of its order instead of 3, so 1 sample"):
        for loader in resumed:
            loader.load_state_dict(state)
    order = SeededRandomSampler(10, seed=3).order(0)
    assert [i for loader in resumed for b in loader for i in b.tolist()] == order[2::2] + order[3::2]
