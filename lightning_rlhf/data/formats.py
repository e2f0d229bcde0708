"""Row formats: read one row of a table and return plain text (prompt, responses) ready for tokenization.

Preference rows come in three formats (the same names as TRL's dataset formats):

* ``standard``: ``prompt``, ``chosen`` and ``rejected`` are strings.
* ``conversational``: ``prompt`` is a list of ``{"role", "content"}`` messages and ``chosen`` / ``rejected``
  are lists of messages (usually one assistant message); or there is no prompt column and ``chosen`` /
  ``rejected`` are whole conversations whose shared leading messages are the prompt. Text comes from the
  tokenizer's chat template (:func:`render_conversation`).
* ``implicit``: only ``chosen`` / ``rejected`` strings, e.g. HH-RLHF transcripts; the prompt is their common
  beginning (:func:`split_implicit`).

``auto`` decides per dataset (:func:`row_kind`, first row that tells): any list among the fields means
conversational; otherwise a prompt column with a string means standard; no prompt column and string
responses mean implicit. A later row of another kind is a bad row ("mixed formats"), never guessed at.

Readers raise :class:`RowError` (field + problem); the data module adds the file and row number and applies
its ``on_bad_row`` policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.loading import DataError

PairFormat = Literal["auto", "standard", "conversational", "implicit"]
PromptFormat = Literal["auto", "standard", "conversational", "implicit"]


class RowError(Exception):
    """One malformed row: ``field`` names the column, ``problem`` says what is wrong with its value."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def text_field(row: dict, field: str, note: str = "") -> str:
    """The string in ``row[field]``, or :class:`RowError` for a missing, None or non-string value."""
    value = row.get(field)
    if not isinstance(value, str):
        missing = " (missing in this row)" if value is None else ""
        raise RowError(field, f"expected a string, got {_show(value)}{missing}{note}")
    return value


def message_field(row: dict, field: str, note: str = "") -> list[dict]:
    """The messages in ``row[field]``: a non-empty list of dicts with string ``role`` and ``content``.

    Keys whose value is None are dropped: Arrow gives every message of a column the union of all keys, so a
    ``name`` used in one message shows up as ``name: None`` in every other one, which templates may print.
    """
    value = row.get(field)
    if not isinstance(value, list) or not value:
        missing = " (missing in this row)" if value is None else ""
        raise RowError(
            field,
            f"expected a non-empty list of {{'role', 'content'}} messages, got {_show(value)}{missing}{note}",
        )
    messages = []
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RowError(
                field, f"message {i} needs a string 'role' and a string 'content', got {_show(message)}"
            )
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise :class:`DataError` when conversational data meets a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the data is conversational (lists of messages) but the tokenizer has no chat_template; use a "
            "tokenizer that ships one, or set the datamodule's chat_template argument"
        )


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: list[dict], field: str
) -> tuple[str, str]:
    """Render prompt and response messages with the chat template; return ``(prompt_text, response_text)``.

    ``prompt_text`` is the prompt with ``add_generation_prompt=True`` (what a policy is given to generate
    from) and ``response_text`` is the rest of the full rendering. The full rendering must start with the
    prompt rendering, otherwise the response mask would cover the wrong tokens: a template that is not
    prefix-stable is a :class:`RowError` on ``field``.

    When the response ends with the EOS text followed only by whitespace (this project's template writes
    ``eos + "\\n"`` after an assistant turn), the trailing whitespace is cut: EOS is where generation stops,
    so a token after it would be learned but never generated. The tokenizer step then sees EOS and does not
    append a second one.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise RowError(
            field,
            "the chat template is not prefix-stable: rendering prompt + response does not start with the "
            f"prompt rendered with add_generation_prompt=True ({prompt_text[-40:]!r} vs "
            f"{full[max(0, len(prompt_text) - 40) : len(prompt_text)]!r}); use a template whose generation "
            "prompt is the start of the assistant turn, or pass pre-rendered standard-format text",
        )
    response_text = full[len(prompt_text) :]
    eos = tokenizer.eos_token
    if eos and response_text.rstrip().endswith(eos):
        response_text = response_text.rstrip()
    return prompt_text, response_text


def as_chat(
    tokenizer: PreTrainedTokenizerBase, prompt: str, responses: Iterable[str], field: str
) -> tuple[str, list[str]]:
    """Plain-string ``prompt`` as a user turn and each response as the assistant's, through the chat template.

    Returns ``(prompt_text, [response_text, ...])`` as :func:`render_conversation` renders them.
    """
    user = [{"role": "user", "content": prompt}]
    rendered = [
        render_conversation(tokenizer, user, [{"role": "assistant", "content": r}], field) for r in responses
    ]
    prompt_text = (
        rendered[0][0]
        if rendered
        else tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    )
    return prompt_text, [text for _, text in rendered]


def split_implicit(
    chosen: str, rejected: str, delimiter: str, fields: tuple[str, str] = ("chosen", "rejected")
) -> tuple[str, str, str]:
    """Split two full transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix, cut back to just after the **last** ``delimiter`` inside it
    (so with ``"\\n\\nAssistant:"`` the prompt ends at the final assistant tag even when both responses start
    with the same words); without a delimiter it is cut back to the start of its last whitespace run (the
    space goes with the response, as byte-level BPE tokenizers attach it to the next word). An empty prompt
    or response is a :class:`RowError` on the matching name in ``fields`` (the chosen and rejected columns).
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    at = prefix.rfind(delimiter) if delimiter else -1
    if at >= 0:
        cut = at + len(delimiter)
    else:
        cut = len(prefix)
        while cut > 0 and not prefix[cut - 1].isspace():
            cut -= 1
        while cut > 0 and prefix[cut - 1].isspace():
            cut -= 1
    if cut == 0:
        raise RowError(
            fields[0],
            f"{fields[0]!r} and {fields[1]!r} share no prompt (common start {prefix[:40]!r}, no "
            f"{delimiter!r} and no word boundary in it); add a prompt column (standard format) or set "
            "implicit_prompt_delimiter",
        )
    for field, text in zip(fields, (chosen, rejected), strict=True):
        if not text[cut:].strip():
            raise RowError(
                field,
                f"the response is empty once the shared prompt {prefix[max(0, cut - 40) : cut]!r} is removed",
            )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def row_kind(row: dict, fields: Iterable[str], prompt_field: str | None) -> str | None:
    """The format one row looks like, or None when its values do not tell (missing values)."""
    values = [row.get(f) for f in fields]
    if any(isinstance(v, list) for v in values):
        return "conversational"
    if prompt_field is not None and isinstance(row.get(prompt_field), str):
        return "standard"
    if prompt_field is None and any(isinstance(v, str) for v in values):
        return "implicit"
    return None


