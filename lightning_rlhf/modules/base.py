"""What every module shares: AdamW over the trained model, and writing it as a save_pretrained folder."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from lightning import LightningModule
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.export import MODULE_CLASS_KEY, module_class_path
from lightning_rlhf.lora import LoraSettings, merged_copy
from lightning_rlhf.models import load_tokenizer
from lightning_rlhf.zero import gathered, hf_zero3_loading


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


_FROZEN_DROPPED = "lightning_rlhf_lora_frozen_dropped"


def drop_frozen_weights(module: LightningModule, checkpoint: dict) -> None:
    """With LoRA, leave the frozen weights that are not adapters out of a checkpoint and mark that we did.

    They are the base weights (and frozen reward or reference models), loaded again from the folders named in
    the hyperparameters by ``configure_model``: a LoRA checkpoint then holds the adapters (frozen ones too,
    such as DPO-Iter's reference adapter, which changes), trained heads and optimizer state, instead of a
    full copy of the model. Resuming needs those folders unchanged, as for a dropped reference.
    """
    if module.hparams.get("lora") is None or "state_dict" not in checkpoint:
        return
    state = checkpoint["state_dict"]
    for name, param in module.named_parameters():
        if not param.requires_grad and ".lora_" not in name:
            state.pop(name, None)
    checkpoint[_FROZEN_DROPPED] = True


def restore_frozen_weights(module: LightningModule, checkpoint: dict) -> None:
    """Refill dropped frozen parameters from the freshly loaded module before the state is loaded."""
    if checkpoint.get(_FROZEN_DROPPED):
        state = checkpoint["state_dict"]
        for name, param in module.named_parameters():
            if not param.requires_grad and ".lora_" not in name:
                state.setdefault(name, param.detach())


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: decaying biases and norm gains pulls them to 0 for no regularising gain."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


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

    def setup(self, stage: str) -> None:
        # Runs before configure_model, which Lightning wraps in deepspeed.zero.Init under ZeRO-3; transformers
        # must know too, so from_pretrained partitions each model as it loads instead of filling placeholders.
        self._zero3_loading = hf_zero3_loading(self._trainer)

    def teardown(self, stage: str) -> None:
        if getattr(self, "_zero3_loading", None) is not None:
            self._zero3_loading.close()
            self._zero3_loading = None

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

    def _use_lora(self, lora: LoraSettings | dict | None) -> LoraSettings | None:
        """The LoRA settings (from a checkpoint's dict when loading), recorded in the hparams as plain values.

        Call after ``save_hyperparameters(ignore=["lora", ...])``: checkpoints are read with weights_only.
        """
        settings = LoraSettings.build(lora)
        self.hparams["lora"] = settings.to_dict() if settings is not None else None
        return settings

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = adamw_param_groups(self.trained_model(), self.hparams.weight_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `lightning-rlhf export --checkpoint X.ckpt` rebuild the right module from the file alone.
        checkpoint[MODULE_CLASS_KEY] = module_class_path(self)
        drop_frozen_reference(self, checkpoint)
        drop_frozen_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen_reference(self, checkpoint)
        restore_frozen_weights(self, checkpoint)

    def tokenizer_for_export(self) -> PreTrainedTokenizerBase:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        return tokenizer if tokenizer is not None else load_tokenizer(self.hparams.model)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the trained model and its tokenizer as a folder that transformers alone can load.

        LoRA adapters are merged into the weights first: the folder is an ordinary model, not an adapter.
        Under DeepSpeed ZeRO-3 every rank must call this (the weights are gathered from all ranks' shards);
        rank 0 writes. Elsewhere any single rank may call it.
        """
        path = Path(path)
        model = self.trained_model()
        with gathered(model):
            if self._trainer is None or self.trainer.is_global_zero:
                merged_copy(model).save_pretrained(path)
                self.tokenizer_for_export().save_pretrained(path)
        return path
