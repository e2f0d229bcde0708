"""Reward model: a scalar head on a causal-LM backbone, trained with the Bradley-Terry loss on pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric
from transformers import AutoConfig, PreTrainedModel

from lightning_rlhf.lora import LoraSettings, apply_lora
from lightning_rlhf.losses import BradleyTerryLoss
from lightning_rlhf.models import load_reward_model, load_tokenizer, sequence_scores
from lightning_rlhf.modules.base import HFModelModule, NonFinitePolicy, enable_gradient_checkpointing

log = logging.getLogger(__name__)


def record_distinct_pad_token(folder: str | Path) -> None:
    """Give a saved reward-model folder a pad token that is not EOS (see ``RewardModule.save_pretrained``)."""
    tokenizer = load_tokenizer(str(folder))
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    for token, token_id in (
        (tokenizer.unk_token, tokenizer.unk_token_id),
        (tokenizer.bos_token, tokenizer.bos_token_id),
    ):
        if token_id is not None and token_id != eos:
            tokenizer.pad_token = token
            tokenizer.save_pretrained(folder)
            config = AutoConfig.from_pretrained(folder)
            config.pad_token_id = token_id
            config.save_pretrained(folder)
            log.info(
                "%s: pad token set to %r (was EOS) so plain transformers scores at the EOS", folder, token
            )
            return
    log.warning(
        "%s: the tokenizer pads with EOS and has no other special token to pad with, so "
        "AutoModelForSequenceClassification will read scores one token early; score with "
        "lightning_rlhf.models.sequence_scores, or add a pad token to the tokenizer before training",
        folder,
    )


class RewardModule(HFModelModule):
    """Learn r(prompt, response) from preference pairs: P(chosen > rejected) = sigmoid(r_c - r_r - margin).

    Batches follow the preference layout of :class:`~lightning_rlhf.PreferenceDataModule`: ``input_ids``
    [2B, T] with the B chosen rows first, plus ``attention_mask`` and ``margin`` [B]. The score of a sequence
    is read at its last real token (from the attention mask, whatever the padding side or pad token).
    With ``lora`` the backbone gets LoRA adapters and the ``score`` head is trained fully (PEFT's
    ``modules_to_save``); the export merges them into a plain sequence-classification model.
    """

    batch_keys = ("input_ids", "attention_mask", "response_mask", "index")  # margin is optional
    data_module = "PreferenceDataModule"

    def __init__(
        self,
        model: str,
        loss: BradleyTerryLoss | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        """
        Args:
            model: Causal-LM backbone (gets a fresh scalar head) or a saved reward model; hub name or folder.
            loss: The pairwise loss; default Bradley-Terry with no reward centering.
            learning_rate: AdamW learning rate (used when no optimizer is given in the config).
            weight_decay: AdamW weight decay (biases and norms excluded).
            lora: Train LoRA adapters on the backbone (and the score head fully). Needs the ``peft`` extra.
            gradient_checkpointing: Recompute activations in backward (less memory, ~30% slower).
            trust_remote_code: Allow model code shipped with the checkpoint to run (off for safety).
            nonfinite: A NaN/inf loss term or gradient: 'raise' (naming step, rows, term) or 'skip' the step
                and count it (train/nonfinite_skipped).
        """
        super().__init__(learning_rate, weight_decay, nonfinite)
        self.save_hyperparameters(ignore=["loss", "lora"])
        self.loss = self._use_loss(loss, BradleyTerryLoss(), BradleyTerryLoss)
        self.lora = self._use_lora(lora)
        self.reward_model: PreTrainedModel | None = None
        self.val_accuracy, self.val_margin, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_rewards = CatMetric()

    def configure_model(self) -> None:
        if self.reward_model is None:
            self.reward_model = self.build_trained_model()
            if self.hparams.gradient_checkpointing:
                enable_gradient_checkpointing(self.reward_model)
            self.reward_model.train()

    trained_attribute = "reward_model"

    def build_trained_model(self) -> PreTrainedModel:
        model = load_reward_model(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return apply_lora(model, self.lora, "sequence_classification") if self.lora is not None else model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the reward model and tokenizer; with a pad token equal to EOS, record a distinct one.

        ``AutoModelForSequenceClassification`` reads the score at the last token that is not
        ``config.pad_token_id``. When padding is EOS (most chat models), that skips the response's own EOS
        and scores one token early — not where this package trained and reads it (the last attended token).
        So the folder gets another existing special token (unk, else bos) as its pad token, in the tokenizer
        and the config: plain transformers, TRL or a serving stack then score exactly as ``sequence_scores``.
        """
        path = super().save_pretrained(path)
        if self._trainer is None or self.trainer.is_global_zero:
            record_distinct_pad_token(path)
        return path

    def score_pairs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Rewards of the chosen and the rejected responses, [B] each, from one forward pass."""
        scores = sequence_scores(self.reward_model, batch["input_ids"], batch["attention_mask"])
        return scores.chunk(2)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        chosen, rejected = self.score_pairs(batch)
        out = self.loss(chosen, rejected, margin=batch.get("margin"))
        terms = {"rewards/chosen": chosen, "rewards/rejected": rejected, "loss": out.loss}
        if not self.finite_or_skip(terms, batch):
            return None  # Lightning then skips backward and the optimizer step
        size = chosen.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", out.accuracy, prog_bar=True, batch_size=size)
        self.log("train/margin", out.margin_mean, batch_size=size)
        return out.loss

    def _evaluate(self, batch: dict[str, Tensor]) -> None:
        chosen, rejected = self.score_pairs(batch)
        out = self.loss(chosen, rejected, margin=batch.get("margin"))
        size = chosen.shape[0]
        self.val_loss.update(out.loss, weight=size)
        self.val_accuracy.update(out.accuracy, weight=size)
        self.val_margin.update(out.margin_mean, weight=size)
        self.val_rewards.update(torch.cat([chosen, rejected]).float())

    def _log_evaluation(self, prefix: str) -> None:
        rewards = self.val_rewards.compute()
        self.log_dict(
            {
                f"{prefix}/loss": self.val_loss.compute(),
                f"{prefix}/accuracy": self.val_accuracy.compute(),
                f"{prefix}/margin": self.val_margin.compute(),
                f"{prefix}/reward_mean": rewards.mean(),
                f"{prefix}/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            },
            prog_bar=False,
        )
        for metric in (self.val_loss, self.val_accuracy, self.val_margin, self.val_rewards):
            metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
