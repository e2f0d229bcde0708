"""Direct Preference Optimization and its variants (the variant is the ``loss`` object, chosen in YAML)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_rlhf.lora import AdaptersDisabled, LoraSettings, apply_lora, check_dropout
from lightning_rlhf.losses import DPOLoss, DPOLossOutput, SigmoidDPOLoss
from lightning_rlhf.models import (
    LOAD_DTYPE,
    disable_dropout,
    freeze,
    load_causal_lm,
    parameter_dtype,
    response_logps,
)
from lightning_rlhf.modules.base import HFModelModule, NonFinitePolicy, enable_gradient_checkpointing
from lightning_rlhf.modules.reference import load_frozen_reference, reference_model
from lightning_rlhf.modules.reference_cache import ReferenceLogps, precompute_reference_logps
from lightning_rlhf.validation import check
from lightning_rlhf.zero import partitioned_frozen_model, unpartitioned_loading, zero_stage

log = logging.getLogger(__name__)

# The names dpo_metrics() returns (TRL's), in logging order.
DPO_METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps_per_token/chosen",
    "logps_per_token/rejected",
)
_METRICS = ("loss", *DPO_METRIC_NAMES)


def dpo_metrics(
    out: DPOLossOutput, chosen: Tensor, rejected: Tensor, chosen_per_token: Tensor, rejected_per_token: Tensor
) -> dict[str, Tensor]:
    """The DPO metrics under TRL's names, from the loss output and the policy's log-probs [B]."""
    return {
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
        "logps_per_token/chosen": chosen_per_token.detach().mean(),
        "logps_per_token/rejected": rejected_per_token.detach().mean(),
    }


class DPOModule(HFModelModule):
    """DPO (Rafailov et al. 2023) with a frozen reference, or reference-free, on preference batches.

    Chosen and rejected responses go through the policy in one concatenated forward pass (the
    ``PreferenceDataModule`` lays a batch out as [chosen; rejected]). With ``precompute_reference`` the
    reference log-probs of the whole training (and validation) set are computed once before the first step,
    by this module and under whatever strategy runs it, then cached on disk under a fingerprint of the data,
    the tokenizer and the reference weights; training then holds no reference model at all.

    Logged metrics use TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (prefixed ``val/`` in validation), plus the
    distribution-shift diagnostic ``logps_per_token/{chosen,rejected}``: the policy's mean per-token log-prob
    of the preference responses. Very low values at the start mean the pairs are far from what the policy
    would say (the setting where the paper finds DPO fails); ``diagnostics/start/...`` records them before
    the first update.

    With ``lora`` only LoRA adapters are trained, and the reference (live or for the cache) is the policy
    with its adapters switched off: no second copy of the model is held.
    """

    batch_keys = ("input_ids", "attention_mask", "response_mask", "index")  # margin is optional
    data_module = "PreferenceDataModule"

    def __init__(
        self,
        model: str,
        loss: DPOLoss | None = None,
        reference_model: str | None = None,
        precompute_reference: bool = False,
        reference_cache_dir: str | None = None,
        average_log_probs: bool = False,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        disable_dropout: bool = True,
        diagnostic_batches: int = 4,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        """
        Args:
            model: The policy to train: hub name or local ``save_pretrained`` folder (usually the SFT model).
            loss: The DPO variant (default SigmoidDPOLoss(beta=0.1)); pick another by class_path in YAML.
            reference_model: Reference weights if not the initial policy (hub name or folder).
            precompute_reference: Compute reference log-probs once before training and cache them on disk.
            reference_cache_dir: Cache folder for reference log-probs (default <root_dir>/reference_logps).
            average_log_probs: Use per-token mean log-probs instead of sums (usual for IPO).
            learning_rate: AdamW learning rate (the paper's DPO uses 1e-6 at 7B scale).
            weight_decay: AdamW weight decay (biases and norms excluded).
            disable_dropout: Turn dropout off in the policy so policy and reference log-probs are comparable.
            diagnostic_batches: Batches scored before the first update for the start diagnostic (0 = off).
            lora: Train LoRA adapters instead of all weights; the reference is then the base model with
                adapters off (unless reference_model is given). Needs the ``peft`` extra.
            gradient_checkpointing: Recompute the policy's activations in backward (less memory, ~30% slower).
            trust_remote_code: Allow model code shipped with the checkpoint to run (off for safety).
            nonfinite: A NaN/inf loss term or gradient: 'raise' (naming step, rows, term) or 'skip' the step
                and count it (train/nonfinite_skipped).
        """
        super().__init__(learning_rate, weight_decay, nonfinite)
        check("DPOModule", "diagnostic_batches", diagnostic_batches, ge=0, integer=True)
        self.save_hyperparameters(ignore=["loss", "lora"])
        self.loss = self._use_loss(loss, SigmoidDPOLoss(), DPOLoss)
        self.lora = self._use_lora(lora)
        check_dropout("DPOModule", self.lora, disable_dropout)
        if self.loss.reference_free and (reference_model is not None or precompute_reference):
            raise ValueError(
                "DPOModule: the loss is reference_free; leave reference_model and precompute_reference unset"
            )
        self.policy: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.cached: dict[str, ReferenceLogps] = {}
        self._eval_reference: list[PreTrainedModel] = []
        self._start_diagnostic: dict[str, float] | None = None  # kept in checkpoints, re-logged on resume
        self.val_metrics = torch.nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})

    @property
    def needs_live_reference(self) -> bool:
        return not self.loss.reference_free and not self.hparams.precompute_reference

    @property
    def adapter_reference(self) -> bool:
        """Whether the reference is the LoRA policy with its adapters off (no separate reference model)."""
        return self.lora is not None and self.hparams.reference_model is None and not self.loss.reference_free

    def configure_model(self) -> None:
        hp = self.hparams
        if self.policy is None:
            self.policy = self.build_trained_model()
            if hp.disable_dropout:
                disable_dropout(self.policy)
            if hp.gradient_checkpointing:
                enable_gradient_checkpointing(self.policy)
            self.policy.train()
        if self.reference is None and self.needs_live_reference and not self.adapter_reference:
            # Loaded again from disk rather than deep-copied from the policy: under ZeRO-3 the policy's
            # parameters are partitioned at this point and a deepcopy would copy empty shards.
            self.reference = self.load_reference()

    def load_reference(self, dtype: torch.dtype = LOAD_DTYPE) -> PreTrainedModel:
        hp = self.hparams
        return load_frozen_reference(
            hp.reference_model or hp.model, trust_remote_code=hp.trust_remote_code, dtype=dtype
        )

    @contextlib.contextmanager
    def cache_reference(self) -> Iterator[PreTrainedModel | AdaptersDisabled]:
        """The frozen reference for the one-off log-prob pass, in the training dtype, released on exit.

        With LoRA, the policy with its adapters off. Under ZeRO-3 it is loaded into shards with an engine of
        its own (1/world of the weights per rank, :func:`~lightning_rlhf.zero.partitioned_frozen_model`);
        otherwise whole on every rank, each rank scoring its share of the batches.
        """
        if self.adapter_reference:
            yield AdaptersDisabled(self.policy)
            return
        dtype = parameter_dtype(self.policy)  # what the live reference would hold (bf16 under DeepSpeed bf16)
        if zero_stage(self.trainer) == 3:
            with partitioned_frozen_model(self.trainer, self.load_reference) as reference:
                yield reference
            return
        # Whole, not ZeRO-3 partitioned: no engine hooks would gather a model loaded outside configure_model.
        with unpartitioned_loading():
            reference = self.load_reference(dtype).to(self.device)
        yield reference

    def build_trained_model(self) -> PreTrainedModel:
        policy = load_causal_lm(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return apply_lora(policy, self.lora, "causal_lm") if self.lora is not None else policy

    # ------------------------------------------------------------------ reference log-probs
    def on_fit_start(self) -> None:
        self._ensure_cached(["train", "val"])

    def on_validation_start(self) -> None:
        super().on_validation_start()
        # `validate` alone (no fit before it) must find the validation split's reference log-probs too.
        self._ensure_cached(["val"])

    def _ensure_cached(self, splits: list[str]) -> None:
        """Load or compute the reference log-probs of those ``splits`` the datamodule has and we lack."""
        if not self.hparams.precompute_reference:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "reference_dataloader") or not hasattr(datamodule, "fingerprint"):
            raise TypeError(
                "precompute_reference=True needs a datamodule with reference_dataloader(split) and "
                "fingerprint(split), such as lightning_rlhf.PreferenceDataModule"
            )
        available = getattr(datamodule, "datasets", {})
        missing = [split for split in splits if split in available and split not in self.cached]
        if not missing:
            return
        default_dir = Path(self.trainer.default_root_dir) / "reference_logps"
        cache_dir = Path(self.hparams.reference_cache_dir or default_dir)
        self.cached.update(
            precompute_reference_logps(
                self, datamodule, missing, cache_dir, average=self.hparams.average_log_probs
            )
        )

    def reference_logps(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor | None, Tensor | None]:
        if self.loss.reference_free:
            return None, None
        if self.hparams.precompute_reference and split in self.cached:
            return self.cached[split].lookup(batch["index"], device=self.device)
        reference = reference_model(self) or self._eval_reference[0]
        with torch.no_grad():
            logps, _ = response_logps(
                reference, batch, average=self.hparams.average_log_probs, shared_prompts=True
            )
        return logps.chunk(2)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Tensor], split: str) -> tuple[DPOLossOutput, dict[str, Tensor]]:
        # The reference first: its no-grad forward's transient memory is gone before the policy's
        # activations (kept for the backward) build up, so the two never add up to the step's peak.
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        policy, per_token = response_logps(
            self.policy, batch, average=self.hparams.average_log_probs, shared_prompts=True
        )
        chosen, rejected = policy.chunk(2)
        chosen_per_token, rejected_per_token = per_token.chunk(2)
        out = self.loss(chosen, rejected, ref_chosen, ref_rejected, chosen_nll=-chosen_per_token)
        metrics = {
            "loss": out.loss.detach(),
            **dpo_metrics(out, chosen, rejected, chosen_per_token, rejected_per_token),
        }
        return out, metrics

    def on_train_start(self) -> None:
        """Log the distribution-shift diagnostic before any update."""
        if self._start_diagnostic is not None:
            # Resumed: the policy has been trained, so re-log the values measured before the first update.
            self.log_dict({k: torch.tensor(v) for k, v in self._start_diagnostic.items()}, sync_dist=True)
            return
        n = self.hparams.diagnostic_batches
        datamodule = self.trainer.datamodule
        if n == 0 or not hasattr(datamodule, "reference_dataloader"):
            return
        chosen, rejected = [], []
        with torch.no_grad():
            for i, batch in enumerate(datamodule.reference_dataloader("train")):
                if i == n:
                    break
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                _, per_token = response_logps(self.policy, batch, average=True)
                c, r = per_token.chunk(2)
                chosen.append(c)
                rejected.append(r)
        start = {
            "diagnostics/start/logps_per_token/chosen": torch.cat(chosen).mean(),
            "diagnostics/start/logps_per_token/rejected": torch.cat(rejected).mean(),
        }
        self.log_dict(start, sync_dist=True)
        self._start_diagnostic = {k: float(v) for k, v in start.items()}
        log.info(
            "policy mean per-token log-prob before training: %s",
            {k: round(float(v), 4) for k, v in start.items()},
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_start_diagnostic"] = self._start_diagnostic

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._start_diagnostic = checkpoint.get("dpo_start_diagnostic")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        out, metrics = self.compute_loss(batch, "train")
        terms = {"logps/chosen": metrics["logps/chosen"], "logps/rejected": metrics["logps/rejected"]}
        if not self.finite_or_skip({**terms, "loss": out.loss}, batch):
            return None  # Lightning then skips backward and the optimizer step
        size = batch["index"].shape[0]
        self.log("train/loss", metrics.pop("loss"), prog_bar=True, batch_size=size)
        self.log_dict(metrics, batch_size=size)
        return out.loss

    def _evaluate(self, batch: dict[str, Tensor], split: str) -> None:
        _, metrics = self.compute_loss(batch, split)
        size = batch["index"].shape[0]
        for name, value in metrics.items():
            self.val_metrics[name.replace("/", "_")].update(value, weight=size)

    def _log_evaluation(self, prefix: str) -> None:
        self.log_dict(
            {f"{prefix}/{name}": self.val_metrics[name.replace("/", "_")].compute() for name in _METRICS}
        )
        for metric in self.val_metrics.values():
            metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_start(self) -> None:
        if self.reference is None and not self.loss.reference_free and not self.adapter_reference:
            # Test data has no precomputed log-probs: hold a reference for the test run only. Kept in a list
            # so it is not registered as a submodule (it must not enter checkpoints or the optimizer).
            self._eval_reference = [freeze(self.load_reference()).to(self.device)]

    def on_test_end(self) -> None:
        self._eval_reference = []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
