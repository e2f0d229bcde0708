"""Write a trained stage as a plain ``save_pretrained`` folder, at the end of fit or from a checkpoint."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import torch

# The checkpoint key under which modules record their own class, so a checkpoint alone can be exported.
MODULE_CLASS_KEY = "lightning_rlhf_module_class"
# Set in a LoRA checkpoint whose frozen base weights were left out (see modules.base.drop_frozen_weights).
FROZEN_DROPPED_KEY = "lightning_rlhf_lora_frozen_dropped"


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
    # weights_only: no arbitrary objects are unpickled; mmap: tensors are read from disk only when used, so
    # the other models' weights in a PPO checkpoint (critic, reward model) are never read into memory.
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    class_path = ckpt.get(MODULE_CLASS_KEY)
    if class_path is None:
        raise ValueError(f"{checkpoint} was not written by a lightning_rlhf module (no {MODULE_CLASS_KEY!r})")
    from lightning_rlhf.models import load_tokenizer
    from lightning_rlhf.modules.base import HFModelModule, resolve_class

    # The recorded class is data from the file: only a lightning_rlhf module class is accepted.
    module_class = resolve_class(class_path, HFModelModule, f"{checkpoint} ({MODULE_CLASS_KEY})")
    module = build_module(module_class, ckpt.get("hyper_parameters", {}))
    model = module.build_trained_model()  # only the model this folder gets: no reference, reward or critic
    load_trained_state(model, ckpt, module.trained_attribute, checkpoint)
    setattr(module, module.trained_attribute, model)
    if tokenizer is not None:
        module.tokenizer_for_export = lambda: load_tokenizer(tokenizer)
    return module.save_pretrained(out)


def build_module(module_class: type, hparams: dict):
    """The module as the checkpoint's hyperparameters describe it (``__init__`` loads no model)."""
    accepted = init_arguments(module_class)
    return module_class(**{k: v for k, v in hparams.items() if k in accepted})


def init_arguments(cls: type) -> set[str]:
    """The names ``cls(...)`` accepts: its ``__init__``'s, and, where that passes ``**kwargs`` on (the
    on-policy modules), those of the base classes' ``__init__`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def load_trained_state(model: torch.nn.Module, ckpt: dict, attribute: str, checkpoint: Path) -> None:
    """Copy the checkpoint's ``<attribute>.*`` weights into ``model``; every trained weight must be there.

    A LoRA checkpoint leaves out the frozen base weights (``drop_frozen_weights``): those were loaded from the
    model folder by ``build_trained_model``, exactly as resuming loads them.
    """
    prefix = f"{attribute}."
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    result = model.load_state_dict(state, strict=False)
    frozen_dropped = bool(ckpt.get(FROZEN_DROPPED_KEY))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad or ".lora_" in name}
    missing = [k for k in result.missing_keys if not frozen_dropped or k in trainable]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{checkpoint}: its {attribute!r} weights do not fit the model the hyperparameters describe "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}); was the model folder changed "
            "after training?"
        )


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
