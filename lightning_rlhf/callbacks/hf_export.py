"""Export the trained model as a ``save_pretrained`` folder when fit ends."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from typing_extensions import override

log = logging.getLogger(__name__)


class HFExport(Callback):
    """At the end of ``fit``, write the policy (or reward model) and tokenizer for transformers to load.

    The folder loads with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification.from_pretrained``
    with no lightning_rlhf installed. From a checkpoint instead: ``lightning-rlhf export --checkpoint X``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: Output folder (default: <default_root_dir>/hf_model).
        """
        self.dirpath = dirpath

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "save_pretrained"):
            raise TypeError(f"HFExport needs a lightning_rlhf module; got {type(pl_module).__name__}")
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "hf_model")
        if trainer.global_step == 0:
            # Nothing was trained (no batch, max_steps=0, or every update skipped): writing now would put the
            # initial weights where a user expects the trained model, over whatever was there.
            raise RuntimeError(
                f"HFExport: the fit made no optimizer step, so {path} was not written (it would hold the "
                "untrained model). Check that the training data gives at least one batch (rows vs batch_size "
                "x ranks, drop_last) and the trainer's max_steps / limit_train_batches."
            )
        pl_module.save_pretrained(path)  # every rank: under ZeRO-3 the weights are gathered; rank 0 writes
        if trainer.is_global_zero:
            model = pl_module.trained_model()
            # LoRA adapters were merged: the folder holds the base architecture, so name that.
            written = model.get_base_model() if hasattr(model, "get_base_model") else model
            log.info("exported %s to %s", type(written).__name__, path)
        trainer.strategy.barrier()
