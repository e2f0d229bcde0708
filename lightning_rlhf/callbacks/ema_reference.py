"""Move the reference model towards the policy by an exponential moving average during training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rlhf.modules.reference import move_towards_policy, moving_tensors
from lightning_rlhf.validation import check


class EMAReferenceUpdate(Callback):
    """``reference ← (1 − η) · reference + η · policy`` with ``η = decay``, every few optimizer steps.

    Xu et al. (2024, "Is DPO Superior to PPO for LLM Alignment?") count an EMA reference among PPO's key
    factors (with advantage normalization and a large rollout batch): the KL penalty then measures the
    distance to a slowly moving average of recent policies rather than to the initial one. The default
    ``decay`` (η = 0.001) is the ``ref_ema_eta`` of ReaLHF's ``PPORefEMAConfig``, the paper's code, which
    also applies it once per PPO step. Note that η is the weight of the *policy* (1 = copy the policy): it
    is ``1 − d`` for the "decay" ``d`` ≈ 0.999 of ``torch.optim.swa_utils.get_ema_avg_fn``.

    When: checked in ``on_train_batch_end``, i.e. after a DPO optimizer step, or after the *whole* update
    phase of a PPO rollout. :meth:`should_update` gets ``step = trainer.global_step`` (optimizer steps so
    far) and by default says yes once ``step >= start_step`` and at least ``every_n_steps`` optimizer steps
    have passed since the last update. PPO makes several optimizer steps per training batch
    (``ppo_epochs × rollout / mini_batch_size``), so there the EMA is applied at most once per rollout:
    with ``every_n_steps=1``, after every rollout, with one η (η is not scaled by the optimizer steps).

    Works with any module holding ``policy`` and ``reference`` ``nn.Module`` attributes of the same
    architecture (``PPOModule``, ``DPOModule`` with a live reference). Parameters are matched by name;
    floating-point buffers are averaged too. Each update runs under ``no_grad`` in at least float32, so a
    bf16 reference is averaged in float32 and rounded once when stored (with η = 0.001, a change below half
    a bf16 step is lost: keep the reference in float32 if that matters).

    A fixed η per update ties the EMA's strength to the rollout size: after 96 rollouts of 64 prompts
    ``0.95^96`` ≈ 0.7 % of the initial reference remains, after 12 of 512 it is 54 %. ``decay_per_sample``
    sets η per *sampled sequence* instead: an update after ``n`` sequences (every rank's training-batch rows
    since the last update — PPO: prompts, times its ``num_generations``; DPO: chosen and rejected rows)
    uses ``η = 1 − (1 − decay_per_sample)^n``, so runs of any rollout size that see the same number of
    samples keep the same share of the initial reference, ``(1 − decay_per_sample)^samples``.

    The averaged weights are the module's own ``reference`` submodule, so they are saved in checkpoints and
    restored on resume with the rest of the module; the counters ``updates``, ``last_update_step`` and
    ``samples_since_update`` are this callback's ``state_dict``.
    """

    def __init__(
        self,
        decay: float = 0.001,
        every_n_steps: int = 1,
        start_step: int = 0,
        decay_per_sample: float | None = None,
    ) -> None:
        """
        Args:
            decay: η, the policy's weight in each update, in (0, 1] (ReaLHF's ref_ema_eta; 1 = copy policy).
            every_n_steps: Optimizer steps between updates, at least (PPO: at most one update per rollout).
            start_step: No update before this many optimizer steps.
            decay_per_sample: η per sampled sequence, in (0, 1): each update's η is
                ``1 − (1 − decay_per_sample)^n`` for the ``n`` sequences trained on since the last one
                (replaces ``decay``; None = off).
        """
        check("EMAReferenceUpdate", "decay", decay, gt=0, le=1)
        check("EMAReferenceUpdate", "decay_per_sample", decay_per_sample, gt=0, lt=1, optional=True)
        check("EMAReferenceUpdate", "every_n_steps", every_n_steps, ge=1, integer=True)
        check("EMAReferenceUpdate", "start_step", start_step, ge=0, integer=True)
        if 0.5 < decay < 1:
            rank_zero_warn(
                f"EMAReferenceUpdate: decay={decay} is η, the weight of the *policy*: the reference becomes "
                f"nearly a copy of the policy at every update. For an EMA that keeps {decay} of the old "
                f"reference, use decay={1 - decay:.6g}."
            )
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.decay_per_sample = decay_per_sample
        self.updates = 0
        """How many EMA updates have been applied."""
        self.last_update_step = 0
        """``trainer.global_step`` at the last update (0 before the first)."""
        self.samples_since_update = 0
        """Sequences trained on (all ranks) since the last update; counted only with decay_per_sample."""
        self.last_eta = 0.0
        """η of the last update."""

    @property
    @override
    def state_key(self) -> str:
        per_sample = {} if self.decay_per_sample is None else {"decay_per_sample": self.decay_per_sample}
        return self._generate_state_key(
            decay=self.decay, every_n_steps=self.every_n_steps, start_step=self.start_step, **per_sample
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"updates": self.updates, "last_update_step": self.last_update_step}
        if self.decay_per_sample is not None:
            state["samples_since_update"] = self.samples_since_update
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self.last_update_step = int(state_dict["last_update_step"])
        self.samples_since_update = int(state_dict.get("samples_since_update", 0))

    def eta(self) -> float:
        """η of an update now: ``decay``, or from ``decay_per_sample`` and the samples since the last one."""
        if self.decay_per_sample is None:
            return self.decay
        return 1.0 - (1.0 - self.decay_per_sample) ** self.samples_since_update

    def should_update(self, step: int) -> bool:
        """Whether to update after ``step`` optimizer steps (``trainer.global_step``); override to customise.

        Called at most once per optimizer step count (never twice for the same ``step``).
        """
        return step >= self.start_step and step - self.last_update_step >= self.every_n_steps

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._models(pl_module)
        pl_module.reference_in_checkpoint = True  # the reference now changes: checkpoints must carry it

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.decay_per_sample is not None:
            generations = int(getattr(pl_module, "hparams", {}).get("num_generations", 1) or 1)
            self.samples_since_update += _rows(batch) * generations * getattr(trainer, "world_size", 1)
        step = trainer.global_step
        # `step > last_update_step`: with gradient accumulation several batches end at the same step.
        if step > self.last_update_step and self.should_update(step):
            reference, policy = self._models(pl_module)
            self.last_eta = self.eta()
            self._update_parameters(reference, policy)
            self.updates += 1
            self.last_update_step = step
            self.samples_since_update = 0

    def _update_parameters(self, reference: nn.Module, policy: nn.Module) -> None:
        """One EMA step (:func:`lightning_rlhf.modules.reference.move_towards_policy`): parameter by
        parameter, matched by name; under ZeRO-3 one gathered tensor pair at a time."""
        move_towards_policy(reference, policy, self.last_eta)

    def _models(self, pl_module: LightningModule) -> tuple[nn.Module, nn.Module]:
        """(reference, policy) of the module, after checking the EMA can run on them."""
        owner = type(pl_module).__name__
        if getattr(pl_module, "hparams", {}).get("lora") is not None:
            raise ValueError(
                f"EMAReferenceUpdate does not support LoRA ({owner} has lora set): the reference is the base "
                "model with the adapters off, and an average of adapter factors A, B is not an average of "
                "their update B·A. Remove the EMAReferenceUpdate callback, or set the model's lora: null"
            )
        policy = getattr(pl_module, "policy", None)
        reference = getattr(pl_module, "reference", None)
        if not isinstance(policy, nn.Module):
            raise TypeError(
                f"EMAReferenceUpdate needs a module with a `policy` nn.Module (PPOModule, DPOModule); "
                f"{owner}.policy is {type(policy).__name__}"
            )
        hparams = getattr(pl_module, "hparams", {})
        if reference is None or hparams.get("precompute_reference", False):
            raise ValueError(
                f"EMAReferenceUpdate: {owner} has no live reference model to update ({owner}.reference is "
                f"{type(reference).__name__}, precompute_reference={hparams.get('precompute_reference')}). "
                "DPOModule holds none with precompute_reference=True (cached reference log-probs cannot "
                "follow an EMA) or with a reference_free loss: set precompute_reference=false with a loss "
                "that uses a reference, or remove the callback."
            )
        if not isinstance(reference, nn.Module):
            raise TypeError(
                f"EMAReferenceUpdate: {owner}.reference must be an nn.Module, not {type(reference).__name__}"
            )
        if reference is policy:
            raise ValueError(
                f"EMAReferenceUpdate: {owner}.reference is the policy object itself; the reference must be "
                "a separate copy of the weights"
            )
        ref_shapes = {name: _shape(t) for name, t in moving_tensors(reference)}
        pol_shapes = {name: _shape(t) for name, t in moving_tensors(policy)}
        if ref_shapes != pol_shapes:
            missing = sorted(set(ref_shapes) - set(pol_shapes))
            extra = sorted(set(pol_shapes) - set(ref_shapes))
            shapes = [
                f"{n}: reference {ref_shapes[n]} vs policy {pol_shapes[n]}"
                for n in sorted(set(ref_shapes) & set(pol_shapes))
                if ref_shapes[n] != pol_shapes[n]
            ]
            raise ValueError(
                f"EMAReferenceUpdate: {owner}.reference and {owner}.policy must have the same parameter "
                f"names and shapes. Only in the reference: {missing[:5]}; only in the policy: {extra[:5]}; "
                f"different shapes: {shapes[:5]}. (A PEFT/LoRA-wrapped policy or a reference_model of "
                "another architecture cannot be averaged into the reference.)"
            )
        return reference, policy


def _rows(batch: Any) -> int:
    """Rows of a training batch: a mapping's first tensor's (or list's) length, or a tensor's."""
    values = batch.values() if isinstance(batch, Mapping) else [batch]
    for value in values:
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    raise TypeError(
        f"EMAReferenceUpdate(decay_per_sample=...) cannot count the rows of a {type(batch).__name__} batch; "
        "use decay instead"
    )


def _shape(tensor: Tensor) -> tuple[int, ...]:
    # A ZeRO-3 partitioned parameter reports an empty shape; its real one is ds_shape.
    return tuple(getattr(tensor, "ds_shape", tensor.shape))
