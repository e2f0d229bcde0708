"""Turn (prompt, response) text into token ids with a response mask, truncating the way users expect.

Both entry points share one rule (:func:`_budget`): when prompt + response is longer than ``max_length``, the
prompt is cut from the **left** (its end, next to the response, matters most) down to ``max_prompt_length``
(default ``max_length // 2``), then the response is cut from the **right**. Text is tokenized without special
tokens: a chat template or the user's text already carries whatever BOS/role markers the model expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``input_ids`` is prompt + response; ``response_mask`` marks the response."""

    input_ids: list[int]
    response_mask: list[int]
    truncated: bool


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized preference pair sharing a single prompt: chosen = prompt_ids + chosen_ids, etc."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _check_lengths(max_length: int, max_prompt_length: int | None) -> int:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (got {max_length})")
    return max_length // 2 if max_prompt_length is None else max_prompt_length


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS before text by default (Llama does; GPT-2 and the testbed do not)."""
    cached = getattr(tokenizer, "_lightning_rlhf_adds_bos", None)
    if cached is None:
        bos = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
        cached = bool(ids) and ids[0] == bos
        tokenizer._lightning_rlhf_adds_bos = cached
    return cached


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids without special tokens, plus BOS first when the tokenizer adds one and the text lacks it.

    Text is tokenized without special tokens so that responses never get a BOS in the middle; models
    trained with a BOS (Llama) still see one at the start of every sequence.
    """
    ids = _text_ids(tokenizer, prompt)
    if _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _keep_bos(tokenizer: PreTrainedTokenizerBase, kept: list[int], full: list[int]) -> list[int]:
    """After cutting a prompt from the left, put its BOS back in place of the first kept token."""
    if kept and full and kept[0] != full[0] and full[0] == tokenizer.bos_token_id and _adds_bos(tokenizer):
        return [full[0], *kept[1:]]
    return kept


def _response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Tokenize a response and end it with EOS exactly once (not again if the text already ends with it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so that responses can end")
    ids = _text_ids(tokenizer, response)
    return ids if ids and ids[-1] == eos else [*ids, eos]


def _budget(prompt_len: int, response_len: int, max_length: int, max_prompt_length: int) -> tuple[int, int]:
    """Tokens kept from the prompt's end and from the response's start so that the two fit ``max_length``."""
    if prompt_len + response_len <= max_length:
        return prompt_len, response_len
    keep_prompt = min(prompt_len, max(max_prompt_length, max_length - response_len))
    return keep_prompt, max_length - keep_prompt


def _has_text(response_ids: list[int], eos: int) -> bool:
    # Nothing of the response's own text survived: an EOS alone would teach the model to say nothing.
    return any(token != eos for token in response_ids)


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> Encoded | None:
    """Tokenize prompt and response separately and join them, so the response mask is exact.

    EOS is appended to the response exactly once; truncation follows the module rule (prompt cut left to
    ``max_prompt_length``, then response cut right). Returns None when no response token would survive: the
    caller drops and counts such examples (an empty response included); they must never reach a loss.
    """
    max_prompt_length = _check_lengths(max_length, max_prompt_length)
    full_prompt = prompt_token_ids(tokenizer, prompt)
    response_ids = _response_ids(tokenizer, response)
    keep_prompt, keep_response = _budget(len(full_prompt), len(response_ids), max_length, max_prompt_length)
    truncated = (keep_prompt, keep_response) != (len(full_prompt), len(response_ids))
    prompt_ids = _keep_bos(tokenizer, full_prompt[len(full_prompt) - keep_prompt :], full_prompt)
    response_ids = response_ids[:keep_response]
    if not _has_text(response_ids, tokenizer.eos_token_id):
        return None
    return Encoded(
        input_ids=prompt_ids + response_ids,
        response_mask=[0] * len(prompt_ids) + [1] * len(response_ids),
        truncated=truncated,
    )


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedPair | None:
    """Tokenize a preference pair so that chosen and rejected see the **identical** prompt tokens.

    The prompt is tokenized once. The budget is set by the longer response (with its EOS): the prompt is cut
    from the left as :func:`encode_prompt_response` would for that response, and then both responses are cut
    from the right to ``max_length - len(prompt)``. So ``prompt + chosen`` and ``prompt + rejected`` each fit
    ``max_length``, and a DPO log-ratio compares the two responses under one context. Returns None when
    either response keeps no token of its own text (the caller counts the drop).
    """
    max_prompt_length = _check_lengths(max_length, max_prompt_length)
    full_prompt = prompt_token_ids(tokenizer, prompt)
    chosen_ids = _response_ids(tokenizer, chosen)
    rejected_ids = _response_ids(tokenizer, rejected)
    longer = max(len(chosen_ids), len(rejected_ids))
    keep_prompt, keep_response = _budget(len(full_prompt), longer, max_length, max_prompt_length)
    truncated = (keep_prompt, keep_response) != (len(full_prompt), longer)
    prompt_ids = _keep_bos(tokenizer, full_prompt[len(full_prompt) - keep_prompt :], full_prompt)
    chosen_ids, rejected_ids = chosen_ids[:keep_response], rejected_ids[:keep_response]
    eos = tokenizer.eos_token_id
    if not (_has_text(chosen_ids, eos) and _has_text(rejected_ids, eos)):
        return None
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids, truncated)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, max_prompt_length: int
) -> tuple[list[int], bool]:
    """Tokenize a generation prompt, keeping its last ``max_prompt_length`` tokens: ``(ids, truncated)``."""
    ids = prompt_token_ids(tokenizer, prompt)
    kept = _keep_bos(tokenizer, ids[max(0, len(ids) - max_prompt_length) :], ids)
    return kept, len(ids) > max_prompt_length
