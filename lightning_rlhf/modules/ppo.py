"""PPO for language models inside ``Trainer.fit``: one training step = one rollout + its PPO updates."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.callbacks.progress import report_phase
from lightning_rlhf.lora import apply_lora
from lightning_rlhf.losses import (
    LOSS_AGGREGATIONS,
    aggregate_token_losses,
    entropy_bonus,
    ppo_policy_loss,
    ppo_value_loss,
)
from lightning_rlhf.models import (
    load_causal_lm,
    load_reward_model,
    response_token_logprobs,
    response_values,
)
from lightning_rlhf.modules.base import (
    adamw,
    adamw_param_groups,
    build_object,
    fused_adamw_allowed,
    object_spec,
)
from lightning_rlhf.modules.on_policy import MicroStep, OnPolicyModule, mean_metrics
from lightning_rlhf.modules.reference import reference_model
from lightning_rlhf.ops import kl_k3, masked_mean, masked_var
from lightning_rlhf.rewards.calling import repeat_columns, reward_source_metrics
from lightning_rlhf.rollout.advantages import GAE, AdvantageEstimator
from lightning_rlhf.rollout.collect import (
    ShapingConfig,
    collect_rollout,
    explained_variance,
    sample_and_score,
)
from lightning_rlhf.rollout.hooks import call_rollout_hooks
from lightning_rlhf.rollout.shaping import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    sequence_kl,
)
from lightning_rlhf.rollout.types import Rollout, length_order
from lightning_rlhf.validation import ConfigError, check, check_choice, check_each


class FirstStepCheckError(RuntimeError):
    """The first PPO update found policy, sampler and reference inconsistent (see the message)."""


class PPOModule(OnPolicyModule):
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
    hparams_ignore = ("advantage",)

    def __init__(
        self,
        model: str,
        critic_model: str | None = None,
        ppo_epochs: int = 1,
        old_logprobs: Literal["forward", "sampling"] = "forward",
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
        value_normalization: bool = False,
        early_stop_kl: float | None = None,
        critic_learning_rate: float = 5e-6,
        check_first_step: bool = True,
        first_step_tolerance: float = 1e-3,
        advantage: AdvantageEstimator | None = None,
        num_generations: int = 1,
        kl_penalty: Literal["reward", "loss"] = "reward",
        loss_aggregation: Literal["token_mean", "sequence_mean", "constant_length_sum"] = "token_mean",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or ``save_pretrained`` folder (usually the SFT model).
                The shared settings (reward sources, sampling, batch sizes, optimizer, LoRA, ...) are
                :class:`~lightning_rlhf.modules.on_policy.OnPolicyModule`'s, listed with it.
            critic_model: Critic initialisation (default: the reward model if given, else the policy).
            ppo_epochs: Passes over each rollout batch.
            old_logprobs: Where the rollout's old log-probs come from: a policy ``forward`` over the sampled
                sequences, like the update's (the first-step ratio is then exactly 1 in any precision), or
                the logits ``sampling`` drew each token from (one policy forward less per rollout, as TRL;
                equal up to KV-cache float noise: ~1e-6 in fp32, ~1e-3 in bf16, where the first-step
                check may need a larger first_step_tolerance). Under ZeRO-3 with
                ``zero3_generation="synced"`` the old log-probs always come from a forward.
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
            value_normalization: Train the critic on returns standardised by their running mean and std over
                all rollouts and de-standardise its outputs before GAE (ReaLHF's value_norm, on in the
                paper's code; the variance is floored at 1e-2). Needs a critic (GAE).
            early_stop_kl: End a rollout's updates early once the approximate KL passes this (None = off).
            critic_learning_rate: Critic AdamW learning rate.
            check_first_step: At the first update check ratio == 1 and policy-reference KL == 0.
            first_step_tolerance: Largest |log-ratio| the first-step check accepts.
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
        owner = "PPOModule"
        # Checked before the base records the hyper-parameters: a bad estimator fails by name first.
        check(owner, "num_generations", num_generations, ge=1, integer=True)
        estimator = build_object(advantage, AdvantageEstimator) if advantage is not None else GAE()
        if num_generations < estimator.min_group_size:
            raise ConfigError(
                f"{owner}: advantage {estimator!r} compares responses to the same prompt, so it needs "
                f"num_generations >= {estimator.min_group_size} (got {num_generations})"
            )
        super().__init__(model, **kwargs)
        check_choice(owner, "kl_penalty", kl_penalty, ("reward", "loss"))
        check_choice(owner, "loss_aggregation", loss_aggregation, LOSS_AGGREGATIONS)
        check_choice(owner, "old_logprobs", old_logprobs, ("forward", "sampling"))
        check(owner, "ppo_epochs", ppo_epochs, ge=1, integer=True)
        check(owner, "kl_horizon", kl_horizon, ge=1, integer=True)
        positive = {
            "clip_range": clip_range,
            "critic_learning_rate": critic_learning_rate,
            "first_step_tolerance": first_step_tolerance,
        }
        check_each(owner, positive, gt=0)
        coefficients = {"kl_coef": kl_coef, "entropy_coef": entropy_coef, "value_loss_coef": value_loss_coef}
        check_each(owner, coefficients, ge=0)
        switches = {
            "clip_range_value": clip_range_value,
            "score_clip": score_clip,
            "early_stop_kl": early_stop_kl,
            "target_kl": target_kl,
        }
        check_each(owner, switches, gt=0, optional=True)
        check(owner, "dual_clip", dual_clip, gt=1, optional=True)
        check(owner, "gamma", gamma, ge=0, le=1)
        check(owner, "lam", lam, ge=0, le=1)
        check_choice(owner, "kl_estimator", kl_estimator, ("k1", "k2", "k3"))
        if target_kl is not None and kl_coef == 0:
            raise ConfigError(
                f"{owner}: kl_coef must be > 0 with target_kl (the controller only rescales it)"
            )
        self.advantage = estimator
        self.hparams["advantage"] = object_spec(estimator)
        self.shaping = ShapingConfig(
            kl_estimator, self.hparams.missing_eos_penalty, score_clip, normalize_scores, gamma, lam
        )
        self.kl_controller = (
            AdaptiveKLController(kl_coef, target_kl, kl_horizon)
            if target_kl is not None
            else FixedKLController(kl_coef)
        )
        self.score_moments = RunningMoments()
        self.value_moments = RunningMoments()
        if value_normalization and not estimator.needs_critic:
            raise ConfigError(
                f"{owner}: value_normalization standardises the critic's targets, but advantage "
                f"{type(estimator).__name__} uses no critic; set value_normalization: false"
            )
        self.critic: PreTrainedModel | None = None
        self._first_step_pending = check_first_step

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        hp = self.hparams
        if self.policy is not None:
            return
        self.policy = self.prepare_trained(self.build_trained_model())
        if self.advantage.needs_critic:  # critic-free estimators hold no value model at all
            critic = load_reward_model(
                hp.critic_model or hp.reward_model or hp.model, trust_remote_code=hp.trust_remote_code
            )
            self.critic = self.prepare_trained(critic)
            if self.lora is not None:
                self.critic = apply_lora(self.critic, self.lora, "sequence_classification")
                self.critic.train()
        if self.lora is None or hp.reference_model is not None:  # with LoRA: the policy, adapters off
            self.reference = self.load_frozen_reference()
        self.load_reward_sources(critic=self.critic)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = []
        for model, lr in ((self.policy, hp.learning_rate), (self.critic, hp.critic_learning_rate)):
            if model is None:
                continue
            for group in adamw_param_groups(model, hp.weight_decay):
                groups.append({**group, "lr": lr})
        return adamw(groups, fused=fused_adamw_allowed(self._trainer))

    def build_trained_model(self) -> PreTrainedModel:
        policy = load_causal_lm(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return apply_lora(policy, self.lora, "causal_lm") if self.lora is not None else policy

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_state"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "value_moments": self.value_moments.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is not None:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.score_moments.load_state_dict(state["score_moments"])
            if "value_moments" in state:
                self.value_moments.load_state_dict(state["value_moments"])
        self._first_step_pending = False  # a resumed run no longer has policy == reference

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
        synced = self.generation_is_synced()
        k = self.hparams.num_generations
        # A group is k consecutive rows of one prompt, on this rank: group statistics need no collective.
        rollout = collect_rollout(
            reference=reference_model(self),
            critic=self.critic,
            advantage=self.advantage,
            group_size=k,
            prompt_ids=batch["input_ids"].repeat_interleave(k, 0),
            prompt_mask=batch["attention_mask"].repeat_interleave(k, 0),
            prompts=[p for p in batch["prompt"] for _ in range(k)],
            # With kl_penalty='loss' the KL is a loss term instead (_micro_loss); it is still measured.
            kl_coef=self.kl_controller.value if self.hparams.kl_penalty == "reward" else 0.0,
            shaping=self.shaping,
            columns=repeat_columns(batch.get("columns"), k) if batch.get("columns") else batch.get("columns"),
            moments=self.score_moments,
            value_moments=self.value_moments if self.hparams.value_normalization else None,
            timings=timings,
            old_logprobs="forward" if synced else self.hparams.old_logprobs,
            **self.sampling_arguments(),
        )
        self.after_sampling()
        self._timings = timings
        mask = rollout.response_mask.float()
        # Logged as they came out of GAE: after AdvantageNormalization the post-hook values are always 0 / 1.
        self._raw_advantage_stats = {
            "rollout/advantage_raw_mean": masked_mean(rollout.advantages, mask, all_reduce=True),
            "rollout/advantage_raw_std": masked_var(rollout.advantages, mask, all_reduce=True).sqrt(),
        }
        call_rollout_hooks(self.trainer, self, rollout)
        return rollout

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

        def arrange(rows: Tensor) -> Tensor:
            # Within a mini-batch the split into micro-batches is free (their gradients add up to the same
            # step), so rows of similar length go together and each micro-batch is cut to its own longest
            # prompt and response (Rollout.minibatch).
            return rows[length_order(rollout.prompt_mask[rows], rollout.response_mask[rows])]

        def micro_step(rows: Tensor, mini: Tensor) -> MicroStep:
            mb = rollout.minibatch(rows)
            loss, metrics = self._micro_loss(mb)
            terms = {
                k: metrics[f"ppo/{k}"]
                for k in ("policy_loss", "value_loss", "entropy")
                if f"ppo/{k}" in metrics
            }
            # Each micro-batch's mean is weighted by its share of the mini-batch's tokens (token_mean) or
            # sequences, so the step minimises the mini-batch's loss whatever micro_batch_size is.
            if hp.loss_aggregation == "token_mean":
                weight = mb["response_mask"].sum() / rollout.response_mask[mini].sum().clamp(min=1)
            else:
                weight = len(rows) / len(mini)
            return MicroStep(loss, weight, terms, metrics)

        def kl_too_far(steps: list[MicroStep]) -> bool:
            # Decided on the mean over ranks: every rank stops at the same step (DDP stays in step).
            approx_kl = torch.stack([s.metrics["ppo/approx_kl"] for s in steps]).mean()
            return float(self.trainer.strategy.reduce(approx_kl, reduce_op="mean")) > hp.early_stop_kl

        steps, stopped = self.update_loop(
            len(rollout),
            hp.ppo_epochs,
            micro_step,
            arrange=arrange,
            should_stop=kl_too_far if hp.early_stop_kl is not None else None,
        )
        out = mean_metrics(steps)
        out["ppo/early_stopped"] = torch.tensor(float(stopped))
        return out

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
            old_values, returns = mb["values"], mb["returns"]
            if hp.value_normalization:  # the critic predicts standardised returns (moments of collect)
                mean, std = self.value_moments.value_scale()
                old_values, returns = (old_values - mean) / std, (returns - mean) / std
            value = ppo_value_loss(values, old_values, returns, mask, clip_range_value=hp.clip_range_value)
            loss = loss + hp.value_loss_coef * value.loss
            metrics["ppo/value_loss"] = value.loss.detach()
            metrics["ppo/value_clip_fraction"] = value.clip_fraction
        metrics["ppo/loss"] = loss.detach()
        return loss, metrics

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Sample one response per held-out prompt and log its scores (no update, no KL penalty)."""
        samples = sample_and_score(
            prompt_ids=batch["input_ids"],
            prompt_mask=batch["attention_mask"],
            prompts=list(batch["prompt"]),
            columns=batch.get("columns"),
            **self.sampling_arguments(training=False),
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
