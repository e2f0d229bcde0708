"""Collecting a PPO rollout: generate, score, compute old log-probs, reference log-probs and values, GAE.

Everything here is plain tensor work on plain models, testable without a Trainer; ``PPOModule`` calls
:func:`collect_rollout` once per training step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.models import response_token_logprobs, response_values, sequence_scores
from lightning_rlhf.ops import masked_var
from lightning_rlhf.rewards.calling import RewardFunction, call_reward_function
from lightning_rlhf.rollout.advantages import GAE, AdvantageEstimator
from lightning_rlhf.rollout.generation import (
    SampledLogprobs,
    SamplingConfig,
    decode_responses,
    generate_responses,
)
from lightning_rlhf.rollout.shaping import RunningMoments, kl_penalized_rewards, shape_scores
from lightning_rlhf.rollout.types import Rollout, length_order, select_rows

if TYPE_CHECKING:  # vllm is optional: the engine module imports it only when an engine is built
    from lightning_rlhf.rollout.vllm_engine import VLLMEngine


@dataclass(frozen=True)
class ShapingConfig:
    """How scores become per-token rewards and advantages."""

    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = None
    score_clip: float | None = None
    normalize_scores: bool = False
    gamma: float = 1.0
    lam: float = 0.95


@dataclass(frozen=True)
class RewardSources:
    """What scores a sampled response: a reward model (prompt + response, read at the last token) and/or a
    reward function, summed; a gold function is only computed and logged, never trained on."""

    reward_model: PreTrainedModel | None = None
    reward_function: RewardFunction | None = None
    gold_function: RewardFunction | None = None


@dataclass(frozen=True)
class Placement:
    """Where sampling and the no-grad forwards run, and in what chunks."""

    micro_batch_size: int = 8
    """Sequences per no-grad scoring / inference forward (rows of similar length together)."""
    generation_batch_size: int = 64
    """Prompts per HF ``generate`` call."""
    generation_context: Callable[[], AbstractContextManager] = nullcontext
    """Entered around all generate calls (under ZeRO-3: the policy's whole weights)."""
    synced_gpus: bool = False
    """Passed to ``generate`` (ZeRO-3 with partitioned weights: ranks decode in step)."""
    engine: VLLMEngine | None = None
    """The vLLM engine when ``sampling.generation_engine == "vllm"`` (weights synced to the policy)."""
    seed: int = 0
    """The vLLM engine's seed for this rollout."""


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def length_chunks(prompt_mask: Tensor, response_mask: Tensor, size: int) -> list[Tensor]:
    """Row indices in groups of ``size`` rows of similar length (for no-grad forwards cut to each group)."""
    order = length_order(prompt_mask, response_mask)
    return [order[i : i + size] for i in range(0, len(order), size)]


@dataclass
class ScoredSamples:
    """Responses sampled for a prompt batch, and their scores (before any PPO shaping)."""

    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor | None
    """[N, R] the sampled tokens' log-probs from the sampling logits (None unless asked for)."""
    texts: list[str]
    ended: Tensor
    raw_scores: Tensor
    rm_scores: Tensor | None
    function_scores: Tensor | None
    gold_scores: Tensor | None


def _hf_samples(
    policy: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    *,
    eos: int,
    pad: int,
    generation_batch_size: int,
    generation_context: Callable[[], AbstractContextManager],
    synced_gpus: bool,
    sampled_logprobs: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """HF ``generate`` on the policy, ``generation_batch_size`` prompts a call, padded to one width."""
    n = prompt_ids.shape[0]
    pieces = []
    with generation_context():
        for s in _chunks(n, generation_batch_size):
            recorder = SampledLogprobs(policy, sampling.temperature) if sampled_logprobs else None
            with recorder or nullcontext():
                ids, mask = generate_responses(
                    policy,
                    prompt_ids[s],
                    prompt_mask[s],
                    sampling,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    synced_gpus=synced_gpus,
                )
            pieces.append((ids, mask, recorder.finish(ids) if recorder else None))
    width = max(ids.shape[1] for ids, _, _ in pieces)
    response_ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=pad) for ids, _, _ in pieces])
    response_mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=0) for _, m, _ in pieces])
    logprobs = None
    if sampled_logprobs:
        logprobs = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for _, _, lp in pieces]) * response_mask
    return response_ids, response_mask, logprobs


