"""What every on-policy module shares: reward sources, sampling, setup checks and one update loop.

``PPOModule`` (with its critic-free estimators) and ``IterativeDPOModule`` learn from responses their own
policy samples during training. Both take their shared settings through :class:`OnPolicyModule` (their
``**kwargs`` reach its ``__init__``; LightningCLI lists those arguments, with their docs, under the
subclass), sample and score through :func:`lightning_rlhf.rollout.collect.sample_and_score` with the
arguments :meth:`OnPolicyModule.sampling_arguments` gives, and update through
:meth:`OnPolicyModule.update_loop`. A subclass supplies only what is its own: how a rollout becomes
training rows and the loss of one micro-batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.lora import LoraSettings, check_dropout
from lightning_rlhf.models import (
    disable_dropout,
    freeze,
    load_reward_model,
    load_tokenizer,
)
from lightning_rlhf.modules.base import HFModelModule, NonFinitePolicy, enable_gradient_checkpointing
from lightning_rlhf.modules.reference import load_frozen_reference
from lightning_rlhf.rollout.collect import Placement, RewardSources
from lightning_rlhf.rollout.generation import SamplingConfig
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lightning_rlhf.validation import (
    ConfigError,
    check,
    check_callable,
    check_choice,
    check_divides,
    check_each,
)
from lightning_rlhf.zero import (
    configure_for_manual_accumulation,
    is_partitioned,
    start_micro_batch,
    whole_model_for_generation,
    zero_stage,
)

RewardFn = Callable[[list[str], list[str]], Any]


@dataclass
class MicroStep:
    """One micro-batch's part of an optimizer step, as a subclass's ``micro_step`` returns it."""

    loss: Tensor
    """The micro-batch's loss (a mean over its own rows or tokens)."""
    weight: Tensor | float
    """Its share of the mini-batch: ``loss * weight`` summed over micro-batches is the mini-batch's loss."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Loss terms checked for NaN/inf with the loss (named in the error)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached values to log; kept only for micro-batches whose step was taken."""


