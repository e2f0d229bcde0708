"""A seeded sampler that puts examples of similar length into the same batch, to cut padding."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yield indices so that each run of ``batch_size`` consecutive indices has similar lengths.

    Per epoch: shuffle all indices, cut them into mega-batches of ``mega_batch_factor * batch_size``, sort
    each mega-batch by length (longest first), split it into batches, and shuffle the order of all batches.
    Every index appears exactly once per epoch; only the final batch can be short. Sorting inside a window
    (not globally) keeps batches random enough for SGD while padding stays near the minimum.

    It is an index sampler, not a batch sampler, so Lightning can still wrap it for distributed training.
    Lightning's wrapper hands rank r the indices at positions r, r + W, r + 2W, ... (W = world size), so a
    rank's batch is drawn from W * batch_size consecutive positions: with ``num_replicas`` = W the sampler
    groups lengths in *global* batches of that size, and every rank's batch stays of similar length.
    The order depends on ``seed`` and the epoch: Lightning calls :meth:`set_epoch` before every epoch;
    without that call each new iteration moves to the next epoch by itself.
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
        self.lengths = list(lengths)
        self.local_batch_size = batch_size
        self.num_replicas = num_replicas
        # The unit that must be length-homogeneous: one batch on every rank (see the class docstring).
        self.batch_size = batch_size * num_replicas
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch in self.batches(epoch):
            yield from batch