def decide_format(
    requested: str, rows: Iterable[dict], fields: list[str], prompt_field: str | None, source: str
) -> tuple[str, str]:
    """Resolve ``auto``: return ``(format, how it was decided)`` from the first row whose values tell."""
    if requested != "auto":
        return requested, f"format={requested!r}"
    for i, row in enumerate(rows):
        kind = row_kind(row, fields, prompt_field)
        if kind is not None:
            return kind, f"detected from row {i}"
    raise DataError(
        f"{source}: cannot detect the format: no row has a string or a list of messages in {fields}; set "
        "format explicitly or check the *_field arguments"
    )


class PairReader:
    """Turn one preference row into ``(prompt, chosen, rejected)`` text in the dataset's format."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        fmt: str,
        decided: str,
        *,
        prompt_field: str | None,
        chosen_field: str,
        rejected_field: str,
        delimiter: str,
        chat: bool = False,
    ) -> None:
        self.tokenizer, self.format, self.decided, self.chat = tokenizer, fmt, decided, chat
        # Implicit rows whose shared start lacks the delimiter (their prompt ends at a word boundary).
        self.undelimited, self.undelimited_example = 0, ""
        self.prompt_field, self.chosen_field, self.rejected_field = prompt_field, chosen_field, rejected_field
        self.delimiter = delimiter
        if fmt == "conversational":
            check_chat_template(tokenizer)

    def _note(self, row: dict) -> str:
        fields = [f for f in (self.prompt_field, self.chosen_field, self.rejected_field) if f]
        kind = row_kind(row, fields, self.prompt_field)
        if kind is None or kind == self.format:
            return ""
        return (
            f"; this row looks {kind} but the dataset is {self.format} ({self.decided}): mixed formats in "
            "one file are not supported, convert the rows to one format"
        )

    _identical = "identical to 'chosen': a pair needs two different responses; fix or drop the row"

    def __call__(self, row: dict) -> tuple[str, str, str]:
        note = self._note(row)
        if self.format == "conversational":
            prompt, chosen, rejected = self._conversation(row, note)
        elif self.format == "standard":
            prompt, chosen, rejected = (
                text_field(row, f, note) for f in (self.prompt_field, self.chosen_field, self.rejected_field)
            )
            if self.chat:
                prompt, (chosen, rejected) = as_chat(
                    self.tokenizer, prompt, [chosen, rejected], self.chosen_field
                )
        else:
            chosen, rejected = (
                text_field(row, self.chosen_field, note),
                text_field(row, self.rejected_field, note),
            )
            if chosen == rejected:  # checked before splitting, which would report empty responses instead
                raise RowError(self.rejected_field, self._identical)
            fields = (self.chosen_field, self.rejected_field)
            prompt, chosen, rejected = split_implicit(chosen, rejected, self.delimiter, fields)
            if self.delimiter and self.delimiter not in prompt:
                self.undelimited += 1
                self.undelimited_example = self.undelimited_example or prompt
        if chosen == rejected:
            raise RowError(self.rejected_field, self._identical)
        return prompt, chosen, rejected

    def _conversation(self, row: dict, note: str) -> tuple[str, str, str]:
        c_field, r_field = self.chosen_field, self.rejected_field
        if self.prompt_field is not None:
            prompt_msgs = message_field(row, self.prompt_field, note)
            chosen_msgs, rejected_msgs = message_field(row, c_field, note), message_field(row, r_field, note)
        else:
            chosen_all, rejected_all = message_field(row, c_field, note), message_field(row, r_field, note)
            if chosen_all == rejected_all:
                raise RowError(r_field, self._identical)
            n = 0
            while n < min(len(chosen_all), len(rejected_all)) and chosen_all[n] == rejected_all[n]:
                n += 1
            if n == 0:
                raise RowError(
                    c_field,
                    "the chosen and rejected conversations share no leading message, so there is no prompt; "
                    "add a prompt column of messages",
                )
            prompt_msgs, chosen_msgs, rejected_msgs = chosen_all[:n], chosen_all[n:], rejected_all[n:]
            for field, msgs in ((c_field, chosen_msgs), (r_field, rejected_msgs)):
                if not msgs:
                    raise RowError(
                        field, "no message after the shared prompt messages: the response is empty"
                    )
        prompt, chosen = render_conversation(self.tokenizer, prompt_msgs, chosen_msgs, c_field)
        _, rejected = render_conversation(self.tokenizer, prompt_msgs, rejected_msgs, r_field)
        return prompt, chosen, rejected


def read_prompt(
    tokenizer: PreTrainedTokenizerBase,
    row: dict,
    field: str,
    fmt: str,
    decided: str,
    delimiter: str = "",
    chat: bool = False,
) -> str:
    """Prompt text of one row: the string itself (``chat``: as a user turn through the chat template),
    messages rendered with ``add_generation_prompt=True``, or (``implicit``) a transcript cut right after its
    last ``delimiter`` (HH-RLHF: "\\n\\nAssistant:")."""
    if fmt == "implicit":
        text = text_field(row, field)
        cut = text.rfind(delimiter) if delimiter else -1
        if cut < 0:
            raise RowError(field, f"the transcript has no {delimiter!r} to end its prompt at")
        return text[: cut + len(delimiter)]
    kind = row_kind(row, [field], field)
    note = ""
    if kind is not None and kind != fmt:
        note = (
            f"; this row looks {kind} but the dataset is {fmt} ({decided}): mixed formats are not supported"
        )
    if fmt == "standard":
        text = text_field(row, field, note)
        return as_chat(tokenizer, text, [], field)[0] if chat else text
    messages = message_field(row, field, note)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_sft_messages(tokenizer: PreTrainedTokenizerBase, row: dict, field: str) -> tuple[str, str]:
    """``(prompt, completion)`` of a ``messages`` row: the final assistant message is the completion."""
    messages = message_field(row, field)
    if messages[-1]["role"] != "assistant":
        raise RowError(
            field,
            f"the last message must be the assistant reply to learn, got role {messages[-1]['role']!r}",
        )
    if len(messages) < 2:
        raise RowError(field, "needs at least one message (the prompt) before the final assistant message")
    return render_conversation(tokenizer, messages[:-1], messages[-1:], field)
