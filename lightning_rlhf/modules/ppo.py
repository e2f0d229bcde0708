"""PPO for language models inside ``Trainer.fit``: one training step = one rollout + its PPO updates."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.callbacks.progress import report_phase
from lightning_rlhf.lora import AdaptersDisabled, LoraSettings, apply_lora, check_dropout
from lightning_rlhf.losses import (
    LOSS_AGGREGATIONS,
    aggregate_token_losses,
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
)
from lightning_rlhf.models import (
    disable_dropout,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    response_token_logprobs,
    response_values,
)
from lightning_rlhf.modules.base import (
    HFModelModule,
    NonFinitePolicy,
    adamw,
    adamw_param_groups,
    build_object,
    enable_gradient_checkpointing,
    object_spec,
)
from lightning_rlhf.ops import kl_k3, masked_mean, masked_var
from lightning_rlhf.rewards.calling import repeat_columns, reward_source_metrics
from lightning_rlhf.rollout.advantages import GAE, AdvantageEstimator
from lightning_rlhf.rollout.collect import (
    ShapingConfig,
    collect_rollout,
    explained_variance,
    sample_and_score,
)
from lightning_rlhf.rollout.generation import SamplingConfig
from lightning_rlhf.rollout.hooks import call_rollout_hooks
from lightning_rlhf.rollout.shaping import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    sequence_kl,
)
from lightning_rlhf.rollout.types import Rollout, length_order
from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lightning_rlhf.validation import ConfigError, check, check_callable, check_choice, check_divides
from lightning_rlhf.zero import (
    configure_for_manual_accumulation,
    is_partitioned,
    start_micro_batch,
    whole_model_for_generation,
    zero_stage,
)

RewardFn = Callable[[list[str], list[str]], Any]


class FirstStepCheckError(RuntimeError):
    """The first PPO update found policy, sampler and reference inconsistent (see the message)."""


class PPOModule(HFModelModule):
    """PPO with a critic and a KL penalty to a frozen reference (Ouyang et al. 2022; Xu et al. 2024).

    Each training batch is a *rollout batch* of prompts (from :class:`~lightning_rlhf.PromptDataModule`).
    The step samples responses with the policy (KV cache), scores them with the reward model and/or reward
    function, computes old log-probs, reference log-probs and values once in batched inference, shapes the
    rewards (KL penalty on every token, score on the last) and GAE advantages, lets callbacks see or change
    the rollout (``on_rollout_end(trainer, pl_module, rollout)``; e.g. ``AdvantageNormalization``), and then
    runs ``ppo_epochs`` passes of shuffled mini-batch updates, each mini-batch accumulated over micro-batches.
    Policy and critic share one optimizer with a parameter group each (DeepSpeed allows one optimizer), so
    ``trainer.global_step`` counts mini-batch updates.

    The paper's recipe is three switches: a large rollout batch (the prompt loader's ``batch_size``, 512 in
    the paper), ``AdvantageNormalization`` and ``EMAReferenceUpdate`` callbacks (configs/ppo/paper.yaml).

    With ``lora`` the policy and the critic each get their own LoRA adapters (the critic stays a separate
    model initialised from the reward model, its ``score`` head trained fully), and the reference is the
    policy with its adapters off: no reference copy is held. ``EMAReferenceUpdate`` is refused with LoRA.
    """

    batch_keys = ("prompt", "input_ids", "attention_mask")
    data_module = "PromptDataModule"

    def __init__(
        self,
        model: str,
        reward_model: str | None = None,
        reward_function: RewardFn | None = None,
        gold_function: RewardFn | None = None,
        critic_model: str | None = None,
        reference_model: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        ppo_epochs: int = 1,
        mini_batch_size: int = 32,
        micro_batch_size: int = 8,
        generation_batch_size: int = 64,
        zero3_generation: Literal["gather", "synced"] = "gather",
        old_logprobs: Literal["forward", "sampling"] = "forward",
        generation_engine: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSettings | None = None,
        clip_range: float = 0.2,
        dual_clip: float | None = None,
        clip_range_value: float | None = 0.2,
        value_loss_coef: float = 1.0,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.1,
        kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        score_clip: float | None = None,
        normalize_scores: bool = False,
        missing_eos_penalty: float | None = None,
        early_stop_kl: float | None = None,
        learning_rate: float = 1e-6,
        critic_learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        check_first_step: bool = True,
        first_step_tolerance: float = 1e-3,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
        advantage: AdvantageEstimator | None = None,
        num_generations: int = 1,
        kl_penalty: Literal["reward", "loss"] = "reward",
        loss_aggregation: Literal["token_mean", "sequence_mean", "constant_length_sum"] = "token_mean",
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or ``save_pretrained`` folder (usually the SFT model).
            reward_model: A reward model (scalar head; e.g. from RewardModule) scoring prompt + response.
            reward_function: ``f(prompts, responses, **columns) -> scores`` (import path or class_path),
                given the prompt data's columns that its signature names; adds to the RM.
            gold_function: Like reward_function but only logged (``rollout/gold_score``), never trained on.
            critic_model: Critic initialisation (default: the reward model if given, else the policy).
            reference_model: Reference weights when not the initial policy (default: the policy's).
            max_new_tokens: Longest sampled response, in tokens.
            temperature: Sampling temperature of the rollouts.
            top_k: Sample only from the k most likely tokens (0 = off).
            top_p: Nucleus sampling mass (1.0 = off).
            ppo_epochs: Passes over each rollout batch.
            mini_batch_size: Sequences per optimizer step; must divide the rollout batch size (default: one
                step per PromptDataModule batch of its default 32 prompts per ppo_epoch).
            micro_batch_size: Sequences per forward/backward (accumulated); must divide mini_batch_size.
            generation_batch_size: Prompts per generate call (memory knob; other values draw other samples).
            zero3_generation: Under ZeRO-3, ``gather`` the policy's whole weights once per rollout (fast; one
                full copy per rank) or keep them partitioned and decode with ``synced`` ranks (least memory).
            old_logprobs: Where the rollout's old log-probs come from: a policy ``forward`` over the sampled
                sequences, like the update's (the first-step ratio is then exactly 1 in any precision), or
                the logits ``sampling`` drew each token from (one policy forward less per rollout, as TRL;
                equal up to KV-cache float noise: ~1e-6 in fp32, ~1e-3 in bf16, where the first-step
                check may need a larger first_step_tolerance). Under ZeRO-3 with
                ``zero3_generation="synced"`` the old log-probs always come from a forward.
            generation_engine: Who samples the rollouts: HF ``generate`` on the policy (``hf``) or a colocated
                vLLM engine built from ``model`` that receives the policy's weights before every rollout
                (``vllm``; needs vllm installed; not under ZeRO-3 yet).
            vllm: Settings of the vLLM engine (dtype, max_model_len, seed, memory share, sleep mode).
            clip_range: PPO ratio clip epsilon (> 0).
            dual_clip: Dual-clip constant c > 1 bounding the loss of negative advantages (None = off).
            clip_range_value: Value clip around the rollout's values (None = unclipped value loss).
            value_loss_coef: Weight of the value loss.
            entropy_coef: Weight of the entropy bonus (0 = off).
            kl_coef: (Initial) coefficient of the per-token KL penalty to the reference.
            kl_estimator: KL estimator of the penalty: k1 (log-ratio), k2, or k3.
            target_kl: With a value, adapt kl_coef so the per-sequence KL tracks it (Ziegler et al.).
            kl_horizon: Horizon (in sequences) of the adaptive KL controller.
            gamma: Discount of GAE.
            lam: Lambda of GAE.
            score_clip: Clip scores to [-score_clip, score_clip] (None = off).
            normalize_scores: Standardise scores by running mean and std.
            missing_eos_penalty: Subtracted from the score of responses that never emit EOS (None = off).
            early_stop_kl: End a rollout's updates early once the approximate KL passes this (None = off).
            learning_rate: Policy AdamW learning rate.
            critic_learning_rate: Critic AdamW learning rate.
            weight_decay: AdamW weight decay (biases and norms excluded).
            max_grad_norm: Clip gradients to this global norm (None = off).
            disable_dropout: Turn dropout off in policy and critic (PPO compares log-probs across forwards).
            check_first_step: At the first update check ratio == 1 and policy-reference KL == 0.
            first_step_tolerance: Largest |log-ratio| the first-step check accepts.
            lora: LoRA adapters on the policy and (separately) the critic instead of training all weights;
                the reference is then the policy with adapters off (unless reference_model is given).
            gradient_checkpointing: Recompute policy and critic activations in backward (less memory).
            trust_remote_code: Allow model code shipped with checkpoints to run (off for safety).
            nonfinite: A NaN/inf loss term or gradient: 'raise' (naming step, rows, term) or 'skip' the step
                and count it (train/nonfinite_skipped).
            advantage: How advantages are estimated (class_path): GAE with the critic (default, PPO), or
                critic-free from the num_generations responses to each prompt: GRPO (scale_rewards: false is
                Dr. GRPO), RLOO, REINFORCEPlusPlus (see lightning_rlhf.rollout.advantages). No critic is
                built, trained or checkpointed for the critic-free ones.
            num_generations: Responses sampled per prompt in each rollout (a group); the rollout then holds
                batch_size x num_generations sequences, and mini_batch_size counts sequences.
            kl_penalty: Where the KL to the reference goes: 'reward' (PPO: -kl_coef x KL_t in each token's
                reward, kl_estimator) or 'loss' (GRPO: kl_coef x the k3 estimate of the updated policy's KL,
                aggregated like the policy loss, added to the loss).
            loss_aggregation: How token losses make the loss: 'token_mean' over the mini-batch (default),
                'sequence_mean' (each response weighs the same: GRPO), 'constant_length_sum' (sum over
                max_new_tokens: Dr. GRPO).
        """
        super().__init__(learning_rate, weight_decay, nonfinite)  # checks both, names them
        self.automatic_optimization = False
        owner = "PPOModule"
        check(owner, "num_generations", num_generations, ge=1, integer=True)
        check_choice(owner, "kl_penalty", kl_penalty, ("reward", "loss"))
        check_choice(owner, "loss_aggregation", loss_aggregation, LOSS_AGGREGATIONS)
        estimator = build_object(advantage, AdvantageEstimator) if advantage is not None else GAE()
        if num_generations < estimator.min_group_size:
            raise ConfigError(
                f"{owner}: advantage {estimator!r} compares responses to the same prompt, so it needs "
                f"num_generations >= {estimator.min_group_size} (got {num_generations})"
            )
        check_choice(owner, "zero3_generation", zero3_generation, ("gather", "synced"))
        check_choice(owner, "old_logprobs", old_logprobs, ("forward", "sampling"))
        check_choice(owner, "generation_engine", generation_engine, ("hf", "vllm"))
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("ppo_epochs", ppo_epochs),
            ("mini_batch_size", mini_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("generation_batch_size", generation_batch_size),
            ("kl_horizon", kl_horizon),
        ):
            check(owner, name, value, ge=1, integer=True)
        check(owner, "top_k", top_k, ge=0, integer=True)
        check(owner, "top_p", top_p, gt=0, le=1)
        # PPO learns from samples: greedy decoding (temperature 0) would make every ratio degenerate.
        check(owner, "temperature", temperature, gt=0)
        for name, value in (
            ("clip_range", clip_range),
            ("critic_learning_rate", critic_learning_rate),
            ("first_step_tolerance", first_step_tolerance),
        ):
            check(owner, name, value, gt=0)
        for name, value in (
            ("kl_coef", kl_coef),
            ("entropy_coef", entropy_coef),
            ("value_loss_coef", value_loss_coef),
        ):
            check(owner, name, value, ge=0)
        for name, value in (
            ("clip_range_value", clip_range_value),
            ("score_clip", score_clip),
            ("early_stop_kl", early_stop_kl),
            ("target_kl", target_kl),
            ("max_grad_norm", max_grad_norm),
        ):
            check(owner, name, value, gt=0, optional=True)
        check(owner, "missing_eos_penalty", missing_eos_penalty, ge=0, optional=True)
        check(owner, "dual_clip", dual_clip, gt=1, optional=True)
        check(owner, "gamma", gamma, ge=0, le=1)
        check(owner, "lam", lam, ge=0, le=1)
        check_choice(owner, "kl_estimator", kl_estimator, ("k1", "k2", "k3"))
        check_callable(owner, "reward_function", reward_function)
        check_callable(owner, "gold_function", gold_function)
        check_divides(owner, ("micro_batch_size", micro_batch_size), ("mini_batch_size", mini_batch_size))
        if target_kl is not None and kl_coef == 0:
            raise ConfigError(
                f"{owner}: kl_coef must be > 0 with target_kl (the controller only rescales it)"
            )
        self.save_hyperparameters(ignore=["reward_function", "gold_function", "lora", "vllm", "advantage"])
        self.advantage = estimator
        self.hparams["advantage"] = object_spec(estimator)
        self.vllm_settings = VLLMSettings.build(vllm)
        self.hparams["vllm"] = self.vllm_settings.to_dict()
        self.lora = self._use_lora(lora)
        check_dropout("PPOModule", self.lora, disable_dropout)
        self.reward_function = reward_function
        self.gold_function = gold_function
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, generation_engine)
        self.engine: VLLMEngine | None = None
        self.shaping = ShapingConfig(
            kl_estimator, missing_eos_penalty, score_clip, normalize_scores, gamma, lam
        )
        self.kl_controller = (
            AdaptiveKLController(kl_coef, target_kl, kl_horizon)
            if target_kl is not None
            else FixedKLController(kl_coef)
        )
        self.score_moments = RunningMoments()
        self.policy: PreTrainedModel | None = None
        self.critic: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reward_model: PreTrainedModel | None = None
        self.tokenizer = None
        self._first_step_pending = check_first_step

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        hp = self.hparams
        if self.policy is not None:
            return
        remote = {"trust_remote_code": hp.trust_remote_code}
        self.policy = self.build_trained_model()
        if self.advantage.needs_critic:  # critic-free estimators hold no value model at all
            self.critic = load_reward_model(hp.critic_model or hp.reward_model or hp.model, **remote)
        trained = [m for m in (self.policy, self.critic) if m is not None]
        for model in trained:
            if hp.disable_dropout:
                disable_dropout(model)
            if hp.gradient_checkpointing:
                enable_gradient_checkpointing(model)
        if self.lora is not None and self.critic is not None:
            self.critic = apply_lora(self.critic, self.lora, "sequence_classification")
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        if self.lora is None or hp.reference_model is not None:  # with LoRA: the policy, adapters off
            # Loaded from disk, never deep-copied: under ZeRO-3 the policy is already partitioned here.
            self.reference = freeze(load_causal_lm(hp.reference_model or hp.model, **remote))
            disable_dropout(self.reference)
        if hp.reward_model is not None:
            self.reward_model = freeze(load_reward_model(hp.reward_model, **remote))
        self.tokenizer = load_tokenizer(hp.model, **remote)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of {hp.model} has no eos_token: PPO cannot tell when a response ends"
            )
        for name, other in (("reward_model", self.reward_model), ("critic", self.critic)):
            if other is not None and other.config.vocab_size != self.policy.config.vocab_size:
                raise ValueError(
                    f"PPOModule: the {name} has vocabulary size {other.config.vocab_size} but the policy has "
                    f"{self.policy.config.vocab_size}; they must share the policy's tokenizer"
                )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = []
        for model, lr in ((self.policy, hp.learning_rate), (self.critic, hp.critic_learning_rate)):
            if model is None:
                continue
            for group in adamw_param_groups(model, hp.weight_decay):
                groups.append({**group, "lr": lr})
        return adamw(groups)

    def build_trained_model(self) -> PreTrainedModel:
        policy = load_causal_lm(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return apply_lora(policy, self.lora, "causal_lm") if self.lora is not None else policy

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_state"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is not None:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.score_moments.load_state_dict(state["score_moments"])
        self._first_step_pending = False  # a resumed run no longer has policy == reference

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Checked when fitting, not in __init__: a checkpoint does not store the reward function, and
        # export or evaluation from it must not demand one.
        if stage == "fit" and self.hparams.reward_model is None and self.reward_function is None:
            raise ValueError("PPOModule: give a reward_model, a reward_function, or both")
        if zero_stage(self._trainer) is not None:
            configure_for_manual_accumulation(
                self._trainer.strategy.config, self.hparams.max_grad_norm, "PPOModule"
            )
        if stage == "fit" and self.sampling.generation_engine == "vllm" and self.engine is None:
            if zero_stage(self._trainer) == 3:
                raise ConfigError(
                    "PPOModule: generation_engine='vllm' does not support ZeRO-3 yet (the weight sync "
                    "would gather the partitioned policy); use generation_engine='hf' with ZeRO-3"
                )
            self.engine = VLLMEngine(self.hparams.model, self.vllm_settings)

    def on_fit_start(self) -> None:
        self.check_datamodule(getattr(self.trainer, "datamodule", None))

    def check_datamodule(self, datamodule: object) -> None:
        """The rollout batch (the prompt loader's ``batch_size``) must split into mini-batches.

        Called at fit start, and by the CLI right after parsing so a bad pair of flags fails before loading.
        """
        batch_size = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("batch_size")
        k = self.hparams.num_generations
        if batch_size is not None and (batch_size * k) % self.hparams.mini_batch_size:
            sequences = (
                f"data batch_size={batch_size}" if k == 1 else f"{batch_size} prompts x {k} generations"
            )
            raise ConfigError(
                f"the rollout batch ({sequences}) is not divisible by "
                f"model mini_batch_size={self.hparams.mini_batch_size}; make data.batch_size"
                f"{' x model.num_generations' if k > 1 else ''} a multiple of model.mini_batch_size"
            )

    # ------------------------------------------------------------------ the step
    def collect(self, batch: dict) -> Rollout:
        """Sample and score one rollout from a prompt batch, then let callbacks see it."""
        timings: dict[str, float] = {}
        placement = self._generation_placement()
        synced = bool(placement.get("synced_gpus"))
        k = self.hparams.num_generations
        # A group is k consecutive rows of one prompt, on this rank: group statistics need no collective.
        rollout = collect_rollout(
            policy=self.policy,
            reference=self.reference if self.reference is not None else AdaptersDisabled(self.policy),
            critic=self.critic,
            advantage=self.advantage,
            group_size=k,
            tokenizer=self.tokenizer,
            prompt_ids=batch["input_ids"].repeat_interleave(k, 0),
            prompt_mask=batch["attention_mask"].repeat_interleave(k, 0),
            prompts=[p for p in batch["prompt"] for _ in range(k)],
            sampling=self.sampling,
            # With kl_penalty='loss' the KL is a loss term instead (_micro_loss); it is still measured.
            kl_coef=self.kl_controller.value if self.hparams.kl_penalty == "reward" else 0.0,
            shaping=self.shaping,
            reward_model=self.reward_model,
            reward_function=self.reward_function,
            gold_function=self.gold_function,
            columns=repeat_columns(batch.get("columns"), k) if batch.get("columns") else batch.get("columns"),
            moments=self.score_moments,
            micro_batch_size=self.hparams.micro_batch_size,
            generation_batch_size=self.hparams.generation_batch_size,
            timings=timings,
            old_logprobs="forward" if synced else self.hparams.old_logprobs,
            **placement,
            **self._engine_arguments(),
        )
        if self.engine is not None:
            self.engine.sleep()  # with enable_sleep_mode (GPU) the update gets the engine's memory back
        self._timings = timings
        mask = rollout.response_mask.float()
        # Logged as they came out of GAE: after AdvantageNormalization the post-hook values are always 0 / 1.
        self._raw_advantage_stats = {
            "rollout/advantage_raw_mean": masked_mean(rollout.advantages, mask, all_reduce=True),
            "rollout/advantage_raw_std": masked_var(rollout.advantages, mask, all_reduce=True).sqrt(),
        }
        call_rollout_hooks(self.trainer, self, rollout)
        return rollout

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
        """How ``generate`` sees a ZeRO-3 policy: whole weights gathered once, or shards, ranks in step."""
        if not is_partitioned(self.policy):
            return {}
        if self.hparams.zero3_generation == "gather":
            return {"generation_context": lambda: whole_model_for_generation(self.trainer, self.policy)}
        return {"synced_gpus": self.trainer.world_size > 1}

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one rollout makes (``ppo_epochs`` x mini-batches; fewer after a KL early stop)."""
        loader = getattr(self._trainer, "train_dataloader", None)
        prompts = getattr(loader, "batch_size", None)
        rollout = prompts * self.hparams.num_generations if prompts else self.hparams.mini_batch_size
        return self.hparams.ppo_epochs * max(rollout // self.hparams.mini_batch_size, 1)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        report_phase(self._trainer, self, "sampling")
        rollout = self.collect(batch)
        n = len(rollout)
        report_phase(self._trainer, self, f"updating ({describe_rollout_speed(rollout, self._timings)})")
        if n % self.hparams.mini_batch_size:
            raise ValueError(
                f"the rollout batch ({n} prompts) is not divisible by "
                f"mini_batch_size={self.hparams.mini_batch_size};"
                " make the prompt loader's batch_size a multiple of it (PromptDataModule drops the last,"
                " short batch unless drop_last=false)"
            )
        if self._first_step_pending:
            self._check_reference_matches(rollout)
        start = time.perf_counter()
        stats = self._update(rollout)
        self._timings["update"] = time.perf_counter() - start
        mask = rollout.response_mask.float()
        kl_per_sequence = sequence_kl(rollout.kl, mask)
        # Every rank feeds the controller the KL of the *whole* rollout batch, so all ranks keep one value.
        totals = self.trainer.strategy.reduce(
            torch.stack([kl_per_sequence.sum(), kl_per_sequence.new_tensor(float(n))]), reduce_op="sum"
        )
        self.kl_controller.update(float(totals[0] / totals[1]), int(totals[1]))
        self._log_rollout(rollout, kl_per_sequence, stats)
        report_phase(self._trainer, self, describe_rollout_speed(rollout, self._timings))

    def _update(self, rollout: Rollout) -> dict[str, Tensor]:
        hp = self.hparams
        optimizer = self.optimizers()
        n, mini, micro = len(rollout), hp.mini_batch_size, hp.micro_batch_size
        totals: dict[str, list[Tensor]] = {}
        stopped = 0.0
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(n, device=rollout.response_ids.device)
            for start in range(0, n, mini):
                # Within a mini-batch the split into micro-batches is free (their gradients add up to the
                # same step), so rows of similar length go together and each micro-batch is cut to its own
                # longest prompt and response (Rollout.minibatch).
                step_rows = order[start : start + mini]
                by_length = length_order(rollout.prompt_mask[step_rows], rollout.response_mask[step_rows])
                step_rows = step_rows[by_length]
                order[start : start + mini] = step_rows
                optimizer.zero_grad()
                approx_kls = []
                # Each micro-batch's token-mean loss is weighted by its share of the mini-batch's tokens, so
                # the step minimises the token-mean over the whole mini-batch whatever micro_batch_size is.
                mini_tokens = rollout.response_mask[step_rows].sum().clamp(min=1)
                finite = True
                micro_starts = range(start, start + mini, micro)
                for micro_start in micro_starts:
                    last = micro_start == micro_starts[-1]
                    start_micro_batch(self._trainer, is_last=last)
                    rows = order[micro_start : micro_start + micro]
                    mb = rollout.minibatch(rows)
                    with self._gradient_sync(last):
                        loss, metrics = self._micro_loss(mb)
                        terms = {
                            k: metrics[f"ppo/{k}"]
                            for k in ("policy_loss", "value_loss", "entropy")
                            if f"ppo/{k}" in metrics
                        }
                        finite = self.finite_or_skip({**terms, "loss": loss}, {"index": rows})
                        if not finite:
                            break  # nonfinite="skip": this mini-batch makes no optimizer step
                        self.manual_backward(loss * self._micro_weight(mb, mini_tokens, len(step_rows)))
                    approx_kls.append(metrics["ppo/approx_kl"])
                    for key, value in metrics.items():
                        totals.setdefault(key, []).append(value)
                if not finite:
                    optimizer.zero_grad()
                    continue
                if hp.max_grad_norm is not None:
                    self.clip_gradients(
                        optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                optimizer.step()
                if hp.early_stop_kl is not None:
                    # Decided on the mean over ranks: every rank stops at the same step (DDP stays in step).
                    approx_kl = self.trainer.strategy.reduce(torch.stack(approx_kls).mean(), reduce_op="mean")
                    if float(approx_kl) > hp.early_stop_kl:
                        stopped = 1.0
                        break
            if stopped:
                break
        out = {key: torch.stack(values).mean() for key, values in totals.items() if values}
        out["ppo/early_stopped"] = torch.tensor(stopped)
        return out

    def _micro_weight(self, mb: dict[str, Tensor], mini_tokens: Tensor, mini_rows: int) -> Tensor | float:
        """A micro-batch's share of its mini-batch: of the tokens (token_mean) or of the sequences (the
        per-sequence aggregations), so the step's loss is the mini-batch's whatever micro_batch_size is."""
        if self.hparams.loss_aggregation == "token_mean":
            return mb["response_mask"].sum() / mini_tokens
        return mb["response_mask"].shape[0] / mini_rows

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

    def _micro_loss(self, mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        mask = mb["response_mask"].float()
        prompt_len = mb["input_ids"].shape[1] - mask.shape[1]
        logprobs, entropy = response_token_logprobs(
            self.policy,
            mb["input_ids"],
            mb["attention_mask"],
            prompt_len,
            entropy=True,
            temperature=self.sampling.temperature,
            entropy_grad=hp.entropy_coef > 0,  # at 0 the entropy is only logged: no backward through it
        )
        if self._first_step_pending:
            self._check_first_ratio(logprobs, mb["logprobs"], mask)
        aggregation = {"aggregation": hp.loss_aggregation, "max_length": hp.max_new_tokens}
        policy = ppo_policy_loss(
            logprobs,
            mb["logprobs"],
            mb["advantages"],
            mask,
            clip_range=hp.clip_range,
            dual_clip=hp.dual_clip,
            **aggregation,
        )
        entropy_mean = entropy_bonus(entropy, mask)
        loss = policy.loss - hp.entropy_coef * entropy_mean
        metrics = {
            "ppo/policy_loss": policy.loss.detach(),
            "ppo/entropy": entropy_mean.detach(),
            "ppo/clip_fraction": policy.clip_fraction,
            "ppo/approx_kl": policy.approx_kl,
        }
        if hp.kl_penalty == "loss":
            # GRPO's form: the k3 estimate of KL(policy || reference) at the sampled tokens, with gradient.
            kl = aggregate_token_losses(
                kl_k3(logprobs.float(), mb["ref_logprobs"].float()), mask, **aggregation
            )
            loss = loss + self.kl_controller.value * kl
            metrics["ppo/kl_loss"] = kl.detach()
        if self.critic is not None:
            values = response_values(self.critic, mb["input_ids"], mb["attention_mask"], prompt_len)
            value = ppo_value_loss(
                values, mb["values"], mb["returns"], mask, clip_range_value=hp.clip_range_value
            )
            loss = loss + hp.value_loss_coef * value.loss
            metrics["ppo/value_loss"] = value.loss.detach()
            metrics["ppo/value_clip_fraction"] = value.clip_fraction
        metrics["ppo/loss"] = loss.detach()
        return loss, metrics

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Sample one response per held-out prompt and log its scores (no update, no KL penalty)."""
        # Outside fit (trainer.validate) no engine is built: HF samples then.
        sampling = self.sampling
        if self.engine is None:
            sampling = replace(sampling, generation_engine="hf")
        samples = sample_and_score(
            policy=self.policy,
            tokenizer=self.tokenizer,
            prompt_ids=batch["input_ids"],
            prompt_mask=batch["attention_mask"],
            prompts=list(batch["prompt"]),
            sampling=sampling,
            reward_model=self.reward_model,
            reward_function=self.reward_function,
            gold_function=self.gold_function,
            columns=batch.get("columns"),
            micro_batch_size=self.hparams.micro_batch_size,
            generation_batch_size=self.hparams.generation_batch_size,
            **self._generation_placement(),
            **self._engine_arguments(),
        )
        metrics = {
            "val/score": samples.raw_scores.mean(),
            "val/response_length": samples.response_mask.float().sum(1).mean(),
            "val/eos_rate": samples.ended.float().mean(),
        }
        if samples.gold_scores is not None:
            metrics["val/gold_score"] = samples.gold_scores.float().mean()
        self.log_dict(
            {k: v.to(self.device, torch.float32) for k, v in metrics.items()},
            batch_size=len(samples.texts),
            sync_dist=True,
        )

    # ------------------------------------------------------------------ step-0 guard
    def _check_reference_matches(self, rollout: Rollout) -> None:
        same_weights = self.hparams.reference_model in (None, self.hparams.model)
        if not same_weights:
            return
        mask = rollout.response_mask.float()
        gap = float(masked_mean((rollout.logprobs - rollout.ref_logprobs).abs(), mask))
        if gap > self.hparams.first_step_tolerance:
            raise FirstStepCheckError(
                "before any update the policy and its reference (the same weights) disagree: mean "
                f"|log p - log p_ref| = {gap:.2e} > first_step_tolerance={self.hparams.first_step_tolerance}."
                " "
                "Likely causes: the two are loaded in different dtypes, or one has dropout on "
                "(disable_dropout), or padding/position ids differ between them. "
                "Set check_first_step=false to skip this check."
            )

    def _check_first_ratio(self, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> None:
        self._first_step_pending = False
        worst = float(((logprobs.detach() - old_logprobs).abs() * mask).max())
        if worst > self.hparams.first_step_tolerance:
            raise FirstStepCheckError(
                f"at the first PPO update the importance ratio should be exactly 1, but max |log ratio| = "
                f"{worst:.2e} > first_step_tolerance={self.hparams.first_step_tolerance}. "
                "The training forward does "
                "not reproduce the log-probs of sampling. Likely causes: dropout left on in the policy "
                "(disable_dropout=false with a model that has dropout), a dtype mismatch between rollout and "
                "training forwards (e.g. sampling in bf16, training in fp32), padding / position ids that "
                "differ between the two forwards, or old_logprobs='sampling' in low precision (KV-cache "
                "decoding differs from a full forward by ~1e-3 in bf16: use old_logprobs='forward'). "
                "Set check_first_step=false to skip this check."
            )

    # ------------------------------------------------------------------ logging
    def _log_rollout(self, rollout: Rollout, kl_per_sequence: Tensor, stats: dict[str, Tensor]) -> None:
        mask = rollout.response_mask.float()
        lengths = mask.sum(1)
        metrics: dict[str, Any] = {
            "rollout/score": rollout.raw_scores.mean(),
            "rollout/shaped_score": rollout.scores.mean(),
            "rollout/kl": kl_per_sequence.mean(),
            "rollout/kl_coef": self.kl_controller.value,
            "rollout/response_length": lengths.mean(),
            "rollout/eos_rate": rollout.ended.float().mean(),
            "rollout/advantage_mean": masked_mean(rollout.advantages, mask, all_reduce=True),
            "rollout/advantage_std": masked_var(rollout.advantages, mask, all_reduce=True).sqrt(),
            "rollout/return_mean": masked_mean(rollout.returns, mask),
            **{f"time/{k}": v for k, v in self._timings.items()},
            **self._raw_advantage_stats,
            **stats,
        }
        if self.critic is not None:
            metrics["rollout/value_mean"] = masked_mean(rollout.values, mask)
            metrics["ppo/explained_variance"] = explained_variance(rollout.values, rollout.returns, mask)
        if rollout.rm_scores is not None:
            metrics["rollout/reward_model_score"] = rollout.rm_scores.mean()
        if rollout.function_scores is not None:
            metrics["rollout/function_score"] = rollout.function_scores.float().mean()
        if rollout.gold_scores is not None:
            metrics["rollout/gold_score"] = rollout.gold_scores.float().mean()
        metrics.update(reward_source_metrics(self.reward_function, self.gold_function))
        metrics = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in metrics.items()}
        on_bar = {k: metrics.pop(k) for k in ("rollout/score", "rollout/kl")}
        self.log_dict(on_bar, batch_size=len(rollout), sync_dist=True, prog_bar=True)
        self.log_dict(metrics, batch_size=len(rollout), sync_dist=True)


def describe_rollout_speed(rollout: Rollout, timings: dict[str, float]) -> str:
    """Short enough for a progress bar: '672 tok/s' after sampling, '672 tok/s, update 1.8 s' after it."""
    tokens = int(rollout.response_mask.sum())
    text = f"{tokens / timings['generation']:,.0f} tok/s" if timings.get("generation") else f"{tokens} tok"
    return text + (f", update {timings['update']:.1f} s" if "update" in timings else "")
