"""Scoring (prompt, response) texts with a reward model, exactly as it saw pairs in training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.data.base import pad_id
from lightning_rlhf.data.collate import pad_right
from lightning_rlhf.data.tokenize import encode_prompt_response, prompt_token_ids
from lightning_rlhf.models import sequence_scores


@torch.no_grad()
def score_texts(
    reward_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 64,
) -> Tensor:
    """Reward of each response to its prompt, [N] float32 (EOS appended, as in reward-model training).

    A response that is empty after truncation gets the score of prompt + EOS, so every row gets a number.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"need as many responses as prompts (got {len(responses)} and {len(prompts)})")
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        encoded = encode_prompt_response(tokenizer, prompt, response, max_length=max_length)
        if encoded is None:
            prompt_ids = prompt_token_ids(tokenizer, prompt)[-(max_length - 1) :]
            rows.append([*prompt_ids, tokenizer.eos_token_id])
        else:
            rows.append(encoded.input_ids)
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        input_ids = pad_right(chunk, pad_id(tokenizer)).to(device)
        attention_mask = pad_right([[1] * len(r) for r in chunk], 0).to(device)
        scores.append(sequence_scores(reward_model, input_ids, attention_mask))
    reward_model.train(was_training)
    return torch.cat(scores).cpu()