class OnPolicyModule(HFModelModule):
    """Base of the modules that sample their own training data (PPO, GRPO, RLOO, REINFORCE++, DPO-Iter).

    It owns the reward sources (reward model, reward function, gold function, missing-EOS penalty), the
    sampling settings (:class:`~lightning_rlhf.rollout.generation.SamplingConfig`), the checks of tokenizer,
    EOS and vocabulary, where generation runs (ZeRO-3 placement, the vLLM engine), DDP's ``no_sync`` between
    micro-batches and the one update loop (epochs, shuffled mini-batches, micro-batch accumulation, the
    nonfinite guard, clipping, early stop). Optimization is manual: one training step is one rollout.
    """

    #: hyper-parameters that are objects, recorded by the subclass in its own form (or not at all)
    hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: str,
        reward_model: str | None = None,
        reward_function: RewardFn | None = None,
        gold_function: RewardFn | None = None,
        reference_model: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generation_batch_size: int = 64,
        zero3_generation: Literal["gather", "synced"] = "gather",
        generation_engine: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSettings | None = None,
        missing_eos_penalty: float | None = None,
        mini_batch_size: int = 32,
        micro_batch_size: int = 8,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or ``save_pretrained`` folder (usually the SFT model).
            reward_model: A reward model (scalar head; e.g. from RewardModule) scoring prompt + response.
            reward_function: ``f(prompts, responses, **columns) -> scores`` (import path or class_path),
                given the prompt data's columns that its signature names; adds to the reward model's score.
            gold_function: Like reward_function but only logged (``*/gold_score``), never trained on.
            reference_model: Reference weights when not the initial policy (default: the policy's).
            max_new_tokens: Longest sampled response, in tokens.
            temperature: Sampling temperature (> 0: the methods learn from samples, not greedy decoding).
            top_k: Sample only from the k most likely tokens (0 = off).
            top_p: Nucleus sampling mass (1.0 = off).
            generation_batch_size: Prompts per generate call (memory knob; other values draw other samples).
            zero3_generation: Under ZeRO-3, ``gather`` the policy's whole weights once per rollout (fast; one
                full copy per rank) or keep them partitioned and decode with ``synced`` ranks (least memory).
            generation_engine: Who samples: HF ``generate`` on the policy (``hf``) or a colocated vLLM engine
                built from ``model`` that receives the policy's weights before every rollout (``vllm``;
                needs vllm installed; under ZeRO-3 the weights are gathered one module at a time).
            vllm: Settings of the vLLM engine (dtype, max_model_len, seed, memory share, sleep mode).
            missing_eos_penalty: Subtracted from the score of responses that never emit EOS (None = off).
            mini_batch_size: Sequences (PPO) or pairs (DPO-Iter) per optimizer step.
            micro_batch_size: Sequences or pairs per forward/backward (accumulated); divides mini_batch_size.
            learning_rate: Policy AdamW learning rate.
            weight_decay: AdamW weight decay (biases and norms excluded).
            max_grad_norm: Clip gradients to this global norm (None = off).
            disable_dropout: Turn dropout off in the trained models (log-probs are compared across forwards).
            lora: Train LoRA adapters instead of all weights; the reference is then the policy with its
                adapters off (unless reference_model is given). Needs the ``peft`` extra.
            gradient_checkpointing: Recompute the trained models' activations in backward (less memory).
            trust_remote_code: Allow model code shipped with checkpoints to run (off for safety).
            nonfinite: A NaN/inf loss term or gradient: 'raise' (naming step, rows, term) or 'skip' that
                mini-batch's optimizer step and count it (train/nonfinite_skipped).
        """
        super().__init__(learning_rate, weight_decay, nonfinite)  # checks both, names them
        self.automatic_optimization = False
        owner = type(self).__name__
        check_choice(owner, "zero3_generation", zero3_generation, ("gather", "synced"))
        check_choice(owner, "generation_engine", generation_engine, ("hf", "vllm"))
        if generation_engine == "vllm" and zero3_generation == "synced":
            raise ConfigError(
                f"{owner}: zero3_generation='synced' decodes with HF generate from ZeRO-3 shards, which "
                "generation_engine='vllm' does not do (the engine holds whole weights, streamed one module "
                "at a time); drop zero3_generation or use generation_engine='hf'"
            )
        sizes = {
            "max_new_tokens": max_new_tokens,
            "mini_batch_size": mini_batch_size,
            "micro_batch_size": micro_batch_size,
            "generation_batch_size": generation_batch_size,
        }
        check_each(owner, sizes, ge=1, integer=True)
        check(owner, "top_k", top_k, ge=0, integer=True)
        check(owner, "top_p", top_p, gt=0, le=1)
        # Learning from samples: greedy decoding (temperature 0) would make every sample the same.
        check(owner, "temperature", temperature, gt=0)
        check(owner, "max_grad_norm", max_grad_norm, gt=0, optional=True)
        check(owner, "missing_eos_penalty", missing_eos_penalty, ge=0, optional=True)
        check_callable(owner, "reward_function", reward_function)
        check_callable(owner, "gold_function", gold_function)
        check_divides(owner, ("micro_batch_size", micro_batch_size), ("mini_batch_size", mini_batch_size))
        # Collects this frame's arguments and the subclass's (Lightning walks the chain of __init__ frames).
        self.save_hyperparameters(
            ignore=["reward_function", "gold_function", "lora", "vllm", *self.hparams_ignore]
        )
        self.vllm_settings = VLLMSettings.build(vllm)
        self.hparams["vllm"] = self.vllm_settings.to_dict()
        self.lora = self._use_lora(lora)
        check_dropout(owner, self.lora, disable_dropout)
        self.reward_function = reward_function
        self.gold_function = gold_function
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, generation_engine)
        self.engine: VLLMEngine | None = None
        self.policy: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reward_model: PreTrainedModel | None = None
        self.tokenizer = None

    # ------------------------------------------------------------------ models
    def prepare_trained(self, model: PreTrainedModel) -> PreTrainedModel:
        """A trained model as the settings want it: dropout off, gradient checkpointing, train mode."""
        if self.hparams.disable_dropout:
            disable_dropout(model)
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        return model

    def load_frozen_reference(self) -> PreTrainedModel:
        """The reference as a separate frozen model: ``reference_model``, else the initial policy weights."""
        hp = self.hparams
        name = hp.reference_model or hp.model
        return load_frozen_reference(name, trust_remote_code=hp.trust_remote_code)

    def load_reward_sources(self, **others: PreTrainedModel | None) -> None:
        """Load the reward model and the tokenizer, and check them against the policy.

        The tokenizer needs an EOS token (a response ends there); the reward model and ``others`` (e.g. the
        critic) must share the policy's vocabulary, since they read the policy's token ids.
        """
        hp = self.hparams
        owner = type(self).__name__
        remote = {"trust_remote_code": hp.trust_remote_code}
        if hp.reward_model is not None:
            self.reward_model = freeze(load_reward_model(hp.reward_model, **remote))
            disable_dropout(self.reward_model)  # a score must not depend on a dropout draw
        self.tokenizer = load_tokenizer(hp.model, **remote)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"{owner}: the tokenizer of {hp.model} has no eos_token: cannot tell when a response ends"
            )
        for name, other in {"reward_model": self.reward_model, **others}.items():
            if other is not None and other.config.vocab_size != self.policy.config.vocab_size:
                raise ValueError(
                    f"{owner}: the {name} has vocabulary size {other.config.vocab_size} but the policy has "
                    f"{self.policy.config.vocab_size}; they must share the policy's tokenizer"
                )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        owner = type(self).__name__
        # Checked when fitting, not in __init__: a checkpoint does not store the reward function, and
        # export or evaluation from it must not demand one.
        if stage == "fit" and self.hparams.reward_model is None and self.reward_function is None:
            raise ValueError(f"{owner}: give a reward_model, a reward_function, or both")
        if zero_stage(self._trainer) is not None:
            configure_for_manual_accumulation(
                self._trainer.strategy.config, self.hparams.max_grad_norm, owner
            )
        if stage == "fit" and self.sampling.generation_engine == "vllm" and self.engine is None:
            self.engine = VLLMEngine(
                self.hparams.model, self.vllm_settings, local_rank=self._trainer.local_rank
            )

    # ------------------------------------------------------------------ sampling
    def sampling_arguments(self, *, training: bool = True) -> dict:
        """What :func:`~lightning_rlhf.rollout.collect.sample_and_score` (and ``collect_rollout``) need
        besides the prompts: the policy and tokenizer, the sampling settings, the reward sources and the
        placement (chunk sizes, ZeRO-3 mode, the vLLM engine and this rollout's seed).

        ``training=False`` (validation) samples with HF ``generate`` when no engine was built (outside
        ``fit``). With an engine, the policy's current weights are synced into it first.
        """
        sampling = self.sampling
        if not training and self.engine is None:
            sampling = replace(sampling, generation_engine="hf")
        placement = Placement(
            micro_batch_size=self.hparams.micro_batch_size,
            generation_batch_size=self.hparams.generation_batch_size,
            **self._generation_placement(),
            **self._engine_arguments(),
        )
        rewards = RewardSources(self.reward_model, self.reward_function, self.gold_function)
        return {
            "policy": self.policy,
            "tokenizer": self.tokenizer,
            "sampling": sampling,
            "rewards": rewards,
            "placement": placement,
        }

    def generation_is_synced(self) -> bool:
        """Whether ranks decode in step from ZeRO-3 shards (no sampling log-probs can be read then)."""
        return bool(self._generation_placement().get("synced_gpus"))

    def after_sampling(self) -> None:
        """With vLLM sleep mode (GPU), hand the engine's memory to the update phase."""
        if self.engine is not None:
            self.engine.sleep()

    def _engine_arguments(self) -> dict:
        """The vLLM engine, given the policy's current weights, and this rollout's seed (run, step, rank)."""
        if self.engine is None:
            return {}
        # Synced before every rollout rather than after each update: a resumed run's weights arrive after
        # setup, and the update phase is the only thing between two rollouts.
        self.engine.sync_weights(self.policy)
        key = f"{self.vllm_settings.seed}/{self.global_step}/{self.global_rank}".encode()
        return {"engine": self.engine, "seed": zlib.crc32(key)}

    def _generation_placement(self) -> dict:
        """How ``generate`` sees a ZeRO-3 policy: whole weights gathered once, or shards, ranks in step.

        Nothing with a vLLM engine: it samples from its own whole copy of the weights."""
        if self.engine is not None or not is_partitioned(self.policy):
            return {}
        if self.hparams.zero3_generation == "gather":
            return {"generation_context": lambda: whole_model_for_generation(self.trainer, self.policy)}
        return {"synced_gpus": self.trainer.world_size > 1}

    # ------------------------------------------------------------------ the update loop
    def update_loop(
        self,
        num_rows: int,
        epochs: int,
        micro_step: Callable[[Tensor, Tensor], MicroStep],
        *,
        arrange: Callable[[Tensor], Tensor] | None = None,
        should_stop: Callable[[list[MicroStep]], bool] | None = None,
    ) -> tuple[list[MicroStep], bool]:
        """``epochs`` shuffled passes over ``num_rows`` rows in mini-batches of ``mini_batch_size`` rows.

        Each mini-batch is one optimizer step, accumulated over micro-batches of ``micro_batch_size`` rows:
        ``micro_step(rows, mini_batch_rows)`` returns the micro-batch's loss and its weight in the
        mini-batch. ``arrange`` may reorder a mini-batch's rows first (free: the gradients add up to the
        same step). A non-finite loss term raises, or with ``nonfinite='skip'`` drops that mini-batch's step.
        ``should_stop(steps_of_this_mini_batch)`` after each optimizer step ends the loop early (it must
        decide the same on every rank). The last mini-batch of a pass may be smaller. Returns the
        micro-steps of the steps taken and whether the loop stopped early.
        """
        hp = self.hparams
        optimizer = self.optimizers()
        taken: list[MicroStep] = []
        for _ in range(epochs):
            order = torch.randperm(num_rows, device=self.device)
            for mini in order.split(hp.mini_batch_size):
                if arrange is not None:
                    mini = arrange(mini)
                optimizer.zero_grad()
                steps: list[MicroStep] = []
                micros = mini.split(hp.micro_batch_size)
                for i, rows in enumerate(micros):
                    last = i == len(micros) - 1
                    start_micro_batch(self._trainer, is_last=last)
                    with self._gradient_sync(last):
                        step = micro_step(rows, mini)
                        if not self.finite_or_skip({**step.terms, "loss": step.loss}, {"index": rows}):
                            steps = []
                            break  # nonfinite="skip": this mini-batch makes no optimizer step
                        self.manual_backward(step.loss * step.weight)
                    steps.append(step)
                if not steps:
                    optimizer.zero_grad()
                    continue
                if hp.max_grad_norm is not None:
                    self.clip_gradients(
                        optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                optimizer.step()
                taken.extend(steps)
                if should_stop is not None and should_stop(steps):
                    return taken, True
        return taken, False

    def _gradient_sync(self, last_micro_batch: bool) -> AbstractContextManager:
        """DDP all-reduces gradients only after the last micro-batch of a mini-batch (``no_sync`` before).

        Manual optimization gets no automatic ``no_sync``: without this every micro-batch's backward paid a
        full gradient all-reduce. The gradients DDP averages at the last backward include the ones
        accumulated locally before it, so the result is the same. Strategies without DDP (DeepSpeed, FSDP,
        single device) are left alone.
        """
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        # DeepSpeed's strategy inherits block_backward_sync from DDP, but its engine refuses no_sync under
        # ZeRO (it accumulates and reduces at the boundary itself: see zero.start_micro_batch).
        if last_micro_batch or block is None or zero_stage(self.trainer) is not None:
            return nullcontext()
        return block()


def mean_metrics(steps: list[MicroStep]) -> dict[str, Tensor]:
    """Each metric's mean over the micro-steps that report it."""
    values: dict[str, list[Tensor]] = {}
    for step in steps:
        for key, value in step.metrics.items():
            values.setdefault(key, []).append(value)
    return {key: torch.stack(v).mean() for key, v in values.items()}
