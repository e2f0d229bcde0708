"""Reference log-probs computed once before DPO training and cached on disk.

The cache key is a fingerprint of the encoded data (token ids, masks, order), the tokenizer, the reference
weights and the log-prob reduction, so a changed dataset, tokenizer or reference model can never reuse a
stale file, and a rerun of the same job skips the pass entirely.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch import Tensor

from lightning_rlhf.models import parameter_dtype, response_logps, weights_fingerprint

log = logging.getLogger(__name__)


@dataclass
class ReferenceLogps:
    """Reference log-probs of every pair of one split, indexed by the batch's ``index``."""

    chosen: Tensor
    rejected: Tensor

    def lookup(self, index: Tensor, *, device: torch.device) -> tuple[Tensor, Tensor]:
        index = index.cpu()
        return self.chosen[index].to(device), self.rejected[index].to(device)


def _compute_split(
    module, reference, datamodule: LightningDataModule, split: str, *, average: bool
) -> Tensor:
    """[2, N] reference log-probs; the batches are dealt round-robin over the ranks and summed back."""
    trainer = module.trainer
    loader = datamodule.reference_dataloader(split)
    batches = list(loader)
    table = torch.zeros(2, len(loader.dataset), device=module.device)
    world, rank = trainer.world_size, trainer.global_rank
    # Every rank runs the same number of forwards (a spare rank redoes batch 0 and discards it), because
    # sharded strategies (ZeRO-3, FSDP) gather parameters collectively inside each forward.
    for round_ in range(math.ceil(len(batches) / world)):
        i = round_ * world + rank
        batch = module.transfer_batch_to_device(batches[i if i < len(batches) else 0], module.device, 0)
        # Under the trainer's precision context (autocast for *-mixed), so cached log-probs equal the
        # ones a live reference would give inside a training step.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            logps, _ = response_logps(reference, batch, average=average, shared_prompts=True)
        if i < len(batches):
            chosen, rejected = logps.float().chunk(2)
            table[0, batch["index"]] = chosen
            table[1, batch["index"]] = rejected
    # Each entry was written by exactly one rank and is 0 elsewhere, so a sum is a gather.
    return trainer.strategy.reduce(table, reduce_op="sum").cpu()


def _load_cache(path: Path, n: int) -> dict[str, Tensor] | None:
    """The cached tables, or None (recompute) when the file is unreadable, not plain tensors, or the wrong
    shape. ``weights_only=True``: a cache file is data and may never run code when read."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or pickled objects that weights_only refuses to build
        log.warning(
            "ignoring the reference log-prob cache %s (%s: %.200s); recomputing",
            path,
            type(err).__name__,
            err,
        )
        return None
    ok = isinstance(data, dict) and all(
        isinstance(data.get(k), Tensor) and data[k].shape == (n,) and bool(torch.isfinite(data[k]).all())
        for k in ("chosen", "rejected")
    )
    if not ok:
        log.warning(
            "ignoring the reference log-prob cache %s: not two finite [%d] tables; recomputing", path, n
        )
        return None
    return data


def precompute_reference_logps(
    module, datamodule: LightningDataModule, splits: list[str], cache_dir: Path, *, average: bool
) -> dict[str, ReferenceLogps]:
    """Load or compute the reference log-probs of ``splits``; ``module.cache_reference()`` gives the model.

    With LoRA that reference is the policy with its adapters off, and the fingerprint covers exactly those
    base weights (under their plain names): a cache written with or without LoRA serves both.
    """
    trainer = module.trainer
    with module.cache_reference() as reference:
        # One tensor gathered at a time under ZeRO-3: the reference is never whole on a rank.
        weights = weights_fingerprint(reference)
        model = getattr(reference, "model", reference)  # AdaptersDisabled wraps the policy
        # Everything that changes the numbers: data, weights, averaging, and how the forward runs — a
        # bf16-mixed pass differs from an fp32 one by up to nats, so the two must never share a file.
        numerics = f"precision={trainer.precision}|dtype={parameter_dtype(model)}"
        results = {}
        for split in splits:
            key = hashlib.sha256(
                f"{datamodule.fingerprint(split)}|{weights}|average={average}|{numerics}".encode()
            ).hexdigest()
            path = cache_dir / f"{split}-{key[:32]}.pt"
            data = None
            if trainer.is_global_zero and path.is_file():
                data = _load_cache(path, len(datamodule.datasets[split]))
            # Global rank 0 reads and decides for every rank: whether another rank sees the file (a node-local
            # folder on another node; a shared filesystem's lagging metadata) must not decide whether it
            # joins the collective that computes the table, or the ranks' collectives stop matching and
            # training hangs.
            data = trainer.strategy.broadcast(data, src=0)
            if data is not None:
                log.info("reusing reference log-probs from %s", path)
            else:
                table = _compute_split(module, reference, datamodule, split, average=average)
                data = {"chosen": table[0], "rejected": table[1]}
                if trainer.is_global_zero:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    torch.save(data, tmp)
                    tmp.replace(path)  # atomic: a crash mid-write never leaves a truncated cache behind
                    log.info("cached reference log-probs of %d pairs in %s", table.shape[1], path)
                trainer.strategy.barrier()
            results[split] = ReferenceLogps(data["chosen"], data["rejected"])
    return results
