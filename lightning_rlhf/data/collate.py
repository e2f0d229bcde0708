"""Batch assembly: right padding, attention and response masks."""

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


class SFTCollator:
    """Collate ``{"input_ids", "response_mask"}`` rows into padded ids, attention mask and response mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, Tensor]:
        input_ids = pad_right([r["input_ids"] for r in rows], self.pad_token_id)
        attention_mask = pad_right([[1] * len(r["input_ids"]) for r in rows], 0)
        response_mask = pad_right([r["response_mask"] for r in rows], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
