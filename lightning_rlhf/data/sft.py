"""Supervised fine-tuning data: prompt / completion pairs, loss on the completion only."""

from __future__ import annotations

import logging

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_rlhf.data.collate import SFTCollator
from lightning_rlhf.data.loading import check_text_fields, load_table
from lightning_rlhf.data.tokenize import encode_prompt_response

log = logging.getLogger(__name__)


class SFTDataModule(LightningDataModule):
    """Prompt/completion examples from a file, dataset folder or hub name, tokenized with a response mask."""

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str | None = None,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        max_length: int = 256,
        max_prompt_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or local folder (``AutoTokenizer.from_pretrained``).
            train_file: Training data: a .json/.jsonl/.csv/.parquet file, dataset folder or hub name.
            val_file: Optional held-out data in the same form.
            prompt_field: Column holding the prompt text.
            completion_field: Column holding the response text the model learns to produce.
            max_length: Longest prompt + response in tokens (prompt cut on the left, response on the right).
            max_prompt_length: Prompt length kept before the response is cut (default max_length // 2).
            batch_size: Examples per batch.
            num_workers: DataLoader worker processes.
            seed: Seed of the training shuffle.
        """
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"SFTDataModule: {name} must be >= 1 (got {value})")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, list[dict]] = {}
        self.dropped: dict[str, int] = {}

    def _encode_file(self, source: str) -> list[dict]:
        hp = self.hparams
        table = load_table(source)
        check_text_fields(table, [hp.prompt_field, hp.completion_field], source)
        rows, dropped = [], 0
        for prompt, completion in zip(table[hp.prompt_field], table[hp.completion_field], strict=True):
            encoded = encode_prompt_response(
                self.tokenizer,
                prompt,
                completion,
                max_length=hp.max_length,
                max_prompt_length=hp.max_prompt_length,
            )
            if encoded is None:
                dropped += 1
                continue
            rows.append({"input_ids": encoded.input_ids, "response_mask": encoded.response_mask})
        self.dropped[source] = dropped
        if dropped:
            log.warning(
                "%s: dropped %d of %d rows whose response was empty after truncation",
                source,
                dropped,
                len(table),
            )
        if not rows:
            raise ValueError(f"{source}: every row was dropped (empty responses); raise max_length?")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        if "train" not in self.datasets:
            self.datasets["train"] = self._encode_file(self.hparams.train_file)
        if self.hparams.val_file and "val" not in self.datasets:
            self.datasets["val"] = self._encode_file(self.hparams.val_file)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.hparams.num_workers,
            collate_fn=SFTCollator(_pad_id(self.tokenizer)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Any id works as right padding because every pad position is masked out; many causal-LM tokenizers
    # ship without a pad token, so fall back to EOS rather than fail.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
