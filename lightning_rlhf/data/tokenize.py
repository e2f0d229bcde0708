"""Turn (prompt, response) text into token ids with a response mask, truncating the way users expect."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``input_ids`` is prompt + response; ``response_mask`` marks the response."""

    input_ids: list[int]
    response_mask: list[int]
    truncated: bool


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> Encoded | None:
    """Tokenize prompt and response separately and join them, so the response mask is exact.

    The EOS token is appended to the response exactly once (not again if the text already ends with it).
    When the pair is longer than ``max_length``, the prompt is cut from the **left** (its end, next to the
    response, matters most) down to ``max_prompt_length`` (default ``max_length // 2``), then the response is
    cut from the **right**. Returns None when no response token would survive: the caller drops and counts
    such examples (an empty response included); they must never reach a loss.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (got {max_length})")
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so that responses can end")
    if not response_ids or response_ids[-1] != eos:
        response_ids = [*response_ids, eos]
    truncated = False
    if len(prompt_ids) + len(response_ids) > max_length:
        truncated = True
        keep_prompt = min(len(prompt_ids), max(max_prompt_length, max_length - len(response_ids)))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    if all(token == eos for token in response_ids):
        # Nothing of the response's own text survived: an EOS alone would teach the model to say nothing.
        return None
    return Encoded(
        input_ids=prompt_ids + response_ids,
        response_mask=[0] * len(prompt_ids) + [1] * len(response_ids),
        truncated=truncated,
    )
