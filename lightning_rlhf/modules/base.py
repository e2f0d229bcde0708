"""What every module shares: AdamW over the trained model, and writing it as a save_pretrained folder."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningModule
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.export import FROZEN_DROPPED_KEY, MODULE_CLASS_KEY, module_class_path
from lightning_rlhf.lora import LoraSettings, merged_copy
from lightning_rlhf.models import load_tokenizer
from lightning_rlhf.modules.reference import drop_frozen_reference, restore_frozen_reference
from lightning_rlhf.modules.rng import (
    collect_rng_states,
    gather_rng_states,
    rng_state_for_rank,
    set_rng_states,
)
from lightning_rlhf.validation import check, check_choice
from lightning_rlhf.zero import accept_client_optimizer, gathered, hf_zero3_loading, zero_stage

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteError(FloatingPointError):
    """A loss term or gradient became NaN or infinite (the message says which, where, and what to do)."""


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


def resolve_class(class_path: str, base: type, what: str) -> type:
    """The class at ``class_path``, which must be a subclass of ``base``.

    Class paths read from checkpoints are data: without the check, a crafted checkpoint could name any
    importable callable (``subprocess.Popen`` with init_args) and have it called on load.
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: cannot import {class_path!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{what}: {class_path!r} is not a {base.__name__} subclass; refusing to build it")
    return cls


def build_object(value: object, base: type = object) -> object:
    """Inverse of :func:`object_spec` (the class must subclass ``base``); objects pass through unchanged."""
    if isinstance(value, dict) and "class_path" in value:
        cls = resolve_class(value["class_path"], base, "recorded object")
        return cls(**value.get("init_args", {}))
    if not isinstance(value, base):
        raise TypeError(f"expected a {base.__name__}, got {type(value).__name__} {value!r:.60}")
    return value


_FROZEN_DROPPED = FROZEN_DROPPED_KEY


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
    if checkpoint.get(_FROZEN_DROPPED) and "state_dict" in checkpoint:  # DeepSpeed loads weights itself
        state = checkpoint["state_dict"]
        for name, param in module.named_parameters():
            if not param.requires_grad and ".lora_" not in name:
                state.setdefault(name, param.detach())


def absolute_local_paths(value):
    """``value`` with every relative string that names an existing local file or folder made absolute.

    Hub names stay as they are (no such local path); a name that is also a local folder was loaded from that
    folder by transformers, so the absolute path means the same model. Dicts and lists are walked.
    """
    if isinstance(value, Mapping):
        return {k: absolute_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(absolute_local_paths(v) for v in value)
    if isinstance(value, str) and value and "\n" not in value and len(value) < 4096:
        try:
            path = Path(value)
            if not path.is_absolute() and path.exists():
                return str(path.resolve())
        except (OSError, ValueError):
            pass
    return value


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: decaying biases and norm gains pulls them to 0 for no regularising gain."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], lr: float | None = None, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over parameter groups, with PyTorch's fused kernel where every parameter allows it.

    The fused kernel updates all parameters in one call instead of a Python loop of small kernels per
    parameter (on a 2-core CPU the step of a 12.7M-parameter model took 26 ms looped, 7 ms fused); the update
    is the same up to float rounding. It needs floating-point parameters on CPU or CUDA; anything else
    (other devices, or no parameters), or ``fused=False`` (see :func:`fused_adamw_allowed`), gets the
    default implementation.
    """
    params = [p for group in groups for p in group["params"]]
    devices_ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    fused = fused and bool(params) and devices_ok
    kwargs = {} if lr is None else {"lr": lr}
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def fused_adamw_allowed(trainer) -> bool:
    """Whether the fused AdamW kernel may run under ``trainer``'s precision: not under Lightning's AMP plugin.

    Lightning's ``16-mixed`` / ``bf16-mixed`` plugin refuses to clip the gradients of an optimizer that
    unscales them inside its own step, as every fused one does ("does not allow for gradient clipping ...
    Are you using a 'fused' optimizer?", raised at the first clip), and clipping is on by default in PPO and
    DPO-Iter (``max_grad_norm``) and common in the other stages (``gradient_clip_val``). DeepSpeed's
    precision is its own (it clips inside its engine) and keeps the fused kernel.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = getattr(trainer, "precision_plugin", None)
    return not isinstance(plugin, MixedPrecision)


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

    ``batch_keys`` / ``data_module`` name what a subclass's batches must hold and which datamodule makes
    them: the first training and validation batch is checked, so a wrong datamodule is named at once
    instead of failing deep inside a step with a ``KeyError``.
    """

    batch_keys: tuple[str, ...] = ()
    data_module: str = ""

    def __init__(
        self, learning_rate: float, weight_decay: float, nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check(owner, "learning_rate", learning_rate, gt=0)
        check(owner, "weight_decay", weight_decay, ge=0)
        check_choice(owner, "nonfinite", nonfinite, ("raise", "skip"))
        self.nonfinite_policy = nonfinite
        self.nonfinite_skipped = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._rng_to_restore: dict | None = None
        self._rng_before_validation: dict | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Each stage's configure_model (run by Lightning inside deepspeed.zero.Init under ZeRO-3) loads models
        # with transformers told about ZeRO-3, so from_pretrained partitions them as they load.
        own = cls.__dict__.get("configure_model")
        if own is not None and not getattr(own, "_zero3_aware", False):

            @functools.wraps(own)
            def configure_model(self) -> None:
                with hf_zero3_loading(self._trainer):
                    own(self)

            configure_model._zero3_aware = True
            cls.configure_model = configure_model

    #: The attribute holding the model this stage trains and exports; its checkpoint keys start with it.
    trained_attribute: str = "policy"

    def trained_model(self) -> PreTrainedModel:
        """The model this stage trains and exports (the policy, or the reward model)."""
        return getattr(self, self.trained_attribute)

    def build_trained_model(self) -> PreTrainedModel:
        """Load the trained model as ``configure_model`` builds it (weights from ``model``, LoRA applied).

        Only this model: ``export_checkpoint`` fills it from a checkpoint and writes it, without loading the
        stage's reference, reward or value models. ``configure_model`` uses it too, so the two agree.
        """
        raise NotImplementedError

    def _use_loss(self, loss: object | None, default: object, base: type) -> object:
        """The loss object to use (built from a recorded spec when loading), recorded in the hparams.

        Call after ``save_hyperparameters(ignore=["loss", ...])``: a checkpoint must rebuild this exact loss.
        A recorded spec may only name a ``base`` subclass (see :func:`resolve_class`).
        """
        built = build_object(loss, base) if loss is not None else default
        self.hparams["loss"] = object_spec(built)
        return built

    def _use_lora(self, lora: LoraSettings | dict | None) -> LoraSettings | None:
        """The LoRA settings (from a checkpoint's dict when loading), recorded in the hparams as plain values.

        Call after ``save_hyperparameters(ignore=["lora", ...])``: checkpoints are read with weights_only.
        """
        settings = LoraSettings.build(lora)
        self.hparams["lora"] = settings.to_dict() if settings is not None else None
        return settings

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if zero_stage(self._trainer) is not None:
            accept_client_optimizer(self._trainer.strategy.config)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = adamw_param_groups(self.trained_model(), self.hparams.weight_decay)
        return adamw(groups, lr=self.hparams.learning_rate, fused=fused_adamw_allowed(self._trainer))

    # ------------------------------------------------------------------ non-finite guard
    def finite_or_skip(self, terms: Mapping[str, Tensor], batch: Mapping | None = None) -> bool:
        """True when every loss term is finite; else raise :class:`NonFiniteError` or count a skip.

        ``terms`` maps names users recognise (``policy_loss``, ``value_loss``, ``logps/chosen``) to tensors,
        checked in order; the error names the first bad one, the global step and the batch's row indices.
        Under ``nonfinite="skip"`` the caller must then leave this batch out of the optimizer step.
        """
        bad = [name for name, value in terms.items() if not bool(torch.isfinite(value.detach()).all())]
        trainer = self._trainer
        if self.nonfinite_policy == "skip" and trainer is not None and trainer.world_size > 1:
            # Every rank must skip the same step, or the others would wait forever in DDP's gradient sync.
            flag = torch.tensor(float(bool(bad)), device=self.device)
            if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and not bad:
                bad = ["a loss term on another rank"]
        if not bad:
            return True
        rows = batch.get("index") if isinstance(batch, Mapping) else None
        rows = rows.tolist() if isinstance(rows, Tensor) else rows
        where = f"at global step {self.global_step}" + (f", batch rows {rows}" if rows is not None else "")
        self._nonfinite(f"non-finite {bad[0]} (terms not finite: {bad}) {where}")
        return False

    def _nonfinite(self, what: str) -> None:
        if self.nonfinite_policy == "raise":
            raise NonFiniteError(
                f"{type(self).__name__}: {what}. Set nonfinite='skip' to skip such optimizer steps and count "
                "them (train/nonfinite_skipped); persistent NaNs usually mean a too-high learning rate, "
                "fp16 overflow, or a bad row (the batch rows are the datamodule's 'index')."
            )
        self.nonfinite_skipped += 1
        log.warning(
            "%s: %s; optimizer step skipped (%d so far)", type(self).__name__, what, self.nonfinite_skipped
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient (with finite losses) raises, or empties every gradient: AdamW then skips
        each parameter entirely (no moment or weight-decay update), which is a skipped step."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: inf gradients are expected now and then; the scaler skips those steps
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norms = torch._foreach_norm([p.grad.detach() for p in params])
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return
        names = {id(p): name for name, p in self.named_parameters()}
        first = next(p for p, n in zip(params, norms, strict=True) if not torch.isfinite(n))
        self._nonfinite(
            f"non-finite gradient (first in {names.get(id(first), '?')}) at global step {self.global_step}"
        )
        for p in params:
            p.grad = None

    def on_validation_start(self) -> None:
        # Validation (PPO samples responses) must not advance the training RNG streams: a run's training
        # randomness is then independent of how often it validates, and a resumed run that repeats the
        # validation of its checkpoint step draws what the uninterrupted run drew.
        self._rng_before_validation = collect_rng_states()

    def on_validation_end(self) -> None:
        if self._rng_before_validation is not None:
            set_rng_states(self._rng_before_validation)
            self._rng_before_validation = None

    def check_batch(self, batch) -> None:
        """Raise naming the datamodule when ``batch`` lacks a key this module's steps read."""
        missing = [k for k in self.batch_keys if not isinstance(batch, dict) or k not in batch]
        if missing:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            given = type(datamodule).__name__ if datamodule is not None else "the dataloader"
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TypeError(
                f"{type(self).__name__} trains on {self.data_module} batches, but {given} gives batches "
                f"without {missing} (keys: {keys}); use {self.data_module} (or a datamodule whose batches "
                "have those keys)"
            )

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0:
            self.check_batch(batch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.check_batch(batch)
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)  # see lightning_rlhf.modules.rng for why only now
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.nonfinite_policy == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets `lightning-rlhf export --checkpoint X.ckpt` rebuild the right module from the file alone, from
        # any working directory: relative model / data paths in the hyperparameters are written absolute.
        checkpoint[MODULE_CLASS_KEY] = module_class_path(self)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = absolute_local_paths(dict(checkpoint["hyper_parameters"]))
        drop_frozen_reference(self, checkpoint)
        drop_frozen_weights(self, checkpoint)
        # Saved mid-validation (a checkpoint monitoring a val metric), the state to resume with is the one
        # training will continue from: validation puts it back when it ends (see on_validation_start).
        rng = self._rng_before_validation or collect_rng_states()
        world_size = self._trainer.world_size if self._trainer is not None else 1
        per_rank = gather_rng_states(rng, world_size)  # every rank's, though one rank writes the file
        checkpoint["lightning_rlhf_state"] = {
            "rng": per_rank[0],  # what checkpoints held before rng_per_rank; kept for older readers
            "rng_per_rank": per_rank,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen_reference(self, checkpoint)
        restore_frozen_weights(self, checkpoint)
        state = checkpoint.get("lightning_rlhf_state", {})
        trainer = self._trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._rng_to_restore = rng_state_for_rank(state, rank, world_size)
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)

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