def _engine_samples(
    engine: VLLMEngine | None,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    eos: int,
    pad: int,
    seed: int,
    sampled_logprobs: bool,
    synced_gpus: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The vLLM engine on the unpadded prompts, all in one call (vLLM batches them itself)."""
    if engine is None:
        raise ValueError("sampling.generation_engine='vllm' needs an engine: pass engine=VLLMEngine(...)")
    if synced_gpus:
        raise ValueError("generation_engine='vllm' cannot run synced (ZeRO-3 partitioned) generation")
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    ids, mask, logprobs = engine.generate(
        rows, sampling, eos_token_id=eos, pad_token_id=pad, seed=seed, logprobs=sampled_logprobs
    )
    device = prompt_ids.device
    return ids.to(device), mask.to(device), None if logprobs is None else logprobs.to(device)


@torch.no_grad()
def sample_and_score(
    *,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompts: list[str],
    sampling: SamplingConfig,
    rewards: RewardSources,
    placement: Placement | None = None,
    columns: Mapping[str, list] | None = None,
    timings: dict[str, float] | None = None,
    sampled_logprobs: bool = False,
) -> ScoredSamples:
    """Sample one response per (left-padded) prompt and score it: reward model + reward function.

    Generation runs ``placement.generation_batch_size`` prompts at a time, scoring
    ``placement.micro_batch_size`` sequences of similar length at a time, each cut to its own longest
    prompt and response. ``sampled_logprobs`` also returns the sampled tokens' log-probs, read from the
    logits they were drawn from (:class:`~lightning_rlhf.rollout.generation.SampledLogprobs`).
    With ``sampling.generation_engine == "vllm"`` the ``placement.engine`` samples instead (all prompts in
    one call, seeded by ``placement.seed``; its weights must have been synced to ``policy``'s) and returns
    the same tensors.

    ``columns`` (the prompts' other dataset columns, one value per prompt) go to the reward and gold
    functions that name them (:func:`~lightning_rlhf.rewards.calling.call_reward_function`).
    ``timings`` (if given) receives the seconds spent in ``generation`` and ``scoring``.
    """
    placement = placement or Placement()
    reward_model, reward_function, gold_function = (
        rewards.reward_model,
        rewards.reward_function,
        rewards.gold_function,
    )
    micro_batch_size = placement.micro_batch_size
    synced_gpus = placement.synced_gpus
    if reward_model is None and reward_function is None:
        raise ValueError("PPO needs a reward: give a reward_model, a reward_function, or both")
    timings = timings if timings is not None else {}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    n = prompt_ids.shape[0]

    if sampled_logprobs and synced_gpus:
        raise ValueError("sampled log-probs cannot be read from synced (ZeRO-3 partitioned) generation")
    start = time.perf_counter()
    if sampling.generation_engine == "vllm":
        response_ids, response_mask, logprobs = _engine_samples(
            placement.engine,
            prompt_ids,
            prompt_mask,
            sampling,
            eos,
            pad,
            placement.seed,
            sampled_logprobs,
            synced_gpus,
        )
    else:
        response_ids, response_mask, logprobs = _hf_samples(
            policy,
            prompt_ids,
            prompt_mask,
            sampling,
            eos=eos,
            pad=pad,
            generation_batch_size=placement.generation_batch_size,
            generation_context=placement.generation_context,
            synced_gpus=synced_gpus,
            sampled_logprobs=sampled_logprobs,
        )
    timings["generation"] = time.perf_counter() - start

    start = time.perf_counter()
    decoded = decode_responses(tokenizer, response_ids, response_mask)
    raw = torch.zeros(n, device=prompt_ids.device)
    rm_scores = function_scores = gold = None
    if reward_model is not None:
        rm_scores = torch.zeros(n, device=prompt_ids.device)
        for rows in length_chunks(prompt_mask, response_mask, micro_batch_size):
            input_ids, attention_mask, _ = select_rows(
                prompt_ids, prompt_mask, response_ids, response_mask, rows
            )
            rm_scores[rows] = sequence_scores(reward_model, input_ids, attention_mask)
        raw += rm_scores
    if reward_function is not None:
        function_scores = call_reward_function(
            reward_function, prompts, decoded.texts, columns, "reward_function"
        )
        raw += function_scores.to(raw.device)
    if gold_function is not None:
        gold = call_reward_function(gold_function, prompts, decoded.texts, columns, "gold_function")
    timings["scoring"] = time.perf_counter() - start
    return ScoredSamples(
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs,
        texts=decoded.texts,
        ended=torch.tensor(decoded.ended, device=prompt_ids.device),
        raw_scores=raw,
        rm_scores=rm_scores,
        function_scores=function_scores,
        gold_scores=gold,
    )


@torch.no_grad()
def collect_rollout(
    *,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    critic: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompts: list[str],
    sampling: SamplingConfig,
    rewards: RewardSources,
    kl_coef: float,
    shaping: ShapingConfig,
    placement: Placement | None = None,
    advantage: AdvantageEstimator | None = None,
    group_size: int = 1,
    columns: Mapping[str, list] | None = None,
    moments: RunningMoments | None = None,
    timings: dict[str, float] | None = None,
    old_logprobs: str = "forward",
    value_moments: RunningMoments | None = None,
) -> Rollout:
    """Sample responses to the prompts and compute everything the PPO update needs.

    Inference runs in micro-batches of ``placement.micro_batch_size`` sequences, each model once per
    rollout. The old log-probs come from a policy ``forward`` like the update's, or (``"sampling"``) from
    the logits the tokens were sampled from, which saves that forward. Sampling, ``rewards`` and
    ``placement``: see :func:`sample_and_score`. ``timings`` (if given) receives seconds spent in
    ``generation``, ``scoring`` and ``inference``.
    ``advantage`` (default :class:`GAE`, which needs the ``critic``) turns the token rewards into advantages;
    the critic-free ones read ``group_size`` consecutive rows as the responses to one prompt, and with
    ``critic=None`` the values are zeros.
    ``value_moments`` (value normalization): the critic predicts returns standardised by these running
    moments, so its outputs are de-standardised (with the moments before this rollout) before GAE, and the
    rollout's returns are then folded into the moments. ``Rollout.values`` and ``returns`` stay in reward
    units either way.
    """
    placement = placement or Placement()
    micro_batch_size = placement.micro_batch_size
    advantage = advantage if advantage is not None else GAE()
    if advantage.needs_critic and critic is None:
        raise ValueError(f"advantage {advantage!r} needs a critic (value model); got critic=None")
    if old_logprobs not in ("forward", "sampling"):
        raise ValueError(f"old_logprobs must be 'forward' or 'sampling' (got {old_logprobs!r})")
    timings = timings if timings is not None else {}
    samples = sample_and_score(
        policy=policy,
        tokenizer=tokenizer,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompts=prompts,
        sampling=sampling,
        rewards=rewards,
        placement=placement,
        columns=columns,
        timings=timings,
        sampled_logprobs=old_logprobs == "sampling",
    )
    response_ids, response_mask, ended, raw = (
        samples.response_ids,
        samples.response_mask,
        samples.ended,
        samples.raw_scores,
    )

    start = time.perf_counter()
    recompute = samples.logprobs is None
    ref_logprobs, values = (torch.zeros(response_ids.shape, device=response_ids.device) for _ in range(2))
    logprobs = torch.zeros_like(ref_logprobs) if recompute else samples.logprobs
    modes = {model: model.training for model in (policy, critic) if model is not None}
    for model in modes:
        model.eval()  # the old log-probs describe the distribution that sampled (no dropout)
    # Rows of similar length together, each group cut to its own longest prompt and response; columns past
    # a group's responses stay 0 (masked out below).
    for rows in length_chunks(prompt_mask, response_mask, micro_batch_size):
        input_ids, attention_mask, width = select_rows(
            prompt_ids, prompt_mask, response_ids, response_mask, rows
        )
        args = (input_ids, attention_mask, input_ids.shape[1] - width)
        # Both at the sampling temperature: the ratio and the KL then compare the distribution sampled from.
        temperature = sampling.temperature
        if recompute:
            logprobs[rows, :width] = response_token_logprobs(policy, *args, temperature=temperature)[0]
        ref_logprobs[rows, :width] = response_token_logprobs(reference, *args, temperature=temperature)[0]
        if critic is not None:
            values[rows, :width] = response_values(critic, *args)
    for model, training in modes.items():
        model.train(training)
    timings["inference"] = time.perf_counter() - start

    scores = shape_scores(
        raw,
        ended,
        missing_eos_penalty=shaping.missing_eos_penalty,
        clip=shaping.score_clip,
        moments=moments if shaping.normalize_scores else None,
    )
    mask = response_mask.float()
    rewards, kl = kl_penalized_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=shaping.kl_estimator
    )
    if value_moments is not None and critic is not None:
        mean, std = value_moments.value_scale()
        values = values * std + mean
    values = values * mask
    advantages, returns = advantage(
        rewards=rewards,
        values=values if critic is not None else None,
        mask=mask,
        scores=scores,
        group_size=group_size,
        gamma=shaping.gamma,
        lam=shaping.lam,
    )
    if value_moments is not None and critic is not None:
        value_moments.update(returns[mask > 0])
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs * mask,
        ref_logprobs=ref_logprobs * mask,
        values=values,
        scores=scores,
        raw_scores=raw,
        ended=ended,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        prompts=list(prompts),
        responses=samples.texts,
        rm_scores=samples.rm_scores,
        function_scores=samples.function_scores,
        gold_scores=samples.gold_scores,
    )


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the mask: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = float(masked_var(returns.double(), mask))
    if var_returns == 0 or math.isnan(var_returns):
        return 0.0
    return 1.0 - float(masked_var((returns - values).double(), mask)) / var_returns
