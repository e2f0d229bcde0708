"""Write a trained stage as a plain ``save_pretrained`` folder, at the end of fit or from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

# The checkpoint key under which modules record their own class, so a checkpoint alone can be exported.
MODULE_CLASS_KEY = "lightning_rlhf_module_class"


def module_class_path(module: object) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tokenizer: str | None = None) -> Path:
    """Load a lightning_rlhf Lightning checkpoint and write its trained model + tokenizer to ``out``.

    ``tokenizer`` defaults to the one saved beside the model the stage started from.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    # Only our own metadata is read here (weights_only: no arbitrary objects are unpickled).
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    class_path = meta.get(MODULE_CLASS_KEY)
    if class_path is None:
        raise ValueError(f"{checkpoint} was not written by a lightning_rlhf module (no {MODULE_CLASS_KEY!r})")
    from lightning_rlhf.models import load_tokenizer
    from lightning_rlhf.modules.base import HFModelModule, resolve_class

    # The recorded class is data from the file: only a lightning_rlhf module class is accepted.
    module_class = resolve_class(class_path, HFModelModule, f"{checkpoint} ({MODULE_CLASS_KEY})")
    module = module_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    if tokenizer is not None:
        module.tokenizer_for_export = lambda: load_tokenizer(tokenizer)
    return module.save_pretrained(out)
