"""The rollout: one batch of prompts, the policy's responses, and everything PPO computes about them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Tensors are [N, R] over response positions unless noted (N sequences, P prompt and R response columns).

    Token ``t`` of a response is predicted from position ``P + t - 1`` of the full sequence, so
    ``logprobs[:, t]``, ``ref_logprobs[:, t]`` and ``values[:, t]`` all describe the state *before* token t.
    Callbacks may change any field in ``on_rollout_end`` (e.g. whiten ``advantages``) before the update.
    """

    prompt_ids: Tensor
    """[N, P] left-padded prompt tokens."""
    prompt_mask: Tensor
    """[N, P] 1 on real prompt tokens."""
    response_ids: Tensor
    """[N, R] sampled tokens, right-padded after EOS."""
    response_mask: Tensor
    """[N, R] 1 on response tokens up to and including EOS."""
    logprobs: Tensor
    """[N, R] log-probs of the sampled tokens under the policy that sampled them."""
    ref_logprobs: Tensor
    """[N, R] log-probs under the reference model."""
    values: Tensor
    """[N, R] critic values."""
    scores: Tensor
    """[N] the score added at the last response token (after clipping, normalization and EOS penalty)."""
    raw_scores: Tensor
    """[N] reward model + reward function output before any shaping."""
    ended: Tensor
    """[N] bool: the response emitted EOS."""
    kl: Tensor
    """[N, R] per-token KL estimate between policy and reference."""
    rewards: Tensor
    """[N, R] shaped per-token rewards: -kl_coef * kl, plus the score on the last response token."""
    advantages: Tensor
    """[N, R] GAE advantages (raw unless a callback such as AdvantageNormalization changes them)."""
    returns: Tensor
    """[N, R] value targets: advantages + values, computed before any advantage normalization."""
    prompts: list[str] = field(default_factory=list)
    """Prompt texts."""
    responses: list[str] = field(default_factory=list)
    """Decoded responses."""
    rm_scores: Tensor | None = None
    """[N] the reward model's part of ``raw_scores`` (None without a reward model)."""
    function_scores: Tensor | None = None
    """[N] the reward function's part of ``raw_scores`` (None without a reward function)."""
    gold_scores: Tensor | None = None
    """[N] scores of a gold function given for monitoring only (never trained on)."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def minibatch(self, index: Tensor) -> dict[str, Tensor]:
        """The tensors the PPO update needs, for the rows in ``index``."""
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "response_mask": self.response_mask[index],
            "logprobs": self.logprobs[index],
            "values": self.values[index],
            "advantages": self.advantages[index],
            "returns": self.returns[index],
        }
