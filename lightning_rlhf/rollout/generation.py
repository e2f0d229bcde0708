"""Sampling responses from a causal LM for a list of prompt texts (evaluation, PPO rollouts, DPO-Iter)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 16
    """Longest response in tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1 (got {self.top_k}, {self.top_p})")


@dataclass(frozen=True)
class Generated:
    """Decoded responses and whether each ended with EOS (rather than hitting max_new_tokens)."""

    texts: list[str]
    ended: list[bool]
    lengths: list[int]


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 64,
    seed: int | None = None,
) -> Generated:
    """Sample one response per prompt with the model's KV cache; prompts are left-padded for batching.

    ``seed`` makes sampling reproducible without touching the caller's global RNG state.
    """
    sampling = sampling or SamplingConfig()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    was_training = model.training
    model.eval()  # dropout off: sampling must come from the policy itself
    texts, ended, lengths = [], [], []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = [
                tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device
            )
            greedy = sampling.temperature == 0
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_k=None if greedy else sampling.top_k,
                top_p=None if greedy else sampling.top_p,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in out[:, width:].tolist():
                n = row.index(eos) if eos in row else len(row)
                ended.append(n < len(row))
                lengths.append(n)
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    model.train(was_training)
    return Generated(texts=texts, ended=ended, lengths=lengths)
