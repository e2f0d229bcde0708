"""Seeded samplers that can resume mid-epoch, and the DataLoader that saves their position in checkpoints.

A training run killed after k batches and resumed from its last checkpoint must see exactly the batches the
uninterrupted run would have seen next: no sample twice, none skipped. Both samplers here derive an epoch's
order from ``(seed, epoch)`` alone (no generator state to carry), so the position in the epoch is all a
checkpoint needs. :class:`ResumableDataLoader` counts the batches it handed out and implements
``state_dict`` / ``load_state_dict``; Lightning (2.3+) stores that state in ``loops.fit_loop.state_dict
["combined_loader"]`` of every checkpoint and loads it back before the resumed epoch starts iterating.

Under DDP or DeepSpeed the datamodules deal each rank its share with :class:`ShardedResumableSampler`
(Lightning leaves a ``DistributedSampler`` as it is). All ranks take one batch per step, so one position in
the epoch's order describes every rank, and the checkpoint's loader state (written by rank 0) restores them
all.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence

from torch.utils.data import DataLoader, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """Base of a sampler whose epoch order is a pure function of ``(seed, epoch)``; see :meth:`order`.

    Lightning calls :meth:`set_epoch` before every epoch; without that call each new iteration moves on to
    the next epoch by itself. After :meth:`load_state_dict` the next iteration of the saved epoch starts at
    the saved position.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self._iter_epoch: int | None = None  # the epoch being (or last) iterated
        self._start = 0  # position this iteration started at (non-zero right after a resume)
        self._resume: tuple[int, int] | None = None

    def order(self, epoch: int) -> list[int]:
        """Every index once, in the order of ``epoch``."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def begin_iteration(self) -> tuple[int, int]:
        """Start iterating: the epoch and the position in its order to start at; the next call moves on."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume, self._iter_epoch, self._start = None, epoch, start
        return epoch, start

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.begin_iteration()
        yield from self.order(epoch)[start:]

    def position(self, consumed: int) -> dict[str, int]:
        """State after ``consumed`` more indices of the current iteration were used: ``{epoch, position}``."""
        if self._resume is not None:  # restored but not iterated yet: keep the restored position
            return {"epoch": self._resume[0], "position": self._resume[1]}
        if self._iter_epoch is None:
            return {"epoch": self.epoch, "position": 0}
        return {"epoch": self._iter_epoch, "position": min(self._start + consumed, len(self))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["position"]))


class SeededRandomSampler(ResumableSampler):
    """A uniform shuffle of ``range(num_samples)``, a new one each epoch, fixed by ``seed`` and the epoch."""

    def __init__(self, num_samples: int, *, seed: int = 0) -> None:
        super().__init__(seed)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[int]:
        order = list(range(self.num_samples))
        random.Random(f"shuffle-{self.seed}-{epoch}").shuffle(order)
        return order


