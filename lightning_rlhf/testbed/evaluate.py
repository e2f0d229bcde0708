"""Score a policy on the testbed with the gold reward."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
from lightning_rlhf.testbed.task import WordTask, mean_gold_reward


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: WordTask,
    prompts: Sequence[str],
    *,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean gold reward, EOS rate and mean response length of the policy's samples on ``prompts``."""
    out = generate_texts(model, tokenizer, prompts, sampling or SamplingConfig(), seed=seed)
    return {
        "gold_reward": mean_gold_reward(task, prompts, out.texts),
        "eos_rate": sum(out.ended) / len(out.ended),
        "response_tokens": sum(out.lengths) / len(out.lengths),
    }
