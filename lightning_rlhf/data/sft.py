"""Supervised fine-tuning data: prompt / completion pairs or chat transcripts, loss on the completion only."""

from __future__ import annotations

from typing import Literal

import datasets

from lightning_rlhf.data.base import OnBadRow, TableDataModule, check_length_args, pad_id
from lightning_rlhf.data.collate import SFTCollator
from lightning_rlhf.data.formats import as_chat, check_chat_template, read_sft_messages, text_field
from lightning_rlhf.data.loading import check_columns
from lightning_rlhf.data.tokenize import encode_prompt_response
from lightning_rlhf.validation import check_choice

SFTFormat = Literal["auto", "prompt_completion", "messages"]


class SFTDataModule(TableDataModule):
    """Prompt/completion examples from a file, dataset folder or hub name, tokenized with a response mask.

    Two row formats:

    * ``prompt_completion``: ``prompt_field`` and ``completion_field`` hold strings.
    * ``messages``: ``messages_field`` holds a list of ``{"role", "content"}`` messages; the final message
      must be the assistant's and is the completion, everything before it is the prompt, rendered with the
      chat template and ``add_generation_prompt=True`` (see
      :func:`~lightning_rlhf.data.formats.render_conversation` for how EOS is kept exactly once).

    ``auto`` picks ``messages`` when the data has a ``messages_field`` column and no ``prompt_field`` column,
    else ``prompt_completion``. Batches hold ``input_ids``, ``attention_mask`` and ``response_mask`` [B, T]
    (right padding). ``stats[split]`` counts rows read, kept, dropped (``dropped_empty``: no completion token
    left after truncation), skipped (malformed, with ``on_bad_row="skip"``) and truncated.
    """

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
        messages_field: str = "messages",
        format: SFTFormat = "auto",
        on_bad_row: OnBadRow = "raise",
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.0,
        chat_template: str | None = None,
        apply_chat_template: bool | None = None,
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
            seed: Seed of the training shuffle and of the val_fraction split.
            messages_field: Column holding a chat transcript (list of messages) for the messages format.
            format: Row format: prompt_completion, messages, or auto (messages when only that column exists).
            on_bad_row: What a malformed row does: 'raise' an error naming file, row and field, or 'skip'
                it and count it in stats.
            train_split: Split of train_file to train on (folders and hub datasets; a file is one table).
            val_split: Validation split: of val_file if set (default its 'train' split), else of train_file.
            val_fraction: Share of train_file rows held out for validation by a seeded split (0 = none).
            chat_template: Jinja chat template replacing the tokenizer's (for base models that ship none).
            apply_chat_template: Render plain-string rows through the tokenizer's chat template (prompt as
                a user turn, response as the assistant's). Default None: used as written, as TRL does, with a
                one-time warning when the tokenizer has a chat template; false: as written, silently.
        """
        super().__init__()
        owner = "SFTDataModule"
        check_length_args(owner, max_length, max_prompt_length)
        check_choice(owner, "format", format, ("auto", "prompt_completion", "messages"))
        self.save_hyperparameters()
        self._check_common_args(owner)
        self._init_state(tokenizer)
        self._format = "prompt_completion"
        self._chat = False

    def _prepare(self, table: datasets.Dataset, where: str) -> list[str]:
        hp = self.hparams
        fmt = hp.format
        if fmt == "auto":
            columns = table.column_names
            only_messages = hp.messages_field in columns and hp.prompt_field not in columns
            fmt = "messages" if only_messages else "prompt_completion"
        fields = [hp.messages_field] if fmt == "messages" else [hp.prompt_field, hp.completion_field]
        check_columns(table, fields, where)
        if fmt == "messages":
            check_chat_template(self.tokenizer)
        self._chat = fmt == "prompt_completion" and self._chat_for_strings(table, where, fields)
        self._format = fmt
        return fields

    def _encode_row(self, row: dict) -> dict | str:
        hp = self.hparams
        if self._format == "messages":
            prompt, completion = read_sft_messages(self.tokenizer, row, hp.messages_field)
        else:
            prompt, completion = text_field(row, hp.prompt_field), text_field(row, hp.completion_field)
            if self._chat:
                prompt, (completion,) = as_chat(self.tokenizer, prompt, [completion], hp.completion_field)
        encoded = encode_prompt_response(
            self.tokenizer,
            prompt,
            completion,
            max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length,
        )
        if encoded is None:
            return "dropped_empty"
        return {
            "input_ids": encoded.input_ids,
            "response_mask": encoded.response_mask,
            "truncated": encoded.truncated,
        }

    def _collator(self) -> SFTCollator:
        return SFTCollator(pad_id(self.tokenizer))
