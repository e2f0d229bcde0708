"""Tiny Llama-architecture models built from a config (no download), as a policy or as a reward model."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# hidden, layers, heads, intermediate. "tiny" is ~1M parameters with the testbed's 512-token vocabulary;
# "0.5b" has the shape of a 0.5B Llama (for GPU checks; weights are random).
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "nano": (64, 2, 4, 128),  # head_dim 16, which vLLM's CPU attention refuses ("tiny"'s 32 works)
    "tiny": (128, 4, 4, 384),
    "small": (256, 6, 8, 768),
    "0.5b": (1280, 24, 20, 3584),  # 0.49B parameters outside the (testbed-sized) embeddings
}


def llama_config(size: str, tokenizer: PreTrainedTokenizerBase, *, max_positions: int = 256) -> LlamaConfig:
    """A Llama config of a named size whose vocabulary and special ids match ``tokenizer``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad and an eos token to build a testbed model")
    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_causal_lm(size: str, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM (seeded), in eval mode so that no dropout surprises a caller."""
    config = llama_config(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_reward_model(size: str, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0) -> PreTrainedModel:
    """The same backbone with a scalar head (``AutoModelForSequenceClassification`` with one label)."""
    config = llama_config(size, tokenizer)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
