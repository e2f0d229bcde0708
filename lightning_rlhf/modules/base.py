"""What every module shares: AdamW over the trained model, and writing it as a save_pretrained folder."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from lightning import LightningModule
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.export import MODULE_CLASS_KEY, module_class_path
from lightning_rlhf.models import load_tokenizer


def object_spec(obj: object) -> dict:
    """``{"class_path", "init_args"}`` of a small config object (a loss), read back from its attributes.

    Stored in the module's hyperparameters so a checkpoint rebuilds the same object: a DPO checkpoint
    trained with IPO must not come back with the default sigmoid loss.
    """
    cls = type(obj)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if not hasattr(obj, p.name)]
    if missing:
        raise TypeError(f"{cls.__name__} keeps no attribute for init argument(s) {missing}; cannot record it")
    init_args = {p.name: getattr(obj, p.name) for p in params}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_object(value: object) -> object:
    """Inverse of :func:`object_spec`; objects pass through unchanged."""
    if isinstance(value, dict) and "class_path" in value:
        module_name, _, class_name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**value.get("init_args", {}))
    return value


def zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage the trainer runs, or None for any other strategy."""
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    if isinstance(config, dict):
        return config.get("zero_optimization", {}).get("stage")
    return None


_REFERENCE_DROPPED = "lightning_rlhf_reference_dropped"


def drop_frozen_reference(module: LightningModule, checkpoint: dict) -> None:
    """Leave a fixed reference model out of a checkpoint (it would double its size) and mark that we did.

    Modules whose reference changes during training set ``reference_in_checkpoint = True`` (the
    ``EMAReferenceUpdate`` callback and DPO-Iter's refresh do), and then it is saved like any weight.
    """
    if getattr(module, "reference", None) is None or getattr(module, "reference_in_checkpoint", False):
        return
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith("reference.")]:
        del state[key]
    checkpoint[_REFERENCE_DROPPED] = True


def restore_frozen_reference(module: LightningModule, checkpoint: dict) -> None:
    """Refill a dropped reference from the freshly loaded one (same weights: it was fixed) before loading."""
    if checkpoint.get(_REFERENCE_DROPPED) and getattr(module, "reference", None) is not None:
        state = checkpoint["state_dict"]
        for key, value in module.reference.state_dict().items():
            state.setdefault(f"reference.{key}", value)


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: decaying biases and norm gains pulls them to 0 for no regularising gain."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass: less memory for about one more forward.

    Non-reentrant checkpointing, so frozen inputs (embeddings of a model with frozen parts) still get
    gradients and it composes with ``torch.no_grad`` reference forwards.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns until v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFModelModule(LightningModule):
    """Base of the stage modules: one trained Hugging Face model, optimised with AdamW by default.

    ``configure_optimizers`` is used when the config sets no ``optimizer:``; with LightningCLI an
    ``optimizer:`` / ``lr_scheduler:`` in YAML replaces it.
    """

    def __init__(self, learning_rate: float, weight_decay: float) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"{type(self).__name__}: learning_rate must be > 0 (got {learning_rate})")
        if not weight_decay >= 0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0 (got {weight_decay})")

    def trained_model(self) -> PreTrainedModel:
        """The model this stage trains and exports (the policy, or the reward model)."""
        raise NotImplementedError

    def _use_loss(self, loss: object | None, default: object) -> object:
        """The loss object to use (built from a recorded spec when loading), recorded in the hparams.

        Call after ``save_hyperparameters(ignore=["loss", ...])``: a checkpoint must rebuild this exact loss.
        """
        built = build_object(loss) if loss is not None else default
        self.hparams["loss"] = object_spec(built)
        return built

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = adamw_param_groups(self.trained_model(), self.hparams.weight_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `lightning-rlhf export --checkpoint X.ckpt` rebuild the right module from the file alone.
        checkpoint[MODULE_CLASS_KEY] = module_class_path(self)
        drop_frozen_reference(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen_reference(self, checkpoint)

    def tokenizer_for_export(self) -> PreTrainedTokenizerBase:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        return tokenizer if tokenizer is not None else load_tokenizer(self.hparams.model)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the trained model and its tokenizer as a folder that transformers alone can load."""
        path = Path(path)
        self.trained_model().save_pretrained(path)
        self.tokenizer_for_export().save_pretrained(path)
        return path
