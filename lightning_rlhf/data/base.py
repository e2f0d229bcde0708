"""Shared plumbing of the data modules: load the splits, encode row by row under a bad-row policy, count.

A subclass saves its hyperparameters (which must include the common arguments checked by
:meth:`TableDataModule._check_common_args`) and implements three hooks: ``_prepare(table, where)`` checks
the columns and decides the format, ``_encode_row(row)`` returns an encoded dict (with a ``truncated``
flag) or the name of a drop counter, and ``_collator()``.
"""

from __future__ import annotations

import logging
import random
from typing import Literal

import datasets
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.formats import RowError, check_chat_template
from lightning_rlhf.data.loading import DataError, load_table
from lightning_rlhf.data.sampling import (
    ResumableDataLoader,
    ResumableSampler,
    SeededRandomSampler,
    ShardedResumableSampler,
)
from lightning_rlhf.models import load_tokenizer
from lightning_rlhf.validation import ConfigError, check, check_choice

log = logging.getLogger(__name__)

OnBadRow = Literal["raise", "skip"]
STAT_KEYS = ("rows", "kept", "dropped_empty", "skipped_bad", "truncated")


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Any id works as padding because every pad position is masked out; many causal-LM tokenizers ship
    # without a pad token, so fall back to EOS rather than fail.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set one (e.g. eos_token)")


def check_length_args(owner: str, max_length: int, max_prompt_length: int | None) -> None:
    """``max_length`` >= 2 and, if set, ``1 <= max_prompt_length < max_length`` (responses need room)."""
    check(owner, "max_length", max_length, ge=2, integer=True)
    check(owner, "max_prompt_length", max_prompt_length, ge=1, integer=True, optional=True)
    if max_prompt_length is not None and not max_prompt_length < max_length:
        raise ConfigError(
            f"{owner}: max_prompt_length must be in [1, max_length) (got {max_prompt_length} with "
            f"max_length {max_length}); responses need room"
        )


