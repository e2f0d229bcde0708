"""Score a policy on the testbed with the gold reward (and, to expose reward hacking, a learned one)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
from lightning_rlhf.rollout.scoring import score_texts
from lightning_rlhf.testbed.task import WordTask, mean_gold_reward


def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: WordTask,
    prompts: Sequence[str],
    *,
    sampling: SamplingConfig | None = None,
    reward_model: PreTrainedModel | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Mean gold reward, EOS rate and response length of the policy's samples on ``prompts``.

    With ``reward_model``, also ``rm_score``: the learned reward of the same samples. A policy whose
    ``rm_score`` climbs while ``gold_reward`` does not is hacking the reward model.
    """
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    out = generate_texts(model, tokenizer, prompts, sampling or SamplingConfig(), seed=seed)
    result = {
        "gold_reward": mean_gold_reward(task, prompts, out.texts),
        "eos_rate": sum(out.ended) / len(out.ended),
        "response_tokens": sum(out.lengths) / len(out.lengths),
    }
    if reward_model is not None:
        result["rm_score"] = float(score_texts(reward_model, tokenizer, prompts, out.texts).mean())
    return result
