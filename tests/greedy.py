"""Greedy continuations two ways, to check that a vLLM engine samples what the policy it serves would.

``hf_greedy``: HF generate on the policy, and the response tokens' log-probs (temperature 1) from a full
training forward; ``engine_greedy``: the engine's greedy tokens with its own log-probs. Both return
``(response_ids, response_mask, logprobs * response_mask)`` of the same width, so they compare as they are.
"""

import torch

from lightning_rlhf.models import response_token_logprobs
from lightning_rlhf.rollout.generation import SamplingConfig, generate_responses, left_pad_prompts
from lightning_rlhf.rollout.types import select_rows


def greedy(max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)


def hf_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int):
    """The policy's own greedy continuations (call it inside ``whole_model_for_generation`` under ZeRO-3)."""
    ids, mask = left_pad_prompts(tokenizer, prompts, torch.device("cpu"))
    with torch.no_grad():
        response_ids, response_mask = generate_responses(
            model,
            ids,
            mask,
            greedy(max_new_tokens),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        input_ids, attention_mask, width = select_rows(
            ids, mask, response_ids, response_mask, torch.arange(len(prompts))
        )
        logprobs = response_token_logprobs(model, input_ids, attention_mask, input_ids.shape[1] - width)[0]
    response_mask = response_mask[:, :width]
    return response_ids[:, :width], response_mask, logprobs * response_mask


def engine_greedy(engine, tokenizer, prompts: list[str], max_new_tokens: int):
    """The engine's greedy continuations of the same prompts (same tokenization: no special tokens)."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return engine.generate(
        rows,
        greedy(max_new_tokens),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
        logprobs=True,
    )
