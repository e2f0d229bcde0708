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
    AdapterReference,
    AdaptersDisabled,
    LoraSettings,
    add_reference_adapter,
    apply_lora,
    check_dropout,
    copy_into_reference_adapter,
)
from lightning_rlhf.losses import DPOLoss, SigmoidDPOLoss
from lightning_rlhf.models import (
    disable_dropout,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    response_logps,
    sequence_scores,
)
from lightning_rlhf.modules.base import HFModelModule, NonFinitePolicy
from lightning_rlhf.modules.dpo import DPO_METRIC_NAMES, dpo_metrics
from lightning_rlhf.rewards.calling import call_reward_function, repeat_columns, reward_source_metrics
from lightning_rlhf.rollout.generation import SamplingConfig, decode_responses, generate_responses
from lightning_rlhf.rollout.pairs import Samples, build_pair_batch, select_pairs, take_pairs
from lightning_rlhf.validation import check, check_callable, check_divides
from lightning_rlhf.zero import (
    configure_for_manual_accumulation,
    gathered_tensors,
    start_micro_batch,
    whole_model_for_generation,
    zero_stage,
)

RewardFn = Callable[[list[str], list[str]], Any]

_DPO_METRICS = ("train/loss", *DPO_METRIC_NAMES)


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


class IterativeDPOModule(HFModelModule):
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

    def __init__(
        self,
        model: str,
        reward_model: str | None = None,
        reward_function: RewardFn | None = None,
        gold_function: RewardFn | None = None,
        reference_model: str | None = None,
        loss: DPOLoss | None = None,
        num_samples: int = 4,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        missing_eos_penalty: float | None = None,
        dpo_epochs: int = 1,
        mini_batch_size: int = 32,
        micro_batch_size: int = 8,
        refresh_reference: bool = True,
        average_log_probs: bool = False,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
        log_after_update: bool = True,
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or ``save_pretrained`` folder (usually the SFT model).
            reward_model: A reward model (scalar head; e.g. from RewardModule) scoring prompt + response.
            reward_function: ``f(prompts, responses, **columns) -> scores`` (import path or class_path),
                given the prompt data's columns that its signature names; adds to the RM.
            gold_function: Like reward_function but only logged (``iteration/gold_score``), never trained on.
            reference_model: Fixed reference weights (only with refresh_reference=false; default: the policy).
            loss: The DPO variant and its beta (default SigmoidDPOLoss(beta=0.1)); class_path in YAML.
            num_samples: Responses sampled per prompt (k >= 2); the best and worst of them form the pair.
            max_new_tokens: Longest sampled response, in tokens.
            temperature: Sampling temperature (> 0: greedy samples would all be the same).
            top_k: Sample only from the k most likely tokens (0 = off).
            top_p: Nucleus sampling mass (1.0 = off).
            missing_eos_penalty: Subtracted from the score of responses that never emit EOS (None = off).
            dpo_epochs: Passes of DPO updates over each iteration's pairs.
            mini_batch_size: Pairs per optimizer step (the last mini-batch of an iteration may be smaller).
            micro_batch_size: Pairs per forward/backward (accumulated); must divide mini_batch_size.
            refresh_reference: Copy the policy into the reference after each iteration (else keep it fixed).
            average_log_probs: Use per-token mean log-probs instead of sums (usual for IPO).
            learning_rate: AdamW learning rate (the paper's DPO uses 1e-6 at 7B scale).
            weight_decay: AdamW weight decay (biases and norms excluded).
            max_grad_norm: Clip gradients to this global norm (None = off).
            disable_dropout: Turn dropout off in the policy so policy and reference log-probs are comparable.
            lora: Train LoRA adapters only; the reference is the policy with adapters off, or with a refreshed
                copy of its adapter (refresh_reference). Needs the ``peft`` extra.
            trust_remote_code: Allow model code shipped with checkpoints to run (off for safety).
            nonfinite: A NaN/inf loss or gradient: 'raise' (naming step and pairs) or 'skip' that mini-batch's
                optimizer step and count it (train/nonfinite_skipped).
            log_after_update: Also log the loss, margins and accuracies of the pairs after the update
                (``*_after_update``; one no-grad forward). With refresh_reference the update's own loss
                starts at log 2 each iteration (policy == reference), so this shows what the update did.
        """
        super().__init__(learning_rate, weight_decay, nonfinite)
        self.automatic_optimization = False
        owner = "IterativeDPOModule"
        check(owner, "num_samples", num_samples, ge=2, integer=True)  # a pair needs two samples
        check(owner, "temperature", temperature, gt=0)  # greedy samples would all tie
        for name, value in (
            ("dpo_epochs", dpo_epochs),
            ("mini_batch_size", mini_batch_size),
            ("micro_batch_size", micro_batch_size),
        ):
            check(owner, name, value, ge=1, integer=True)
        check_divides(owner, ("micro_batch_size", micro_batch_size), ("mini_batch_size", mini_batch_size))
        check(owner, "max_grad_norm", max_grad_norm, gt=0, optional=True)
        check(owner, "missing_eos_penalty", missing_eos_penalty, ge=0, optional=True)
        try:
            self.sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from err
        check_callable(owner, "reward_function", reward_function)
        check_callable(owner, "gold_function", gold_function)
        self.save_hyperparameters(ignore=["loss", "reward_function", "gold_function", "lora"])
        self.loss = self._use_loss(loss, SigmoidDPOLoss(), DPOLoss)
        self.lora = self._use_lora(lora)
        check_dropout(owner, self.lora, disable_dropout)
        if reference_model is not None and (refresh_reference or self.loss.reference_free):
            raise ValueError(
                f"{owner}: reference_model is only used with refresh_reference=false and a loss that is not "
                "reference_free; unset it (the reference then starts as the policy's own weights)"
            )
        # A refreshed reference changes every iteration: checkpoints must carry it (a fixed one is reloaded).
        self.reference_in_checkpoint = refresh_reference
        self.reward_function = reward_function
        self.gold_function = gold_function
        self.policy: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reward_model: PreTrainedModel | None = None
        self.tokenizer = None

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        hp = self.hparams
        if self.policy is not None:
            return
        remote = {"trust_remote_code": hp.trust_remote_code}
        self.policy = self.build_trained_model()
        if hp.disable_dropout:
            disable_dropout(self.policy)
        self.policy.train()
        if not self.loss.reference_free and (self.lora is None or hp.reference_model is not None):
            # Loaded from disk, never deep-copied: under ZeRO-3 the policy is already partitioned here.
            self.reference = freeze(load_causal_lm(hp.reference_model or hp.model, **remote))
            disable_dropout(self.reference)
        if hp.reward_model is not None:
            self.reward_model = freeze(load_reward_model(hp.reward_model, **remote))
            disable_dropout(self.reward_model)  # a pair's label must not depend on a dropout draw
            sizes = (self.reward_model.config.vocab_size, self.policy.config.vocab_size)
            if sizes[0] != sizes[1]:
                raise ValueError(
                    f"IterativeDPOModule: the reward_model has vocabulary size {sizes[0]} but the policy has "
                    f"{sizes[1]}; it must share the policy's tokenizer"
                )
        self.tokenizer = load_tokenizer(hp.model, trust_remote_code=hp.trust_remote_code)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of {hp.model} has no eos_token: cannot tell when a response ends"
            )

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

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Checked here, not in __init__: a checkpoint does not store the reward function (an arbitrary
        # object), and `lightning-rlhf export` must still rebuild the module from it.
        if stage == "fit" and self.hparams.reward_model is None and self.reward_function is None:
            raise ValueError("IterativeDPOModule: give a reward_model, a reward_function, or both")
        if zero_stage(self._trainer) is not None:
            configure_for_manual_accumulation(
                self._trainer.strategy.config, self.hparams.max_grad_norm, "IterativeDPOModule"
            )

    @torch.no_grad()
    def refresh_reference_weights(self) -> None:
        """Copy the policy's parameters and buffers into the reference, matched by name.

        Under ZeRO-3 each pair is gathered whole, copied on rank 0 and re-partitioned to every rank.
        """
        for kind in ("parameters", "buffers"):
            target = dict(getattr(self.reference, f"named_{kind}")())
            for name, tensor in getattr(self.policy, f"named_{kind}")():
                if name not in target:
                    raise KeyError(
                        f"the reference has no {kind[:-1]} {name!r}: it is not the policy's architecture"
                    )
                with gathered_tensors([target[name], tensor], modifier_rank=0):
                    target[name].data.copy_(tensor.data)

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def sample(self, batch: dict) -> Samples:
        """``num_samples`` responses per prompt of the batch from the current policy, scored."""
        k, hp = self.hparams.num_samples, self.hparams
        eos, pad = self.tokenizer.eos_token_id, pad_id(self.tokenizer)
        prompt_ids = batch["input_ids"].repeat_interleave(k, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(k, 0)
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        columns = repeat_columns(batch.get("columns"), k)
        # Generation keeps no activations for backward, so it can take bigger chunks than a training forward.
        chunks = _slices(len(prompts), 8 * hp.micro_batch_size)
        tokens = {"eos_token_id": eos, "pad_token_id": pad}
        with whole_model_for_generation(self._trainer, self.policy):
            pieces = [
                generate_responses(self.policy, prompt_ids[c], prompt_mask[c], self.sampling, **tokens)
                for c in chunks
            ]
        width = max(ids.shape[1] for ids, _ in pieces)
        pad_to = torch.nn.functional.pad
        response_ids = torch.cat([pad_to(ids, (0, width - ids.shape[1]), value=pad) for ids, _ in pieces])
        response_mask = torch.cat([pad_to(m, (0, width - m.shape[1]), value=0) for _, m in pieces])
        decoded = decode_responses(self.tokenizer, response_ids, response_mask)
        ended = torch.tensor(decoded.ended, device=self.device)
        scores = torch.zeros(len(prompts), device=self.device)
        if self.reward_model is not None:  # scored as PPO scores: prompt + response, read at the last token
            ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
            step = 2 * hp.micro_batch_size
            rm = [sequence_scores(self.reward_model, ids[c], mask[c]) for c in _slices(len(prompts), step)]
            scores += torch.cat(rm)
        if self.reward_function is not None:
            scores += call_reward_function(
                self.reward_function, prompts, decoded.texts, columns, "reward_function"
            ).to(self.device)
        if hp.missing_eos_penalty is not None:
            scores -= hp.missing_eos_penalty * (~ended).float()
        gold = None
        if self.gold_function is not None:
            gold = call_reward_function(self.gold_function, prompts, decoded.texts, columns, "gold_function")
        return Samples(prompt_ids, prompt_mask, response_ids, response_mask, scores, ended, gold)

    @torch.no_grad()
    def reference_logps(self, pair_batch: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Reference log-probs [N] of the chosen and rejected responses (None, None if reference-free)."""
        if self.loss.reference_free:
            return None, None
        n, average, chosen, rejected = pair_batch["index"].numel(), self.hparams.average_log_probs, [], []
        if self.reference is not None:
            reference = self.reference
        else:
            reference = (AdapterReference if self.adapter_refresh else AdaptersDisabled)(self.policy)
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
        hp = self.hparams
        optimizer = self.optimizers()
        ref_chosen, ref_rejected = self.reference_logps(pair_batch)
        valid = pair_batch["valid"]
        sums = torch.zeros(len(_DPO_METRICS) + 1, device=self.device)  # weighted sums, then the pair count
        for _ in range(hp.dpo_epochs):
            order = torch.randperm(valid.numel(), device=valid.device)
            for mini in order.split(hp.mini_batch_size):
                mini_pairs = max(int(valid[mini].sum()), 1)
                optimizer.zero_grad()
                finite = True
                micros = mini.split(hp.micro_batch_size)
                for i, micro in enumerate(micros):
                    start_micro_batch(self._trainer, is_last=i == len(micros) - 1)
                    refs = (None, None) if ref_chosen is None else (ref_chosen[micro], ref_rejected[micro])
                    loss, metrics = self.compute_loss(take_pairs(pair_batch, micro), *refs, valid[micro])
                    finite = self.finite_or_skip({"loss": loss}, {"index": micro})
                    if not finite:
                        break  # nonfinite="skip": this mini-batch makes no optimizer step
                    count = int(valid[micro].sum())
                    # A micro loss is a mean over its pairs: weight it so the step sees the mini-batch mean.
                    self.manual_backward(loss * (count / mini_pairs))
                    if metrics:
                        sums += torch.stack(
                            [*(metrics[k] * count for k in _DPO_METRICS), sums.new_tensor(count)]
                        )
                if not finite:
                    optimizer.zero_grad()
                    continue
                if hp.max_grad_norm is not None:
                    self.clip_gradients(
                        optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                optimizer.step()
        # Pair-weighted means over every rank, in one collective that all ranks make whatever their ties.
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        metrics = dict(zip(_DPO_METRICS, (sums[:-1] / sums[-1].clamp(min=1)).unbind(), strict=True))
        if hp.log_after_update:
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
        if self.hparams.refresh_reference and self.reference is not None:
            self.refresh_reference_weights()
        elif self.adapter_refresh:
            copy_into_reference_adapter(self.policy)
