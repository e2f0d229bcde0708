"""LoRA adapters (PEFT) on a stage's trained model: settings, wrapping, the base-model reference, export.

With LoRA the frozen reference of DPO, DPO-Iter and PPO is not a second copy of the model: it is the
policy itself with its adapters switched off (``PeftModel.disable_adapter()``), i.e. exactly the weights
the policy started from. Exported models are merged (``merge_and_unload``) into an ordinary
``save_pretrained`` folder that plain transformers loads.

``peft`` is an optional dependency (``pip install lightning-rlhf[peft]``); it is imported only when LoRA
is turned on.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import nn


@dataclass
class LoraSettings:
    """LoRA adapters on the trained model (PEFT ``LoraConfig``); ``lora: {r: 16}`` in YAML turns them on.

    Args:
        r: Rank of each adapter's update matrices.
        alpha: Scaling numerator: the update is multiplied by alpha / r.
        dropout: Dropout on the adapter's input; must be 0 while the module's disable_dropout is on.
        target_modules: Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" (every linear layer
            except the output head).
        modules_to_save: Modules trained fully beside the adapters (a reward model's score head always is).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraSettings: r must be an integer >= 1 (got {self.r!r})")
        if not self.alpha > 0:
            raise ValueError(f"LoraSettings: alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSettings: dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            raise ValueError('LoraSettings: target_modules must name modules, or be "all-linear"')

    @classmethod
    def build(cls, value: LoraSettings | dict | None) -> LoraSettings | None:
        """Settings from a module argument: the object, or the dict a checkpoint's hparams hold."""
        if value is None or isinstance(value, LoraSettings):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"LoraSettings: unknown field(s) {unknown}")
            return cls(**value)
        raise TypeError(
            f"lora must be LoraSettings, a dict of its fields, or None (got {type(value).__name__})"
        )

    def to_dict(self) -> dict:
        """Plain values, for hyperparameters (checkpoints are read back with ``weights_only=True``)."""
        return asdict(self)


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA needs the `peft` package: pip install 'lightning-rlhf[peft]' (or set lora: null)"
        ) from err
    return peft


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a PEFT-wrapped model (without importing peft when it is not installed)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def apply_lora(
    model: nn.Module, settings: LoraSettings, task: Literal["causal_lm", "sequence_classification"]
) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters: only the adapters (and ``modules_to_save``) keep gradients.

    For a sequence-classification model PEFT trains the ``score`` head fully (it is added to
    ``modules_to_save``): a fresh head has nothing to adapt.
    """
    peft = _peft()
    task_type = peft.TaskType.CAUSAL_LM if task == "causal_lm" else peft.TaskType.SEQ_CLS
    target = settings.target_modules
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        modules_to_save=list(settings.modules_to_save) if settings.modules_to_save else None,
        task_type=task_type,
    )
    wrapped = peft.get_peft_model(model, config)
    _init_adapters(wrapped)
    wrapped.train(model.training)
    return wrapped


def _init_adapters(model: nn.Module) -> None:
    """(Re-)initialise every adapter from a seed of its own: the run's seed and the layer's name.

    Two reasons. Under ``deepspeed.zero.Init`` (ZeRO-3) each new adapter weight is split across ranks as
    soon as it exists, so PEFT's ``zeros_(lora_B)`` and Kaiming ``lora_A`` ran on empty placeholders: B would
    not be zero and the policy would not start equal to its reference; here rank 0 initialises the gathered
    tensors. And the initial adapters no longer depend on how much of the global RNG stream model loading
    used, so DDP, ZeRO-2 and ZeRO-3 runs of one seed start from the same adapters.
    """
    from lightning_rlhf.zero import gathered_tensors

    base_seed = torch.initial_seed()
    for layer_name, module in model.named_modules():
        if not hasattr(module, "reset_lora_parameters") or not hasattr(module, "lora_A"):
            continue
        params = [
            p for name in module.lora_A for p in (module.lora_A[name].weight, module.lora_B[name].weight)
        ]
        if not params:
            continue
        devices = [params[0].device.index or 0] if params[0].is_cuda else []
        with gathered_tensors(params, modifier_rank=0), torch.random.fork_rng(devices=devices):
            torch.manual_seed((base_seed + zlib.crc32(layer_name.encode())) % 2**63)
            for name in list(module.lora_A):
                module.reset_lora_parameters(name, init_lora_weights=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (adapters still injected and active), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


class AdaptersDisabled:
    """Calls a PEFT model with its adapters off and in eval mode: the frozen base weights, as a reference.

    Deliberately not an ``nn.Module``: assigned to a LightningModule it must not register the policy a
    second time (checkpoints, optimizer, device moves). Callers run it under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module) -> None:
        if not is_peft_model(model):
            raise TypeError(f"AdaptersDisabled needs a PEFT model, got {type(model).__name__}")
        self.model = model

    def __call__(self, *args, **kwargs):
        training = self.model.training
        self.model.eval()  # as a separately held reference would be: no dropout anywhere in the base model
        try:
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return base_state_dict(self.model, keep_vars=keep_vars)

    @property
    def config(self):
        return self.model.config


REFERENCE_ADAPTER = "reference"


def add_reference_adapter(model: nn.Module) -> None:
    """Give a PEFT model a frozen second adapter, ``reference``, equal to its trained one (``default``).

    ``AdapterReference(model)`` computes with it; :func:`copy_into_reference_adapter` refreshes it. Copying
    both factors makes the reference exactly base + B·A of the policy at that moment (an EMA of the factors
    would not be an EMA of B·A, which is why ``EMAReferenceUpdate`` is refused instead).
    """
    active = model.active_adapter
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[active])
    model.set_adapter(active)  # the trained adapter stays the active, trainable one
    copy_into_reference_adapter(model)


