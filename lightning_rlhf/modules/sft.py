"""Supervised fine-tuning: next-token loss on the response tokens only."""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel

from lightning_rlhf.lora import LoraSettings, apply_lora
from lightning_rlhf.models import load_causal_lm, next_token_logprobs
from lightning_rlhf.modules.base import HFModelModule, NonFinitePolicy
from lightning_rlhf.ops import masked_mean


class SFTModule(HFModelModule):
    """Fine-tune a causal LM on demonstrations; the prompt tokens carry no loss."""

    batch_keys = ("input_ids", "attention_mask", "response_mask")
    data_module = "SFTDataModule"

    def __init__(
        self,
        model: str,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        lora: LoraSettings | None = None,
        trust_remote_code: bool = False,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        """
        Args:
            model: Hub name or local ``save_pretrained`` folder of the causal LM to fine-tune.
            learning_rate: AdamW learning rate (used when no optimizer is given in the config).
            weight_decay: AdamW weight decay (biases and norms excluded).
            lora: Train LoRA adapters instead of all weights (merged on export). Needs the ``peft`` extra.
            trust_remote_code: Allow model code shipped with the checkpoint to run (off for safety).
            nonfinite: A NaN/inf loss or gradient: 'raise' (naming step and rows) or 'skip' the step and count
                it (train/nonfinite_skipped).
        """
        super().__init__(learning_rate, weight_decay, nonfinite)
        self.save_hyperparameters(ignore=["lora"])
        self.lora = self._use_lora(lora)
        self.policy: PreTrainedModel | None = None

    def configure_model(self) -> None:
        # Built here, not in __init__, so that strategies such as DeepSpeed ZeRO-3 can shard it at creation.
        if self.policy is None:
            self.policy = self.build_trained_model()
            # transformers may hand the model back in eval mode; fine-tuning runs in train mode (Lightning
            # switches to eval for validation and back).
            self.policy.train()

    def build_trained_model(self) -> PreTrainedModel:
        policy = load_causal_lm(self.hparams.model, trust_remote_code=self.hparams.trust_remote_code)
        return apply_lora(policy, self.lora, "causal_lm") if self.lora is not None else policy

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        logps = next_token_logprobs(self.policy, batch["input_ids"], batch["attention_mask"])
        # Token-level mean over the batch: long responses weigh in proportion to their length.
        return -masked_mean(logps, batch["response_mask"][:, 1:])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self._loss(batch)
        if not self.finite_or_skip({"nll": loss}, batch):
            return None  # Lightning then skips backward and the optimizer step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0])
