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
        """The tensors the PPO update needs, for the rows in ``index``, without all-padding columns.

        Prompt columns that are padding in every selected row (left) and response columns after every
        selected response has ended (right) are dropped: the forward then costs what the rows need, not what
        the longest prompt and response of the whole rollout need. The prompt width of the result is
        ``input_ids.shape[1] - response_mask.shape[1]``.
        """
        input_ids, attention_mask, width = select_rows(
            self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, index
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": self.response_mask[index, :width],
            "logprobs": self.logprobs[index, :width],
            "ref_logprobs": self.ref_logprobs[index, :width],
            "values": self.values[index, :width],
            "advantages": self.advantages[index, :width],
            "returns": self.returns[index, :width],
        }


def select_rows(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor, index: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Rows ``index`` of left-padded prompts + right-padded responses as one sequence, trimmed of padding.

    Returns ``(input_ids, attention_mask, response_width)``: leading columns that are prompt padding in every
    selected row and trailing response columns masked in every selected row are cut (at least one response
    column stays). Position ids come from the mask, so the cut changes no position and no attended token.
    """
    prompt_mask, response_mask = prompt_mask[index], response_mask[index]
    real_prompt = prompt_mask.any(0).nonzero()
    first = int(real_prompt[0]) if len(real_prompt) else prompt_mask.shape[1]
    real_response = response_mask.any(0).nonzero()
    width = max(1, int(real_response[-1]) + 1 if len(real_response) else 0)
    input_ids = torch.cat([prompt_ids[index, first:], response_ids[index, :width]], dim=1)
    attention_mask = torch.cat([prompt_mask[:, first:], response_mask[:, :width]], dim=1)
    return input_ids, attention_mask, width


def length_order(prompt_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Row indices sorted by real length (prompt + response tokens), so neighbours pad little (stable)."""
    return (prompt_mask.sum(1) + response_mask.sum(1)).argsort(stable=True)