@torch.no_grad()
def copy_into_reference_adapter(model: nn.Module) -> None:
    """Copy the trained adapter's weights into the ``reference`` adapter, matched by name."""
    active = model.active_adapter
    params = dict(model.named_parameters())
    marker, target_marker = f".{active}.", f".{REFERENCE_ADAPTER}."
    copied = 0
    for name, param in params.items():
        if ".lora_" in name and marker in name:
            target = params[name.replace(marker, target_marker)]
            target.copy_(param)
            target.requires_grad_(False)
            copied += 1
    if copied == 0:
        raise RuntimeError(f"no parameters of the adapter {active!r} found to copy into the reference")


class AdapterReference(AdaptersDisabled):
    """Calls a PEFT model with its ``reference`` adapter active instead of the trained one, in eval mode."""

    def __call__(self, *args, **kwargs):
        training, active = self.model.training, self.model.active_adapter
        self.model.eval()
        self.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.set_adapter(active)  # trainable again; the reference adapter frozen
            self.model.train(training)

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        raise NotImplementedError("a reference adapter changes during training; it is never fingerprinted")


def base_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The weights a PEFT model computes with its adapters off, under the plain transformers names.

    Equal, name for name, to the ``state_dict()`` of the model before it was wrapped: so a fingerprint of
    it matches the fingerprint of the same weights loaded without LoRA, and does not change as the adapters
    train.
    """
    if not is_peft_model(model):
        return model.state_dict(keep_vars=keep_vars)
    state = {}
    for name, tensor in model.get_base_model().state_dict(keep_vars=keep_vars).items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a PEFT model computes with, adapters merged (W + scale·B·A), under transformers names.

    New tensors for the adapted layers; the model, its base weights and its adapters are not touched (no
    ``merge_and_unload``), so it can be called between updates of a model in training. A module trained
    fully beside the adapters (``modules_to_save``) gives its trained copy. A plain model gives its
    ``state_dict()``. For a ZeRO-3 partitioned model use :func:`merged_weights`, which gathers as it goes.
    """
    return dict(merged_weights(model))


@torch.no_grad()
def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of :func:`merged_state_dict`, in its order, one module at a time.

    Under ZeRO-3 each module's parameters are gathered only while its entries are read, and the entries are
    copies, so no rank ever holds more than one module's whole weights besides what the reader keeps.
    Gathering is collective: every rank must read the whole iterator, in the same order. For a model
    that is not partitioned nothing is gathered or copied (the tensors are the model's own, detached).
    """
    from lightning_rlhf.zero import gathered_tensors, is_partitioned

    peft = is_peft_model(model)
    base = model.get_base_model() if peft else model
    copies = is_partitioned(base)
    stack: list[tuple[str, nn.Module]] = [("", base)]
    while stack:
        prefix, module = stack.pop()
        if peft and _active_lora_layer(module, model.active_adapter):
            with gathered_tensors(list(module.parameters())):
                weight = module.base_layer.weight
                merged = weight + module.get_delta_weight(model.active_adapter).to(weight.dtype)
                for key, tensor in module.base_layer.state_dict().items():
                    value = merged if key == "weight" else (tensor.clone() if copies else tensor)
                    yield prefix + key, value
            continue
        if peft and hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            stack.append((prefix, module.modules_to_save[model.active_adapter]))
            continue
        with gathered_tensors(list(module.parameters(recurse=False))):
            for key, tensor in _own_entries(module):
                yield prefix + key, (tensor.clone() if copies else tensor.detach())
        children = []
        for name, child in module.named_children():
            if peft and name.startswith("lora_"):
                continue
            # PEFT's wrappers add a level (base_layer / original_module) the plain names do not have.
            wrapper = peft and name in ("base_layer", "original_module")
            children.append((prefix if wrapper else f"{prefix}{name}.", child))
        stack.extend(reversed(children))


def _own_entries(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own ``state_dict`` entries (parameters, then persistent buffers), not its children's."""
    for key, tensor in module._parameters.items():
        if tensor is not None:
            yield key, tensor
    for key, tensor in module._buffers.items():
        if tensor is not None and key not in module._non_persistent_buffers_set:
            yield key, tensor


def _active_lora_layer(module: nn.Module, active: str) -> bool:
    """Whether ``module`` is a LoRA layer whose ``active`` adapter is on and not merged into its weights."""
    return (
        hasattr(module, "get_delta_weight")
        and hasattr(module, "base_layer")
        and active in getattr(module, "lora_A", {})
        and not getattr(module, "merged", False)
    )


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapters merged into the weights; ``model`` is left as it was.

    Merging in place and unmerging afterwards would leave rounding errors in the base weights, which are
    the reference: the copy costs one model's memory for the moment of the export instead.
    """
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def check_dropout(owner: str, settings: LoraSettings | None, disable_dropout: bool) -> None:
    """Refuse adapter dropout in modules that compare log-probs across forwards with dropout turned off."""
    if settings is not None and disable_dropout and settings.dropout > 0:
        raise ValueError(
            f"{owner}: lora.dropout={settings.dropout} conflicts with disable_dropout=true (policy and "
            "reference log-probs must be comparable); set lora.dropout: 0, or disable_dropout: false"
        )
