"""Preference pairs from sampled responses (DPO-Iter): pick best and worst per prompt, lay them out as a
[chosen; rejected] batch. Pure functions, tested without a Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SelectedPairs:
    """One pair per prompt. Samples are prompt-major: sample j of prompt i is row i * k + j."""

    chosen: Tensor
    """[N] long: row of each prompt's best-scored sample (the first of equal ones)."""
    rejected: Tensor
    """[N] long: row of each prompt's worst-scored sample (the first of equal ones)."""
    valid: Tensor
    """[N] bool: best > worst. A prompt whose samples all tie has no preference to learn: it is skipped."""
    best: Tensor
    """[N] the best score of each prompt's samples."""
    worst: Tensor
    """[N] the worst score of each prompt's samples."""

    @property
    def ties(self) -> int:
        """Prompts skipped because all their samples scored the same."""
        return int((~self.valid).sum())


@dataclass(frozen=True)
class Samples:
    """``k`` sampled responses per prompt, prompt-major ([M] = [N * k] rows), as generation returns them."""

    prompt_ids: Tensor
    """[M, P] left-padded prompt tokens (each prompt repeated k times)."""
    prompt_mask: Tensor
    """[M, P] 1 on real prompt tokens."""
    response_ids: Tensor
    """[M, R] sampled tokens, right-padded after EOS."""
    response_mask: Tensor
    """[M, R] 1 on response tokens up to and including EOS (all of them when no EOS was emitted)."""
    scores: Tensor
    """[M] float: reward model + reward function - missing-EOS penalty: what the pairs are chosen by."""
    ended: Tensor
    """[M] bool: the response emitted EOS."""
    gold: Tensor | None = None
    """[M] gold_function scores (monitoring only)."""


def select_pairs(scores: Tensor, num_samples: int) -> SelectedPairs:
    """Per prompt, chosen = the best-scored sample and rejected = the worst; ``valid`` is False on ties.

    ``scores`` is [N * num_samples], prompt-major. Among equal scores the first sample wins (``max``/``min``
    return the first index), so the selection is deterministic.
    """
    if scores.ndim != 1 or scores.numel() % num_samples:
        raise ValueError(
            f"need [N * num_samples] scores (num_samples={num_samples}, got {tuple(scores.shape)})"
        )
    grouped = scores.view(-1, num_samples)
    best, best_j = grouped.max(1)
    worst, worst_j = grouped.min(1)
    first = torch.arange(grouped.shape[0], device=scores.device) * num_samples
    return SelectedPairs(first + best_j, first + worst_j, best > worst, best, worst)


def build_pair_batch(
    samples: Samples, pairs: SelectedPairs, *, pad_token_id: int, index: Tensor
) -> dict[str, Tensor]:
    """The pairs as a :class:`~lightning_rlhf.data.collate.PreferenceCollator` batch: [chosen; rejected].

    Each selected sample (left-padded prompt + right-padded response) is re-packed flush left, a stable
    sort of its real tokens to the front, so the batch is exactly what the collator makes from the same
    token ids: ``input_ids``/``attention_mask``/``response_mask`` [2N, T] right-padded (the response mask
    includes EOS where one was emitted), ``margin`` [N] zeros, ``index`` [N] the prompts' dataset indices,
    plus ``valid`` [N]: tied prompts stay in the batch, with no weight in the loss, so that every
    data-parallel rank runs the same number of forward/backward passes whatever its ties.
    """
    rows = torch.cat([pairs.chosen, pairs.rejected])
    ids = torch.cat([samples.prompt_ids, samples.response_ids], 1)[rows]
    attention = torch.cat([samples.prompt_mask, samples.response_mask], 1)[rows].long()
    is_response = torch.cat([torch.zeros_like(samples.prompt_mask), samples.response_mask], 1)[rows].long()
    order = torch.argsort(1 - attention, dim=1, stable=True)  # real tokens first, in their order
    attention = attention.gather(1, order)
    width = int(attention.sum(1).max())
    attention = attention[:, :width]
    return {
        "input_ids": ids.gather(1, order)[:, :width].masked_fill(attention == 0, pad_token_id),
        "attention_mask": attention,
        "response_mask": is_response.gather(1, order)[:, :width] * attention,
        "margin": torch.zeros(pairs.valid.numel(), device=ids.device),
        "index": index,
        "valid": pairs.valid,
    }


def take_pairs(batch: dict[str, Tensor], pair_index: Tensor) -> dict[str, Tensor]:
    """The pairs ``pair_index`` of a [chosen; rejected] batch, still [chosen; rejected], trailing pads cut."""
    n = batch["input_ids"].shape[0] // 2
    rows = torch.cat([pair_index, pair_index + n])
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {key: batch[key][rows, :width] for key in ("input_ids", "attention_mask", "response_mask")}
