"""Supervised fine-tuning: next-token loss on the response tokens only."""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from lightning_rlhf.ops import masked_mean, token_logprobs


def response_token_logprobs(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probs of each next token and the mask of those that are response tokens, both [B, T-1]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1: drop the last logit and the first label.
    logps = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
    return logps, batch["response_mask"][:, 1:]


class SFTModule(LightningModule):
    """Fine-tune a causal LM on demonstrations; the prompt tokens carry no loss."""

    def __init__(
        self,
        model: str,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            model: Hub name or local ``save_pretrained`` folder of the causal LM to fine-tune.
            learning_rate: AdamW learning rate (used when no optimizer is given in the config).
            weight_decay: AdamW weight decay (biases and norms excluded).
            trust_remote_code: Allow model code shipped with the checkpoint to run (off for safety).
        """
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"SFTModule: learning_rate must be > 0 (got {learning_rate})")
        self.save_hyperparameters()
        self.policy: PreTrainedModel | None = None

    def configure_model(self) -> None:
        # Built here, not in __init__, so that strategies such as DeepSpeed ZeRO-3 can shard it at creation.
        if self.policy is None:
            self.policy = AutoModelForCausalLM.from_pretrained(
                self.hparams.model, trust_remote_code=self.hparams.trust_remote_code
            )
            # transformers may hand the model back in eval mode; fine-tuning runs in train mode (Lightning
            # switches to eval for validation and back).
            self.policy.train()

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        logps, mask = response_token_logprobs(self.policy, batch)
        # Token-level mean over the batch: long responses weigh in proportion to their length.
        return -masked_mean(logps, mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Decay only matrices: decaying biases and norm gains shrinks them towards 0 for no regularising gain.
        decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