class LengthGroupedSampler(ResumableSampler):
    """Yield indices so that each run of ``batch_size`` consecutive indices has similar lengths.

    Per epoch: shuffle all indices, cut them into mega-batches of ``mega_batch_factor * batch_size``, sort
    each mega-batch by length (longest first), split it into batches, and shuffle the order of all batches.
    Every index appears exactly once per epoch; only the final batch can be short. Sorting inside a window
    (not globally) keeps batches random enough for SGD while padding stays near the minimum.

    It is an index sampler, not a batch sampler, so Lightning can still wrap it for distributed training.
    Lightning's wrapper hands rank r the indices at positions r, r + W, r + 2W, ... (W = world size), so a
    rank's batch is drawn from W * batch_size consecutive positions: with ``num_replicas`` = W the sampler
    groups lengths in *global* batches of that size, and every rank's batch stays of similar length.
    The order depends on ``seed`` and the epoch (see :class:`ResumableSampler`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        mega_batch_factor: int = 50,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1 or mega_batch_factor < 1 or num_replicas < 1:
            raise ValueError(
                "batch_size, mega_batch_factor and num_replicas must be >= 1 "
                f"(got {batch_size}, {mega_batch_factor}, {num_replicas})"
            )
        super().__init__(seed)
        self.lengths = list(lengths)
        self.local_batch_size = batch_size
        self.num_replicas = num_replicas
        # The unit that must be length-homogeneous: one batch on every rank (see the class docstring).
        self.batch_size = batch_size * num_replicas
        self.mega_batch_factor = mega_batch_factor

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (what :meth:`__iter__` flattens)."""
        rng = random.Random(f"length-grouped-{self.seed}-{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = self.mega_batch_factor * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            mega = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches.extend(mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size))
        # Keep the one short batch (if any) last, so that a flattened stream still splits into full batches.
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return full + short

    def order(self, epoch: int) -> list[int]:
        return [i for batch in self.batches(epoch) for i in batch]


class ShardedResumableSampler(DistributedSampler):
    """One rank's share of a :class:`ResumableSampler`'s epoch, resumable mid-epoch like the sampler itself.

    Rank r of W takes positions r, r + W, r + 2W, ... of the epoch's order, padded (as ``DistributedSampler``
    pads) by repeating its first indices up to a multiple of W, so every rank gets ``ceil(n / W)`` indices.
    The datamodules use it under DDP and DeepSpeed instead of Lightning's ``DistributedSamplerWrapper``,
    which would shuffle the sampler's order again with its own seed (tearing apart the length-homogeneous
    global batches of :class:`LengthGroupedSampler`) and has no position to save. Being a
    ``DistributedSampler``, it is left as it is by Lightning.

    The saved position counts indices of the epoch's order consumed by all ranks together (``W`` x each
    rank's count: the ranks take one batch per step in lockstep), plus ``num_replicas``; the same state
    therefore restores every rank. Resumed on another number of ranks, the position is rounded down to a
    multiple of the new W: at most W - 1 indices are seen again, none is skipped, and a warning says so.
    """

    def __init__(self, sampler: ResumableSampler, num_replicas: int, rank: int) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ShardedResumableSampler needs a ResumableSampler, got {type(sampler).__name__}")
        # shuffle=False: the order is the wrapped sampler's; DistributedSampler only sizes the shares here.
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.sampler.begin_iteration()
        order = self.sampler.order(epoch)
        if start >= len(order):  # saved at the epoch's end: nothing left for any rank
            return
        padded = (order * -(-self.total_size // len(order)))[: self.total_size]
        yield from padded[start + self.rank : self.total_size : self.num_replicas]

    def position(self, consumed: int) -> dict[str, int]:
        """State after this rank used ``consumed`` more indices (every rank used as many)."""
        return {**self.sampler.position(consumed * self.num_replicas), "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position, saved_on = int(state["position"]), int(state.get("num_replicas", 1))
        if position < len(self.sampler) and position % self.num_replicas:
            kept = position - position % self.num_replicas
            warnings.warn(
                f"the checkpoint was saved mid-epoch on {saved_on} rank(s) and resumes on "
                f"{self.num_replicas}: the epoch goes on from position {kept} of its order instead of "
                f"{position}, so {position - kept} sample(s) are seen again (none is skipped).",
                stacklevel=2,
            )
            position = kept
        self.sampler.load_state_dict({"epoch": int(state["epoch"]), "position": position})


_RESUMABLE = (ResumableSampler, ShardedResumableSampler)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints and restored on resume.

    It counts the batches it has yielded, which with the loop's fetcher equals the batches trained on when
    ModelCheckpoint saves (Lightning asks for this state while saving). The position is kept in indices of
    the sampler's order, so it needs a :class:`ResumableSampler` (or, on several ranks, a
    :class:`ShardedResumableSampler`). Any other sampler, such as the distributed one Lightning wraps around
    a plain sampler, cannot be restored: a mid-epoch resume then restarts the epoch, and says so with a
    warning rather than repeating batches silently.
    """

    _batches_yielded = 0

    def __iter__(self):
        self._batches_yielded = 0
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, _RESUMABLE) or self.batch_size is None:
            return {"unrestorable_batches": self._batches_yielded}
        return self.sampler.position(self._batches_yielded * self.batch_size)

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.sampler, _RESUMABLE) and "position" in state:
            self.sampler.load_state_dict(state)
            return
        seen = state.get("unrestorable_batches", 0)
        if 0 < seen < len(self):  # at an epoch's end there is nothing to restore
            warnings.warn(
                f"the checkpoint was saved mid-epoch, but this loader's sampler "
                f"({type(self.sampler).__name__}) cannot resume there: the epoch restarts from its first "
                "batch and the batches already trained on are seen again. Exact mid-epoch resume needs a "
                "sampler from lightning_rlhf.data.sampling (the package's datamodules use them, on one rank "
                "or several), or checkpoints at epoch ends.",
                stacklevel=2,
            )
