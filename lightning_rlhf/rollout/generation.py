"""Sampling responses from a causal LM for a list of prompt texts (evaluation, PPO rollouts, DPO-Iter)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.data.tokenize import prompt_token_ids
from lightning_rlhf.lora import unwrap


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
    generation_engine: Literal["hf", "vllm"] = "hf"
    """Who samples: Hugging Face ``generate`` on the policy itself, or a colocated vLLM engine that follows
    the policy's weights (:class:`~lightning_rlhf.rollout.vllm_engine.VLLMEngine`)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1 (got {self.top_k}, {self.top_p})")
        if self.generation_engine not in ("hf", "vllm"):
            raise ValueError(f"generation_engine must be 'hf' or 'vllm' (got {self.generation_engine!r})")


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int) -> Tensor:
    """[N, R] 1 on every token up to and including the first EOS (all ones where no EOS was emitted)."""
    is_eos = (response_ids == eos_token_id).long()
    # Tokens strictly after the first EOS have a cumulative EOS count > 1, or > 0 at a non-EOS token.
    before_or_at_first_eos = (is_eos.cumsum(1) - is_eos) == 0
    return before_or_at_first_eos.long()


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample responses to left-padded prompts with the KV cache: (response_ids, response_mask), [N, R].

    Generation stops at EOS (or ``max_new_tokens``); tokens after a row's EOS are padding and masked out.
    The model is put in eval mode for the call and restored after. ``synced_gpus`` keeps every rank
    decoding until all are done, which ZeRO-3 partitioned weights need (each forward is a collective).
    """
    was_training = model.training
    model.eval()  # dropout off: samples must come from the policy itself
    greedy = sampling.temperature == 0
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_k=None if greedy else sampling.top_k,
        top_p=None if greedy else sampling.top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        synced_gpus=synced_gpus,
    )
    model.train(was_training)
    response_ids = out[:, prompt_ids.shape[1] :]
    mask = response_mask_from_ids(response_ids, eos_token_id)
    return response_ids.masked_fill(mask == 0, pad_token_id), mask


class SampledLogprobs:
    """Log-probs of the tokens ``generate`` samples, read from the logits it sampled them from.

    Used as a context manager around :func:`generate_responses`: a forward hook on the model keeps the
    log-softmax (at ``temperature``, before top-k/top-p truncation, as a full forward would give) of the
    newest decoding step, and at the next step, whose input is the token just drawn, gathers that token's
    log-prob. :meth:`finish` adds the last token's. One [B, V] tensor is held at a time, never the logits of
    every step. The values equal a full forward's up to the float noise of KV-cache decoding (about 1e-6 in
    float32, about 1e-3 in bfloat16).
    """

    def __init__(self, model: PreTrainedModel, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"sampled log-probs need a temperature > 0 (got {temperature})")
        self.model = unwrap(model)  # generate runs the transformers model's forward, inside any PEFT wrapper
        self.temperature = temperature
        self._steps: list[Tensor] = []
        self._latest: Tensor | None = None
        self._handle = None

    def __enter__(self) -> SampledLogprobs:
        self._steps, self._latest = [], None
        self._handle = self.model.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _record(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._latest is not None:
            self._steps.append(self._latest.gather(1, input_ids[:, -1:]).squeeze(1))
        logits = output.logits[:, -1].float()
        self._latest = torch.log_softmax(logits / self.temperature, dim=-1)

    def finish(self, response_ids: Tensor) -> Tensor:
        """[N, R] log-probs of ``response_ids`` (the tokens sampled inside the context)."""
        steps = len(self._steps)
        if self._latest is None or steps + 1 != response_ids.shape[1]:
            raise RuntimeError(
                f"recorded {steps + (self._latest is not None)} decoding steps for {response_ids.shape[1]} "
                "response tokens: the log-probs can only be read from one plain generate call"
            )
        last = self._latest.gather(1, response_ids[:, steps:]).squeeze(1)
        return torch.stack([*self._steps, last], dim=1)


@dataclass(frozen=True)
class Generated:
    """Decoded responses and whether each ended with EOS (rather than hitting max_new_tokens)."""

    texts: list[str]
    ended: list[bool]
    lengths: list[int]


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: Tensor, response_mask: Tensor
) -> Generated:
    """Texts without special tokens, EOS flags, and lengths (tokens before EOS)."""
    eos = tokenizer.eos_token_id
    texts, ended, lengths = [], [], []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist(), strict=True):
        n = sum(mask)
        stopped = n > 0 and ids[n - 1] == eos
        content = ids[: n - 1] if stopped else ids[:n]
        texts.append(tokenizer.decode(content, skip_special_tokens=True))
        ended.append(stopped)
        lengths.append(len(content))
    return Generated(texts=texts, ended=ended, lengths=lengths)


def left_pad_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Tokenize prompt texts (no special tokens) into left-padded ids and mask."""
    rows = [prompt_token_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampling: SamplingConfig | None = None,
    *,
    batch_size: int = 64,
    seed: int | None = None,
    progress: str | None = None,
) -> Generated:
    """One sampled response per prompt text; ``seed`` makes it reproducible, leaving global RNG alone.

    ``progress`` (a label) shows a progress bar over the prompts on the terminal.
    """
    sampling = sampling or SamplingConfig()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts, ended, lengths = [], [], []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None)
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad_prompts(tokenizer, prompts[start : start + batch_size], device)
            response_ids, response_mask = generate_responses(
                model, ids, mask, sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
            )
            out = decode_responses(tokenizer, response_ids, response_mask)
            texts += out.texts
            ended += out.ended
            lengths += out.lengths
            bar.update(len(out.texts))
        bar.close()
    return Generated(texts=texts, ended=ended, lengths=lengths)
