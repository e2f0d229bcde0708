"""Iterative DPO (DPO-Iter): DPO on fresh samples of the current policy, labelled by a reward.

Xu et al. (2024, "Is DPO Superior to PPO for LLM Alignment?") find that much of DPO's gap to PPO comes from
training on responses the policy would not produce; sampling the pairs from the policy itself and labelling
them with the reward model narrows it. One training step here is one such iteration on a batch of prompts.
The pair selection and batch building are pure functions in :mod:`lightning_rlhf.rollout.pairs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.callbacks.progress import report_phase
from lightning_rlhf.data.base import pad_id
from lightning_rlhf.lora import (
    add_reference_adapter,
    apply_lora,
)
from lightning_rlhf.losses import DPOLoss, SigmoidDPOLoss
from lightning_rlhf.models import (
    load_causal_lm,
    response_logps,
)
from lightning_rlhf.modules.dpo import DPO_METRIC_NAMES, dpo_metrics
from lightning_rlhf.modules.on_policy import MicroStep, OnPolicyModule
from lightning_rlhf.modules.reference import reference_model, refresh_reference
from lightning_rlhf.rewards.calling import repeat_columns, reward_source_metrics
from lightning_rlhf.rollout.collect import sample_and_score
from lightning_rlhf.rollout.pairs import Samples, build_pair_batch, select_pairs, take_pairs
from lightning_rlhf.validation import check

RewardFn = Callable[[list[str], list[str]], Any]

_DPO_METRICS = ("train/loss", *DPO_METRIC_NAMES)


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


class IterativeDPOModule(OnPolicyModule):
    """DPO-Iter: each training step samples, labels and learns from fresh pairs of the current policy.

    A step takes a batch of prompts (from :class:`~lightning_rlhf.PromptDataModule`) and

    1. samples ``num_samples`` responses per prompt from the current policy (KV cache, no dropout);
    2. scores them with the reward model (prompt + response, read at the last token, as PPO scores) and/or
       the reward function; with both, the score is their sum;
    3. pairs each prompt's best (chosen) with its worst (rejected) response; prompts whose samples all tie
       are skipped (``iteration/skipped_ties``), and with no pair on any rank the step makes no update;
    4. computes reference log-probs once, then runs ``dpo_epochs`` shuffled passes of mini-batch DPO
       updates (``mini_batch_size`` pairs per optimizer step, accumulated over ``micro_batch_size``);
    5. with ``refresh_reference`` (default) copies the policy into the reference: each iteration's reference
       is then the policy that sampled its pairs, so beta bounds how far one iteration moves while many
       iterations may move far from the SFT model (the iterative-DPO recipe). ``False`` anchors every
       iteration to the initial (or ``reference_model``) weights, like PPO's fixed KL reference.

    With ``lora`` only adapters are trained and no reference copy of the model is held: a fixed reference
    (``refresh_reference=False``) is the policy with its adapters off; a refreshed one is a second, frozen
    adapter (``reference``) into which the trained adapter is copied after each iteration (exact: the
    reference is then base + B·A of the policy that sampled the pairs).

    ``trainer.global_step`` counts optimizer steps. Logged: ``train/loss``, DPOModule's ``rewards/*``,
    ``logps/*`` and ``logps_per_token/*`` (means over the step's pairs and updates, measured before each
    optimizer step: with a refreshed reference and one step per iteration they are 0 and the sigmoid loss
    is log 2), and ``iteration/score_best`` / ``score_worst`` (per prompt, averaged), ``score_mean``,
    ``gold_score`` (with a gold_function), ``pairs``, ``skipped_ties``, ``response_length``, ``eos_rate``.
    """

    batch_keys = ("prompt", "input_ids", "attention_mask", "index")
    data_module = "PromptDataModule"
    hparams_ignore = ("loss",)

    def __init__(
        self,
        model: str,
        loss: DPOLoss | None = None,
        num_samples: int = 4,
        dpo_epochs: int = 1,
        refresh_reference: bool = True,
        average_log_probs: bool = False,
        log_after_update: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or ``save_pretrained`` folder (usually the SFT model).
                The shared settings (reward sources, sampling, batch sizes, optimizer, LoRA, ...) are
                :class:`~lightning_rlhf.modules.on_policy.OnPolicyModule`'s, listed with it; here
                ``mini_batch_size`` and ``micro_batch_size`` count pairs (the last mini-batch of an
                iteration may be smaller), and ``reference_model`` is only used with
                refresh_reference=false. With ``lora`` a refreshed reference is a copy of the trained adapter.
            loss: The DPO variant and its beta (default SigmoidDPOLoss(beta=0.1)); class_path in YAML.
            num_samples: Responses sampled per prompt (k >= 2); the best and worst of them form the pair.
            dpo_epochs: Passes of DPO updates over each iteration's pairs.
            refresh_reference: Copy the policy into the reference after each iteration (else keep it fixed).
            average_log_probs: Use per-token mean log-probs instead of sums (usual for IPO).
            log_after_update: Also log the loss, margins and accuracies of the pairs after the update
                (``*_after_update``; one no-grad forward). With refresh_reference the update's own loss
                starts at log 2 each iteration (policy == reference), so this shows what the update did.
        """
        owner = "IterativeDPOModule"
        check(owner, "num_samples", num_samples, ge=2, integer=True)  # a pair needs two samples
        check(owner, "dpo_epochs", dpo_epochs, ge=1, integer=True)
        super().__init__(model, **kwargs)
        self.loss = self._use_loss(loss, SigmoidDPOLoss(), DPOLoss)
        if self.hparams.reference_model is not None and (refresh_reference or self.loss.reference_free):
            raise ValueError(
                f"{owner}: reference_model is only used with refresh_reference=false and a loss that is not "
                "reference_free; unset it (the reference then starts as the policy's own weights)"
            )
        # A refreshed reference changes every iteration: checkpoints must carry it (a fixed one is reloaded).
        self.reference_in_checkpoint = refresh_reference

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        hp = self.hparams
        if self.policy is not None:
            return
        self.policy = self.prepare_trained(self.build_trained_model())
        if not self.loss.reference_free and (self.lora is None or hp.reference_model is not None):
            self.reference = self.load_frozen_reference()
        self.load_reward_sources()

    @property
    def adapter_refresh(self) -> bool:
        """Whether the reference is a second LoRA adapter refreshed from the trained one."""
        return self.lora is not None and self.hparams.refresh_reference and not self.loss.reference_free

    def build_trained_model(self) -> PreTrainedModel:
        policy = load_causal_lm(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        if self.lora is not None:
            policy = apply_lora(policy, self.lora, "causal_lm")
            if self.adapter_refresh:
                add_reference_adapter(policy)
        return policy

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def sample(self, batch: dict) -> Samples:
        """``num_samples`` responses per prompt of the batch from the current policy, scored."""
        k = self.hparams.num_samples
        prompt_ids = batch["input_ids"].repeat_interleave(k, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(k, 0)
        samples = sample_and_score(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            prompts=[p for p in batch["prompt"] for _ in range(k)],
            columns=repeat_columns(batch.get("columns"), k),
            **self.sampling_arguments(),
        )
        self.after_sampling()
        scores = samples.raw_scores  # reward model (prompt + response, at the last token) + function
        if self.hparams.missing_eos_penalty is not None:
            scores = scores - self.hparams.missing_eos_penalty * (~samples.ended).float()
        return Samples(
            prompt_ids,
            prompt_mask,
            samples.response_ids,
            samples.response_mask,
            scores,
            samples.ended,
            samples.gold_scores,
        )

    @torch.no_grad()
    def reference_logps(self, pair_batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Reference log-probs [N] of the chosen and rejected responses (None, None if reference-free)."""
        if self.loss.reference_free:
            return None, None
        n, average, chosen, rejected = pair_batch["index"].numel(), self.hparams.average_log_probs, [], []
        reference = reference_model(self)
        for pairs in torch.arange(n, device=self.device).split(self.hparams.micro_batch_size):
            logps, _ = response_logps(reference, take_pairs(pair_batch, pairs), average=average)
            chosen.append(logps.chunk(2)[0])
            rejected.append(logps.chunk(2)[1])
        return torch.cat(chosen), torch.cat(rejected)

    def compute_loss(
        self, batch: dict[str, Tensor], ref_chosen: Tensor | None, ref_rejected: Tensor | None, valid: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The DPO loss over the ``valid`` pairs of a [chosen; rejected] batch, and DPOModule's metrics."""
        policy, per_token = response_logps(self.policy, batch, average=self.hparams.average_log_probs)
        if not valid.any():
            # A zero that still reaches every parameter: data-parallel ranks must all run this backward.
            return policy.sum() * 0.0, {}
        chosen, rejected = (x[valid] for x in policy.chunk(2))
        chosen_per_token, rejected_per_token = (x[valid] for x in per_token.chunk(2))
        refs = (None, None) if ref_chosen is None else (ref_chosen[valid], ref_rejected[valid])
        out = self.loss(chosen, rejected, *refs, chosen_nll=-chosen_per_token)
        metrics = {
            "train/loss": out.loss.detach(),
            **dpo_metrics(out, chosen, rejected, chosen_per_token, rejected_per_token),
        }
        return out.loss, metrics

    def update(self, pair_batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``dpo_epochs`` passes of shuffled mini-batch DPO steps; the metrics averaged over valid pairs."""
        ref_chosen, ref_rejected = self.reference_logps(pair_batch)
        valid = pair_batch["valid"]

        def micro_step(rows: Tensor, mini: Tensor) -> MicroStep:
            refs = (None, None) if ref_chosen is None else (ref_chosen[rows], ref_rejected[rows])
            loss, metrics = self.compute_loss(take_pairs(pair_batch, rows), *refs, valid[rows])
            count = int(valid[rows].sum())
            if metrics:
                metrics["pairs"] = loss.new_tensor(float(count))
            # A micro loss is a mean over its pairs: weight it so the step sees the mini-batch mean.
            return MicroStep(loss, count / max(int(valid[mini].sum()), 1), metrics=metrics)

        steps, _ = self.update_loop(valid.numel(), self.hparams.dpo_epochs, micro_step)
        # Pair-weighted means over every rank, in one collective that all ranks make whatever their ties.
        sums = torch.zeros(len(_DPO_METRICS) + 1, device=self.device)
        for step in steps:
            if step.metrics:
                count = step.metrics["pairs"]
                sums += torch.stack([*(step.metrics[k] * count for k in _DPO_METRICS), count])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        metrics = dict(zip(_DPO_METRICS, (sums[:-1] / sums[-1].clamp(min=1)).unbind(), strict=True))
        if self.hparams.log_after_update:
            metrics.update(self._metrics_after_update(pair_batch, ref_chosen, ref_rejected))
        return metrics

    @torch.no_grad()
    def _metrics_after_update(
        self, pair_batch: dict[str, Tensor], ref_chosen: Tensor | None, ref_rejected: Tensor | None
    ) -> dict[str, Tensor]:
        """Loss, accuracy and margin of the valid pairs after the update (pair-weighted, over all ranks)."""
        names = ("train/loss", "rewards/accuracies", "rewards/margins")
        valid = pair_batch["valid"]
        sums = torch.zeros(len(names) + 1, device=self.device)
        for micro in torch.arange(valid.numel(), device=valid.device).split(self.hparams.micro_batch_size):
            refs = (None, None) if ref_chosen is None else (ref_chosen[micro], ref_rejected[micro])
            _, metrics = self.compute_loss(take_pairs(pair_batch, micro), *refs, valid[micro])
            count = int(valid[micro].sum())
            if metrics:
                sums += torch.stack([*(metrics[k] * count for k in names), sums.new_tensor(count)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = (sums[:-1] / sums[-1].clamp(min=1)).unbind()
        return {f"{name}_after_update": value for name, value in zip(names, means, strict=True)}

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one batch of prompts makes: ``dpo_epochs`` passes over its mini-batches."""
        loader = getattr(self._trainer, "train_dataloader", None)
        prompts = getattr(loader, "batch_size", None) or self.hparams.mini_batch_size
        return self.hparams.dpo_epochs * -(-prompts // self.hparams.mini_batch_size)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        report_phase(self._trainer, self, "sampling")
        start = time.perf_counter()
        samples = self.sample(batch)
        speed = int(samples.response_mask.sum()) / max(time.perf_counter() - start, 1e-9)
        report_phase(self._trainer, self, f"updating ({speed:,.0f} tok/s)")
        pairs = select_pairs(samples.scores, self.hparams.num_samples)
        metrics: dict[str, Tensor] = {
            "iteration/score_best": pairs.best.mean(),
            "iteration/score_worst": pairs.worst.mean(),
            "iteration/score_mean": samples.scores.mean(),
            "iteration/pairs": pairs.valid.sum().float(),
            "iteration/skipped_ties": (~pairs.valid).sum().float(),
            "iteration/response_length": samples.response_mask.sum(1).float().mean(),
            "iteration/eos_rate": samples.ended.float().mean(),
        }
        if samples.gold is not None:
            metrics["iteration/gold_score"] = samples.gold.mean()
        metrics.update(reward_source_metrics(self.reward_function, self.gold_function))
        metrics = {
            key: torch.as_tensor(value, dtype=torch.float32, device=self.device)
            for key, value in metrics.items()
        }
        size = len(batch["prompt"])
        on_bar = {"iteration/score_mean": metrics.pop("iteration/score_mean")}
        self.log_dict(on_bar, batch_size=size, sync_dist=True, prog_bar=True)
        self.log_dict(metrics, batch_size=size, sync_dist=True)
        # Decided on the pair count over all ranks, so that either every rank updates or none does.
        if self.trainer.strategy.reduce(metrics["iteration/pairs"].clone(), reduce_op="sum") > 0:
            pair_batch = build_pair_batch(
                samples, pairs, pad_token_id=pad_id(self.tokenizer), index=batch["index"]
            )
            dpo = self.update(pair_batch)
            self.log("train/loss", dpo.pop("train/loss"), prog_bar=True, batch_size=size)
            if "train/loss_after_update" in dpo:
                after = dpo.pop("train/loss_after_update")
                self.log("train/loss_after_update", after, prog_bar=True, batch_size=size)
            self.log_dict(dpo, batch_size=size)  # already reduced over ranks
        if self.hparams.refresh_reference:
            refresh_reference(self)