class TableDataModule(LightningDataModule):
    """Base class: train/val tables -> lists of encoded rows in ``self.datasets``, counts in ``self.stats``.

    ``self.stats[split]`` holds ``rows`` (read from the file for this split), ``kept``, ``dropped_empty``
    (no response/prompt token left after truncation), ``skipped_bad`` (malformed rows under
    ``on_bad_row="skip"``), ``truncated`` (kept rows that were cut) and any subclass-specific drop counter.
    Every row read is either kept, dropped or skipped, and each non-zero drop or skip is logged as a warning.
    """

    stat_keys: tuple[str, ...] = STAT_KEYS

    def _init_state(self, tokenizer: str) -> None:
        self.tokenizer_name = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, list[dict]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self._chat_notice_given = False

    def _check_common_args(self, owner: str) -> None:
        hp = self.hparams
        check(owner, "batch_size", hp.batch_size, ge=1, integer=True)
        check(owner, "num_workers", hp.num_workers, ge=0, integer=True)
        check(owner, "seed", hp.seed, integer=True)
        check_choice(owner, "on_bad_row", hp.on_bad_row, ("raise", "skip"))
        check(owner, "val_fraction", hp.val_fraction, ge=0, lt=1)
        if hp.val_fraction > 0 and (hp.val_file or hp.val_split):
            raise ConfigError(
                f"{owner}: val_fraction={hp.val_fraction} carves validation rows out of train_file, so it "
                "cannot be combined with val_file or val_split; set only one of them"
            )

    def _chat_for_strings(self, table: datasets.Dataset, where: str, fields: list[str]) -> bool:
        """Whether plain-string (standard-format) rows go through the chat template: ``apply_chat_template``.

        ``None`` (default) means no, as in TRL, whose standard-format strings are used as written (they may
        already hold a rendered template; wrapping them again would nest two); but when the tokenizer has a
        chat template, say so once, showing what the model will see, since a chat model then trains on text
        shaped unlike its chat turns.
        """
        setting = self.hparams.apply_chat_template
        if setting:
            check_chat_template(self.tokenizer)
            return True
        if setting is None and self.tokenizer.chat_template is not None and not self._chat_notice_given:
            self._chat_notice_given = True
            first = table[0] if len(table) else {}
            example = "".join(v for v in (first.get(f) for f in fields) if isinstance(v, str))
            log.warning(
                "%s: the rows are plain strings, used as written (no chat template), e.g. %r; the tokenizer "
                "has a chat template. Set apply_chat_template=true to render each prompt as a user turn and "
                "each response as the assistant's, use conversational rows (lists of messages), or set "
                "apply_chat_template=false to silence this.",
                where,
                example if len(example) <= 120 else example[:117] + "...",
            )
        return False

    # ----------------------------------------------------------------------------------------- hooks
    def _prepare(self, table: datasets.Dataset, where: str) -> list[str]:
        """Check columns, decide the format; return the columns ``_encode_row`` reads."""
        raise NotImplementedError

    def _encode_row(self, row: dict) -> dict | str:
        """Encoded row (with a ``truncated`` bool) or the name of the counter of a dropped row."""
        raise NotImplementedError

    def _collator(self):
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
            if self.hparams.get("chat_template"):
                # Saved with the tokenizer by HFExport, so later stages render chats the same way.
                self.tokenizer.chat_template = self.hparams.chat_template
        if not self.datasets:
            try:
                self._encode_splits()
            except BaseException:
                self.datasets, self.stats = {}, {}  # no half-loaded state: a retry starts over
                raise

    def _encode_splits(self) -> None:
        hp = self.hparams
        train = load_table(hp.train_file, split=hp.train_split)
        train_where = _where(hp.train_file, hp.train_split)
        val_rows = self._val_rows(len(train), train_where) if hp.val_fraction > 0 and len(train) else None
        self._encode_table(train, train_where, "train", val_rows=val_rows)
        if hp.val_file:
            val_split = hp.val_split or "train"
            self._encode_table(
                load_table(hp.val_file, split=val_split), _where(hp.val_file, val_split), "val"
            )
        elif hp.val_split:
            val = load_table(hp.train_file, split=hp.val_split)
            self._encode_table(val, _where(hp.train_file, hp.val_split), "val")

    def _val_rows(self, n: int, where: str) -> set[int]:
        """Seeded choice of the validation rows when ``val_fraction`` carves them out of the training file."""
        n_val = max(1, round(n * self.hparams.val_fraction))
        if n_val >= n:
            raise DataError(
                f"{where}: val_fraction={self.hparams.val_fraction} of {n} rows leaves no training row; "
                "lower val_fraction or add data"
            )
        return set(random.Random(f"val-split-{self.hparams.seed}").sample(range(n), n_val))

    def _encode_table(
        self, table: datasets.Dataset, where: str, split: str, val_rows: set[int] | None = None
    ) -> None:
        columns = self._prepare(table, where)
        splits = [split] if val_rows is None else [split, "val"]
        stats = {s: dict.fromkeys(self.stat_keys, 0) for s in splits}
        out: dict[str, list[dict]] = {s: [] for s in splits}
        first_skip: dict[str, str] = {}
        first_cut: dict[str, tuple[int, dict]] = {}
        for i, row in enumerate(table.select_columns(columns)):
            target = "val" if val_rows is not None and i in val_rows else split
            counts = stats[target]
            counts["rows"] += 1
            try:
                encoded = self._encode_row(row)
            except RowError as err:
                message = f"{where}: row {i} (0-based), field {err.field!r}: {err.problem}"
                if self.hparams.on_bad_row == "raise":
                    raise DataError(
                        f"{message}. Fix the row, or set on_bad_row='skip' to skip and count such rows."
                    ) from None
                counts["skipped_bad"] += 1
                first_skip.setdefault(target, message)
                continue
            if isinstance(encoded, str):
                counts[encoded] += 1
                continue
            if encoded.pop("truncated"):
                counts["truncated"] += 1
                first_cut.setdefault(target, (i, encoded))
            counts["kept"] += 1
            encoded["index"] = len(out[target])
            out[target].append(encoded)
        for s in splits:
            self._report(s, where, stats[s], first_skip.get(s))
            if s in first_cut:
                self._report_truncation(s, where, stats[s], *first_cut[s])
            self.datasets[s], self.stats[s] = out[s], stats[s]

    def _report(self, split: str, where: str, counts: dict[str, int], first_skip: str | None) -> None:
        lost = {k: v for k, v in counts.items() if k.startswith(("dropped", "skipped")) and v}
        summary = ", ".join(f"{k}={v}" for k, v in counts.items())
        hint = f"; first malformed row: {first_skip}" if first_skip else ""
        if counts["kept"] == 0:
            raise DataError(
                f"{where}: no usable row left for the {split} split ({summary}){hint}. Check the *_field and "
                "format arguments, or raise max_length / max_prompt_length if rows were dropped as empty."
            )
        if lost:
            log.warning(
                "%s (%s split): kept %d of %d rows (%s)%s",
                where,
                split,
                counts["kept"],
                counts["rows"],
                summary,
                hint,
            )
        else:
            log.info("%s (%s split): %s", where, split, summary)

    def _report_truncation(
        self, split: str, where: str, counts: dict[str, int], row: int, encoded: dict
    ) -> None:
        """Warn how many kept rows were cut, showing what the first one became (the model sees only that)."""
        ids = encoded.get("input_ids") or [*encoded.get("prompt_ids", []), *encoded.get("chosen_ids", [])]
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        shown = text if len(text) <= 160 else text[:70] + " ... " + text[-70:]
        limits = ", ".join(
            f"{name}={getattr(self.hparams, name)}"
            for name in ("max_length", "max_prompt_length")
            if getattr(self.hparams, name, None) is not None
        )
        log.warning(
            "%s (%s split): %d of %d kept rows were truncated (%s); row %d (0-based) became %r. Raise the "
            "limits if that cuts what the model should see.",
            where,
            split,
            counts["truncated"],
            counts["kept"],
            limits or "length limits",
            row,
            shown,
        )

    # ----------------------------------------------------------------------------------------- loaders
    def _loader(
        self, split: str, *, shuffle: bool = False, sampler: Sampler | None = None, drop_last: bool = False
    ) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(
                f"no {split!r} split (have {sorted(self.datasets)}); call setup() first, and for 'val' set "
                "val_file, val_split or val_fraction"
            )
        if shuffle and sampler is None:
            # Seeded by (seed, epoch) alone, so a mid-epoch checkpoint can resume at the exact position.
            sampler = SeededRandomSampler(len(self.datasets[split]), seed=self.hparams.seed)
        if isinstance(sampler, ResumableSampler):
            sampler = self._shard_for_ranks(sampler)
        return ResumableDataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            # Only to seed worker processes: without it DataLoader draws that seed from the global torch RNG,
            # shifting every random number the model draws afterwards (a resumed run must not differ).
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=self.hparams.num_workers,
            collate_fn=self._collator(),
            drop_last=drop_last,
        )

    def _shard_for_ranks(self, sampler: ResumableSampler) -> Sampler:
        """This rank's share of ``sampler`` under DDP / DeepSpeed (resumable mid-epoch), else ``sampler``.

        Done here rather than by Lightning, whose wrapper reshuffles the order and cannot save a position;
        ``Trainer(use_distributed_sampler=False)`` leaves the sampler alone, as it does Lightning's.
        """
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        connector = getattr(trainer, "_accelerator_connector", None)
        wanted = getattr(connector, "use_distributed_sampler", True)
        if not kwargs or kwargs["num_replicas"] <= 1 or not wanted:
            return sampler
        return ShardedResumableSampler(sampler, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.datasets else []


def _where(source: str, split: str) -> str:
    # Files have a single table, so the split name would only confuse the message.
    return (
        source if source.lower().endswith((".json", ".jsonl", ".csv", ".parquet")) else f"{source}[{split}]"
    )
