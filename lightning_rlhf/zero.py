"""DeepSpeed ZeRO in one place: which stage runs, loading models partitioned, and seeing whole weights.

Under ZeRO-3 every parameter of every model in the module (policy, reference, reward model, critic) is split
across ranks: a rank holds ``param.ds_tensor`` (its shard) and ``param.data`` is an empty placeholder
until DeepSpeed gathers it for a forward. Code that reads or writes weights outside a forward (sampling with
``generate``, the EMA reference update, exporting) goes through the helpers here.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn


def zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage the trainer runs, or None for any other strategy."""
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    if isinstance(config, dict):
        return config.get("zero_optimization", {}).get("stage")
    return None


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 shards (DeepSpeed marks each with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def _transformers_zero3_flag(config) -> Iterator[None]:
    """Point transformers' ZeRO-3 flag at ``config`` (an ``HfDeepSpeedConfig``, or None for off) in the block.

    transformers reads ZeRO-3 through a module-level weak reference; it is restored on exit, even on an
    error, so nothing loaded later in the process (another Trainer, a test) sees a stale setting.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None if config is None else weakref.ref(config)
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def hf_zero3_loading(trainer) -> Iterator[None]:
    """Inside the block, transformers knows ZeRO-3 is on, so ``from_pretrained`` builds models partitioned.

    Lightning calls ``configure_model`` inside ``deepspeed.zero.Init``; transformers must know that too, or
    it initialises and loads weights into empty placeholders. No-op unless the trainer runs ZeRO-3.
    """
    if zero_stage(trainer) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(trainer.strategy.config)  # kept alive by this frame for the block
    with _transformers_zero3_flag(config):
        yield


@contextlib.contextmanager
def unpartitioned_loading() -> Iterator[None]:
    """``from_pretrained`` builds an ordinary, whole model inside the block even while ZeRO-3 is on.

    For a model loaded outside ``configure_model`` (DPO's reference for the one-off log-prob pass): the
    engine registered its gathering hooks on the module's submodules only, so a partitioned newcomer would
    run its forward on empty placeholders.
    """
    with _transformers_zero3_flag(None):
        yield


def inference_config(config: dict) -> dict:
    """A copy of a training DeepSpeed ``config`` for a frozen ZeRO-3 model: same precision, partitioning and
    parameter offload, no optimizer, scheduler or optimizer offload."""
    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler", "zero_force_ds_cpu_optimizer", "gradient_clipping"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    return config


@contextlib.contextmanager
def partitioned_frozen_model(trainer, load: Callable[[], nn.Module]) -> Iterator[nn.Module]:
    """A frozen model that ``load()`` builds straight into ZeRO-3 shards, runnable inside the block.

    For a model needed for a one-off pass outside ``configure_model`` (DPO's reference for its log-prob
    cache): the training engine registered its parameter-gathering hooks on the LightningModule's own
    submodules only, so the newcomer gets a ZeRO-3 engine of its own, with no optimizer (as TRL and OpenRLHF
    hold their reference models). Each rank then holds 1/world of the weights, in the training dtype, and a
    forward gathers one layer at a time. The engine and its shards are released on exit.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = inference_config(trainer.strategy.config)
    with _transformers_zero3_flag(HfDeepSpeedConfig(config)):
        model = load()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    try:
        yield engine.module
    finally:
        engine.destroy()  # removes its hooks; the shards go with the last reference to the model
        del engine, model


@contextlib.contextmanager
def gathered(modules: nn.Module | list[nn.Module], modifier_rank: int | None = None) -> Iterator[None]:
    """Whole parameters of ``modules`` inside the block (no-op unless they are ZeRO-3 partitioned).

    With ``modifier_rank=r`` the values rank ``r`` writes are re-partitioned to every rank on exit. The
    gather costs one full copy of the modules' weights per rank for the duration of the block.
    """
    modules = modules if isinstance(modules, list) else [modules]
    with gathered_tensors([p for m in modules for p in m.parameters()], modifier_rank):
        yield


@contextlib.contextmanager
def gathered_tensors(tensors: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Like :func:`gathered` for some parameters; tensors that are not ZeRO-3 shards pass through."""
    params = [t for t in tensors if hasattr(t, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def local_shards(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of this rank's piece of each parameter: the ZeRO-3 shard, or the whole tensor."""
    for name, param in module.named_parameters():
        yield name, (param.ds_tensor if hasattr(param, "ds_tensor") else param.data)


def _parameter_offload(trainer):
    """DeepSpeed's ZeRO-3 hook owner (it gathers parameters around each submodule's forward), or None."""
    engine = getattr(getattr(trainer, "strategy", None), "model", None)
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") else None


@contextlib.contextmanager
def whole_model_for_generation(trainer, model: nn.Module) -> Iterator[None]:
    """``model`` with whole weights and ZeRO-3's per-layer hooks off, for a ``generate`` call.

    Gathering once for the whole call costs one full copy of the model per rank but no communication per
    token; without it every layer of every decoding step would all-gather its weights (and every rank would
    have to keep stepping until the slowest finished: ``synced_gpus``). Hooks are restored on exit.
    """
    offload = _parameter_offload(trainer) if is_partitioned(model) else None
    with gathered(model):
        if offload is None:
            yield
            return
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def accept_client_optimizer(config: dict) -> None:
    """Let DeepSpeed step the module's own optimizer when ZeRO-Offload holds the optimizer state on the CPU.

    DeepSpeed refuses any optimizer but its ``DeepSpeedCPUAdam`` under ``offload_optimizer`` unless the
    config sets ``zero_force_ds_cpu_optimizer: false``. That switch is the right default here, not swapping
    in ``DeepSpeedCPUAdam``: the modules' AdamW (or the ``optimizer:`` a user names in YAML) stays the
    optimizer that runs, with its parameter groups; and ``DeepSpeedCPUAdam`` needs DeepSpeed's ``cpu_adam``
    C++ op, which a plain ``pip install deepspeed`` does not ship and which compiles on first use (minutes,
    and a compiler on every node). The cost is speed: torch's AdamW steps the fp32 master weights on the CPU
    several times slower than the vectorised ``cpu_adam``. For a large run, name
    ``deepspeed.ops.adam.DeepSpeedCPUAdam`` as the YAML ``optimizer:`` (DeepSpeed accepts it without the
    switch). A value the config sets itself is kept. Call before the engine is built (a module's ``setup``).
    """
    config.setdefault("zero_force_ds_cpu_optimizer", False)


def configure_for_manual_accumulation(config: dict, max_grad_norm: float | None, owner: str) -> None:
    """Make a DeepSpeed ``config`` fit a module that accumulates micro-batches itself (PPO, DPO-Iter).

    Such a module backpropagates every micro-batch and calls ``step()`` once per mini-batch, marking the
    micro-batches with :func:`start_micro_batch`. DeepSpeed clips gradients inside its step
    (Lightning's ``clip_gradients`` does nothing there), so ``max_grad_norm`` goes into the config. Call
    before the engine is built (a module's ``setup``).
    """
    clip = max_grad_norm or 0.0
    theirs = config.get("gradient_clipping")
    if theirs not in (None, 0, 0.0, clip):
        raise ValueError(
            f"{owner}: max_grad_norm={max_grad_norm} but the DeepSpeed config sets "
            f"gradient_clipping={theirs}; set one of them (or make them equal)"
        )
    config["gradient_clipping"] = clip


def start_micro_batch(trainer, is_last: bool) -> None:
    """Before a micro-batch's forward in a module's own accumulation loop (no-op without DeepSpeed).

    DeepSpeed counts micro-batches in its engine's ``forward``, which Lightning calls once per
    ``training_step``; a loop of several forward/backward pairs inside one step must count them itself, or
    ZeRO-3 overwrites the gradient partitions at each backward instead of adding to them (only the last
    micro-batch would count). It also marks the last backward before ``step()`` as the accumulation
    boundary, where ZeRO reduces gradients across ranks.
    """
    engine = getattr(getattr(trainer, "strategy", None), "model", None)
    if not hasattr(engine, "set_gradient_accumulation_boundary"):
        return
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if clear is not None:
        clear()
    engine.set_gradient_accumulation_boundary(is_last)
