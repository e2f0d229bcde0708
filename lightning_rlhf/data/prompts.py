"""Prompts only, left-padded for generation: the input of PPO rollouts and iterative DPO."""

from __future__ import annotations

import datasets
from torch.utils.data import DataLoader

from lightning_rlhf.data.base import OnBadRow, TableDataModule, pad_id
from lightning_rlhf.data.collate import PromptCollator
from lightning_rlhf.data.formats import PromptFormat, check_chat_template, decide_format, read_prompt
from lightning_rlhf.data.loading import DataError, check_columns
from lightning_rlhf.data.tokenize import encode_prompt
from lightning_rlhf.validation import ConfigError, check, check_choice


class PromptDataModule(TableDataModule):
    """Prompts from a file, dataset folder or hub name, tokenized and left-padded for ``generate``.

    A row's prompt is a string (standard) or a list of ``{"role", "content"}`` messages (conversational),
    rendered with the chat template and ``add_generation_prompt=True``; ``auto`` decides from the first row.
    A prompt longer than ``max_prompt_length`` tokens keeps its end (cut from the left). Batches::

        prompt          list[str]   the text the policy is given: the rendered prompt, or for a cut prompt
                                    the decoded tokens that were kept
        input_ids       [B, T]      left-padded ids
        attention_mask  [B, T]      1 on real tokens
        index           [B]         position of the prompt in its encoded split
        columns         dict[str, list]  the row's other dataset columns (see ``columns``), one value per
                                    prompt, as Python objects (nested JSON stays lists / dicts)

    The extra columns are what a row-aware reward function receives: PPO and DPO-Iter call
    ``f(prompts, responses, **columns)`` with the columns that its signature names (all with ``**kwargs``).

    ``stats[split]`` counts rows read, kept, dropped (``dropped_empty``: a prompt with no tokens), skipped
    (malformed, with ``on_bad_row="skip"``) and truncated.
    """

    def __init__(
        self,
        tokenizer: str,
        train_file: str,
        val_file: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.0,
        prompt_field: str = "prompt",
        format: PromptFormat = "auto",
        max_prompt_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        on_bad_row: OnBadRow = "raise",
        seed: int = 0,
        chat_template: str | None = None,
        implicit_prompt_delimiter: str = "\n\nAssistant:",
        drop_last: bool = True,
        columns: list[str] | None = None,
        apply_chat_template: bool | None = None,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or local folder (``AutoTokenizer.from_pretrained``), loaded in setup.
            train_file: Training prompts: a .json/.jsonl/.csv/.parquet file, a dataset folder or a hub name.
            val_file: Optional held-out prompts in the same forms.
            train_split: Split of train_file to use (folders and hub datasets; a file is one table).
            val_split: Validation split: of val_file if set (default its 'train' split), else of train_file.
            val_fraction: Share of train_file rows held out for validation by a seeded split (0 = none).
            prompt_field: Column with the prompt (a string or a list of messages).
            format: standard (string), conversational (messages), implicit (a transcript cut after its last
                implicit_prompt_delimiter, e.g. HH-RLHF's chosen column), or auto (standard/conversational).
            max_prompt_length: Longest prompt in tokens; longer prompts keep their last tokens.
            batch_size: Prompts per batch.
            num_workers: DataLoader worker processes.
            on_bad_row: What a malformed row does: 'raise' an error naming file, row and field, or 'skip'
                it and count it in stats.
            seed: Seed of the training shuffle and of the val_fraction split.
            chat_template: Jinja chat template replacing the tokenizer's (for base models that ship none).
            implicit_prompt_delimiter: Where the implicit format ends a transcript's prompt (its last one).
            drop_last: Drop the last, short training batch (a PPO rollout batch must split into mini-batches).
            columns: Other dataset columns carried with each prompt to the reward functions (e.g. test
                cases, a reference answer); None carries every column but prompt_field, [] none.
            apply_chat_template: Render plain-string rows through the tokenizer's chat template (prompt as
                a user turn, response as the assistant's). Default None: used as written, as TRL does, with a
                one-time warning when the tokenizer has a chat template; false: as written, silently.
        """
        super().__init__()
        owner = "PromptDataModule"
        check(owner, "max_prompt_length", max_prompt_length, ge=1, integer=True)
        check_choice(owner, "format", format, ("auto", "standard", "conversational", "implicit"))
        if format == "implicit" and not implicit_prompt_delimiter:
            raise ValueError(f"{owner}: format 'implicit' needs a non-empty implicit_prompt_delimiter")
        if not prompt_field:
            raise ValueError(f"{owner}: prompt_field must be a column name (got {prompt_field!r})")
        if columns is not None and prompt_field in columns:
            raise ConfigError(
                f"{owner}: columns names the prompt column {prompt_field!r}; the prompt is passed to reward "
                "functions anyway, so list only the other columns"
            )
        if columns is not None and len(set(columns)) != len(columns):
            raise ConfigError(f"{owner}: columns lists a name twice: {columns}")
        self.save_hyperparameters()
        self._check_common_args(owner)
        self._init_state(tokenizer)
        self._format: tuple[str, str] = ("standard", "")
        self._extra_columns: list[str] = []
        self._chat = False

    def _prepare(self, table: datasets.Dataset, where: str) -> list[str]:
        field = self.hparams.prompt_field
        check_columns(table, [field], where)
        extra = self.hparams.columns
        if extra is None:
            extra = [c for c in table.column_names if c != field]
        check_columns(table, extra, where, argument="columns")
        self._extra_columns = list(extra)
        self._format = decide_format(
            self.hparams.format, table.select_columns([field]), [field], field, where
        )
        if self._format[0] == "conversational":
            check_chat_template(self.tokenizer)
        self._chat = self._format[0] == "standard" and self._chat_for_strings(table, where, [field])
        return [field, *extra]

    def _encode_row(self, row: dict) -> dict | str:
        hp = self.hparams
        text = read_prompt(
            self.tokenizer, row, hp.prompt_field, *self._format, hp.implicit_prompt_delimiter, chat=self._chat
        )
        ids, truncated = encode_prompt(self.tokenizer, text, max_prompt_length=self.hparams.max_prompt_length)
        if not ids:
            return "dropped_empty"  # nothing to condition generation on
        if truncated:
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        columns = {name: row[name] for name in self._extra_columns}
        return {"prompt": text, "input_ids": ids, "columns": columns, "truncated": truncated}

    def _collator(self) -> PromptCollator:
        return PromptCollator(pad_id(self.tokenizer))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rows = len(self.datasets.get("train", []))
        ranks = self.trainer.world_size if self.trainer is not None else 1
        per_rank = -(-rows // ranks)  # the distributed sampler deals ceil(rows / ranks) to each rank
        if hp.drop_last and rows and per_rank < hp.batch_size:
            raise DataError(
                f"{hp.train_file}: {rows} training prompts over {ranks} rank(s) give {per_rank} per rank, "
                f"fewer than batch_size={hp.batch_size}, and drop_last=True drops that short batch: the fit "
                f"would train on nothing. Set data batch_size <= {per_rank}, add prompts, or drop_last=false."
            )
        return self._loader("train", shuffle=True, drop_last=hp.drop_last)
