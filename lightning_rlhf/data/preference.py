"""Preference pairs for reward models and DPO: (prompt, chosen, rejected) sharing one truncated prompt."""

from __future__ import annotations

import hashlib
import logging
import math
import struct

import datasets
from torch.utils.data import DataLoader

from lightning_rlhf.data.base import OnBadRow, TableDataModule, check_length_args, pad_id
from lightning_rlhf.data.collate import PreferenceCollator
from lightning_rlhf.data.formats import PairFormat, PairReader, RowError, decide_format
from lightning_rlhf.data.loading import DataError, check_columns
from lightning_rlhf.data.sampling import LengthGroupedSampler
from lightning_rlhf.data.tokenize import encode_pair
from lightning_rlhf.validation import check_choice

log = logging.getLogger(__name__)


class PreferenceDataModule(TableDataModule):
    """Preference pairs from a file, dataset folder or hub name, batched chosen-then-rejected.

    A batch of B pairs (see :class:`~lightning_rlhf.data.collate.PreferenceCollator`)::

        input_ids, attention_mask, response_mask   [2B, T]  rows 0..B-1 chosen, B..2B-1 rejected (same order)
        margin                                      [B]      float, zeros without ``margin_field``
        index                                       [B]      position of the pair in its encoded split

    Formats and the ``auto`` rules are described in :mod:`lightning_rlhf.data.formats`. After :meth:`setup`,
    ``stats[split]`` counts rows read, kept, dropped (``dropped_empty``: a response lost all its tokens to
    truncation; ``dropped_identical``: chosen and rejected became the same tokens after truncation),
    skipped (malformed rows with ``on_bad_row="skip"``) and truncated.
    """

    stat_keys = (*TableDataModule.stat_keys, "dropped_identical")

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.0,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        margin_field: str | None = None,
        format: PairFormat = "auto",
        implicit_prompt_delimiter: str = "\n\nAssistant:",
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_row: OnBadRow = "raise",
        group_by_length: bool = False,
        seed: int = 0,
        chat_template: str | None = None,
        apply_chat_template: bool | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or local folder (``AutoTokenizer.from_pretrained``), loaded in setup.
            train_file: Training pairs: a .json/.jsonl/.csv/.parquet file, a dataset folder or a hub name.
            val_file: Optional validation pairs in the same forms.
            train_split: Split of train_file to train on (folders and hub datasets; a file is one table).
            val_split: Validation split: of val_file if set (default its 'train' split), else of train_file.
            val_fraction: Share of train_file rows held out for validation by a seeded split (0 = none).
            prompt_field: Column with the prompt (string or list of messages); absent for implicit prompts.
            chosen_field: Column with the preferred response (string, messages, or a whole transcript).
            rejected_field: Column with the dispreferred response, in the same form as chosen.
            margin_field: Optional column with a per-pair float margin (e.g. a rating gap); else zeros.
            format: Row format: standard, conversational, implicit, or auto (detected from the first row).
            implicit_prompt_delimiter: For implicit prompts, the prompt ends after the last occurrence of
                this text (default HH-RLHF's '\\n\\nAssistant:') in the common start of chosen and rejected;
                without it (or if '') the prompt ends at a word boundary.
            max_length: Longest prompt + response in tokens (prompt cut on the left, responses on the right).
            max_prompt_length: Prompt tokens kept when a pair is too long (default max_length // 2).
            batch_size: Pairs per batch (the model sees 2 * batch_size sequences).
            num_workers: DataLoader worker processes.
            on_bad_row: What a malformed row does: 'raise' an error naming file, row and field, or 'skip'
                it and count it in stats.
            group_by_length: Batch pairs of similar length together (seeded) to cut padding.
            seed: Seed of the training shuffle, of length grouping and of the val_fraction split.
            chat_template: Jinja chat template replacing the tokenizer's (for base models that ship none).
            apply_chat_template: Render plain-string rows through the tokenizer's chat template (prompt as
                a user turn, response as the assistant's). Default None: used as written, as TRL does, with a
                one-time warning when the tokenizer has a chat template; false: as written, silently.
        """
        super().__init__()
        owner = "PreferenceDataModule"
        check_length_args(owner, max_length, max_prompt_length)
        check_choice(owner, "format", format, ("auto", "standard", "conversational", "implicit"))
        for name, value in (
            ("prompt_field", prompt_field),
            ("chosen_field", chosen_field),
            ("rejected_field", rejected_field),
        ):
            if not value:
                raise ValueError(f"{owner}: {name} must be a column name (got {value!r})")
        if chosen_field == rejected_field:
            raise ValueError(f"{owner}: chosen_field and rejected_field are both {chosen_field!r}")
        self.save_hyperparameters()
        self._check_common_args(owner)
        self._init_state(tokenizer)
        self._reader: PairReader | None = None

    def _prepare(self, table: datasets.Dataset, where: str) -> list[str]:
        hp = self.hparams
        required = [hp.chosen_field, hp.rejected_field] + ([hp.margin_field] if hp.margin_field else [])
        if hp.format == "standard":
            required.insert(0, hp.prompt_field)
        check_columns(table, required, where)
        # With no prompt column (or format=implicit) the prompt comes out of chosen/rejected themselves.
        has_prompt = hp.prompt_field in table.column_names and hp.format != "implicit"
        prompt_field = hp.prompt_field if has_prompt else None
        fields = [f for f in (prompt_field, hp.chosen_field, hp.rejected_field) if f]
        fmt, decided = decide_format(hp.format, table.select_columns(fields), fields, prompt_field, where)
        self._reader = PairReader(
            self.tokenizer,
            fmt,
            decided,
            prompt_field=prompt_field,
            chosen_field=hp.chosen_field,
            rejected_field=hp.rejected_field,
            delimiter=hp.implicit_prompt_delimiter,
            chat=fmt == "standard" and self._chat_for_strings(table, where, fields[:2]),
        )
        return fields + ([hp.margin_field] if hp.margin_field else [])

    def _encode_table(
        self, table: datasets.Dataset, where: str, split: str, val_rows: set[int] | None = None
    ) -> None:
        super()._encode_table(table, where, split, val_rows)
        reader = self._reader
        if reader is not None and reader.undelimited:
            example = reader.undelimited_example
            log.warning(
                "%s: %d implicit-prompt rows have no %r in the common start of chosen and rejected, so their "
                "prompt ends at a word boundary instead, e.g. %r. If the transcripts use another turn marker "
                "(e.g. 'Assistant:' without the blank line), set implicit_prompt_delimiter to it.",
                where,
                reader.undelimited,
                reader.delimiter,
                example if len(example) <= 100 else "..." + example[-97:],
            )

    def _encode_row(self, row: dict) -> dict | str:
        hp = self.hparams
        prompt, chosen, rejected = self._reader(row)
        margin = 0.0
        if hp.margin_field:
            value = row.get(hp.margin_field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RowError(
                    hp.margin_field, f"expected a finite number, got {type(value).__name__} {value!r}"
                )
            margin = float(value)
        pair = encode_pair(
            self.tokenizer,
            prompt,
            chosen,
            rejected,
            max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length,
        )
        if pair is None:
            return "dropped_empty"
        if pair.chosen_ids == pair.rejected_ids:
            return "dropped_identical"  # the responses differed only past max_length: no signal left
        return {
            "prompt_ids": pair.prompt_ids,
            "chosen_ids": pair.chosen_ids,
            "rejected_ids": pair.rejected_ids,
            "margin": margin,
            "truncated": pair.truncated,
        }

    def _collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_id(self.tokenizer))

    def train_dataloader(self) -> DataLoader:
        if not self.hparams.group_by_length:
            return self._loader("train", shuffle=True)
        rows = self.datasets["train"]
        lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        sampler = LengthGroupedSampler(
            lengths, self.hparams.batch_size, seed=self.hparams.seed, num_replicas=world_size
        )
        return self._loader("train", sampler=sampler)

    def reference_dataloader(self, split: str = "train") -> DataLoader:
        """The whole ``split`` in index order, unshuffled, in the training batch format.

        The DPO module runs the frozen reference model over it once and caches the log-probs by ``index``.
        """
        return self._loader(split)

    def fingerprint(self, split: str = "train") -> str:
        """sha256 hex of the encoded ``split``: every pair's prompt / chosen / rejected ids in order (their
        lengths fix the masks), plus the tokenizer class and vocabulary size.

        Equal fingerprints mean a model sees exactly the same token sequences and masks, so cached reference
        log-probs can be reused; any change to data, format, truncation or tokenizer changes it.
        """
        if split not in self.datasets:
            raise DataError(f"no {split!r} split to fingerprint (have {sorted(self.datasets)}); call setup()")
        digest = hashlib.sha256(f"{type(self.tokenizer).__name__}|{len(self.tokenizer)}|".encode())
        for row in self.datasets[split]:
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                ids = row[key]
                digest.update(struct.pack(f"<I{len(ids)}q", len(ids), *ids))
        return digest.hexdigest()
