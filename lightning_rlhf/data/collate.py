"""Batch assembly: right padding for training batches, left padding for generation prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_right(rows: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    """Stack ragged int rows into a [B, T] tensor padded on the right with ``pad_value``."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_left(rows: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    """Stack ragged int rows into a [B, T] tensor padded on the **left**, so every row ends at column T-1.

    Generation appends new tokens after the last column, so prompts must be flush right.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


class SFTCollator:
    """Collate ``{"input_ids", "response_mask"}`` rows into padded ids, attention mask and response mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        input_ids = pad_right([r["input_ids"] for r in rows], self.pad_token_id)
        attention_mask = pad_right([[1] * len(r["input_ids"]) for r in rows], 0)
        response_mask = pad_right([r["response_mask"] for r in rows], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


class PreferenceCollator:
    """Collate pairs ``{"prompt_ids", "chosen_ids", "rejected_ids", "margin", "index"}`` into one batch.

    For B pairs the batch holds 2B right-padded sequences, chosen first::

        input_ids       [2B, T] long   rows 0..B-1 = prompt + chosen, rows B..2B-1 = prompt + rejected
        attention_mask  [2B, T] long   1 on real tokens
        response_mask   [2B, T] long   1 on response tokens (EOS included), 0 on prompt and padding
        margin          [B]     float  per-pair margin (0 when the data has none)
        index           [B]     long   position of the pair in its encoded split

    One forward pass over the stacked batch serves both halves; ``logps[:B]`` / ``logps[B:]`` split them.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                seqs.append(r["prompt_ids"] + r[key])
                masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[key]))
        return {
            "input_ids": pad_right(seqs, self.pad_token_id),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
            "response_mask": pad_right(masks, 0),
            "margin": torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        }


class PromptCollator:
    """Collate ``{"prompt", "input_ids", "index"[, "columns"]}`` rows into left-padded generation inputs.

    Returns ``prompt`` (list of B strings), ``input_ids`` / ``attention_mask`` [B, T] left-padded,
    ``index`` [B] and ``columns``: each extra dataset column as a list of B Python objects (not tensors:
    test-case lists and nested JSON have no fixed shape, and only reward functions read them).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict:
        return {
            "prompt": [r["prompt"] for r in rows],
            "input_ids": pad_left([r["input_ids"] for r in rows], self.pad_token_id),
            "attention_mask": pad_left([[1] * len(r["input_ids"]) for r in rows], 0),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
            "columns": {name: [r["columns"][name] for r in rows] for name in rows[0].get("columns", {})},
        }
