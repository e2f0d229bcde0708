"""Write a trained stage as a plain ``save_pretrained`` folder, at the end of fit or from a checkpoint."""

from __future__ import annotations

import tempfile
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
    if checkpoint.is_dir():  # DeepSpeed writes a folder of ZeRO shards
        with tempfile.TemporaryDirectory() as tmp:
            single = Path(tmp) / "consolidated.ckpt"
            torch.save(consolidate_deepspeed_checkpoint(checkpoint), single)
            return export_checkpoint(single, out, tokenizer=tokenizer)
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


def consolidate_deepspeed_checkpoint(checkpoint_dir: str | Path) -> dict:
    """One ordinary Lightning checkpoint dict from a DeepSpeed (ZeRO-2/3) checkpoint folder.

    The weights are DeepSpeed's fp32 copies gathered from every rank's shard files; the rest (hyper-
    parameters, our module-class key, callback states) is the client state rank 0 saved beside them.
    Needs no GPU and no process group; needs ``deepspeed`` installed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "latest").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is a folder but not a DeepSpeed checkpoint (no 'latest' file in it); pass the "
            "`.ckpt` folder that Lightning's DeepSpeedStrategy wrote, or a single-file checkpoint"
        )
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ImportError(
            f"{checkpoint_dir} is a DeepSpeed checkpoint; reading it needs `pip install deepspeed`"
        ) from err
    tag = (checkpoint_dir / "latest").read_text().strip()
    # Rank 0's client state: mp_rank_00_model_states.pt (ZeRO-2), zero_pp_rank_0_..._model_states.pt (ZeRO-3).
    model_states = sorted((checkpoint_dir / tag).glob("*model_states.pt"))
    if not model_states:
        raise FileNotFoundError(
            f"no *model_states.pt in {checkpoint_dir / tag}: the checkpoint is incomplete"
        )
    client = torch.load(model_states[0], map_location="cpu", weights_only=True)
    skip = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps"}
    consolidated = {k: v for k, v in client.items() if k not in skip and not k.startswith(("dp_", "mp_"))}
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag)
    consolidated["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return consolidated
