"""Write a trained stage as a plain ``save_pretrained`` folder, at the end of fit or from a checkpoint."""

from __future__ import annotations

import importlib
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
    module_name, _, class_name = class_path.rpartition(".")
    module_class = getattr(importlib.import_module(module_name), class_name)
    module = module_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        module.tokenizer_for_export = lambda: AutoTokenizer.from_pretrained(tokenizer)
    return module.save_pretrained(out)
