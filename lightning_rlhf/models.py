"""Loading Hugging Face models safely, and the forward passes every module shares.

All forwards pass explicit ``position_ids`` derived from the attention mask, so a left-padded batch (as used
for generation) and a right-padded one (as used for training) give the same numbers for the same tokens.
Scores and values are read at positions chosen from the attention mask, never from ``pad_token_id``: a
tokenizer whose pad token is its EOS token (or that has none) cannot make us pool the wrong position.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from lightning_rlhf.lora import unwrap
from lightning_rlhf.ops import entropy_from_logits, sequence_logprobs, token_logprobs


def _load(auto_class, name_or_path: str, what: str, **kwargs):
    """``auto_class.from_pretrained`` with errors that say what to do instead of a hub traceback."""
    path = Path(name_or_path).expanduser()
    # "runs/x" or "./x" is meant as a folder; a hub id is "org/name" that does not exist locally.
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"{what} folder not found: {name_or_path}. Check the path (testbed folders are written by "
            "`lightning-rlhf testbed --out DIR`; stage outputs by the previous stage's HFExport)"
        )
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load the {what} {name_or_path!r}: it is neither a local save_pretrained folder nor "
            f"reachable on the hub (offline?). Pass a local folder, or pre-download it. ({err})"
        ) from err


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with the same path checks and messages as the model loaders."""
    return _load(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)


# Weights load in float32 whatever dtype they were saved in (transformers 5 keeps the saved dtype by
# default): trained in bf16 without fp32 master weights, small updates round away. Lightning's precision
# plugin (e.g. bf16-mixed) casts for compute; DeepSpeed keeps its own master copy.
LOAD_DTYPE = torch.float32


def load_causal_lm(
    name_or_path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = LOAD_DTYPE
) -> PreTrainedModel:
    """A causal LM from a hub name or a local folder (``trust_remote_code`` stays off unless asked for).

    ``dtype`` other than float32 only for frozen models that are never trained (see LOAD_DTYPE).
    """
    return _load(
        AutoModelForCausalLM, name_or_path, "model", trust_remote_code=trust_remote_code, dtype=dtype
    )


def load_reward_model(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """A scalar-head model: a saved reward model, or a causal-LM backbone given a fresh one-label head."""
    model = _load(
        AutoModelForSequenceClassification,
        name_or_path,
        "reward model",
        num_labels=1,
        trust_remote_code=trust_remote_code,
        dtype=LOAD_DTYPE,
    )
    _score_head(model)  # fail now, with a clear message, if the architecture has no usable head
    return model


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever the padding side (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row ([B]); works for left and right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def policy_logits(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits [B, T, V] of a causal LM."""
    position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def next_token_logprobs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape [B, T-1] (position t-1 holds token t's log-prob)."""
    logits = policy_logits(model, input_ids, attention_mask)
    # Position t predicts token t+1: drop the last logit and the first label.
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


# Config attributes that change logits after the LM head (soft-capping, scaling): models that have one go
# through their own forward, which knows how to apply it.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _head_split(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, lm_head) when logits are exactly ``lm_head(backbone(...).last_hidden_state)``, else None.

    A PEFT model is split inside its wrapper: the adapters live in the backbone's layers, so calling the
    inner backbone still applies them (or not, under ``disable_adapter()``).
    """
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, key, None) not in (None, 1.0) for key in _LOGIT_POSTPROCESSING):
        return None
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear):
        return None
    return backbone, head


HEAD_CHUNK_ELEMENTS = 1 << 22
"""Logits elements the LM head produces at a time when :func:`head_token_logprobs` chunks (16 MiB fp32)."""
HEAD_RECOMPUTE_ELEMENTS = 1 << 26
"""Under autograd, logits larger than this (64M elements: 256 MiB in float32) are chunked and recomputed."""


def head_token_logprobs(
    head: torch.nn.Module,
    hidden: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """log p(labels) [N] from hidden states [N, H] through the LM head (and the entropies [N] if asked).

    ``entropy_grad=False`` computes the entropies without autograd (for logging: no backward through them).

    Memory-aware: without autograd the head runs on chunks of rows (``HEAD_CHUNK_ELEMENTS`` logits at a
    time), so the whole [N, V] logits tensor never exists. Under autograd, logits of more than
    ``HEAD_RECOMPUTE_ELEMENTS`` elements are chunked too and each chunk is checkpointed: its logits are freed
    after the forward and recomputed in the backward, so the head holds one chunk's logits (with their
    softmax and gradient) instead of three [N, V] tensors, for one more forward of the head. With a large
    vocabulary these are the largest activations of a step (8k response tokens x 128k vocabulary: 4 GiB
    per float32 copy); below the threshold the extra forward costs more than the memory is worth (on the
    benchmark model, whose head is a quarter of its FLOPs, it slowed the PPO update by 8%). The head is
    called as a module, so ZeRO-3 gathers its weight and LoRA applies, in the recomputation too.
    """
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    total = hidden.shape[0] * head.out_features  # out_features: under ZeRO-3 the weight is a shard here
    if grad and total <= HEAD_RECOMPUTE_ELEMENTS:
        logps, *entropies = _head_chunk(head, hidden, labels, temperature, entropy, entropy_grad)
        return logps, (entropies[0] if entropy else None)
    rows = max(1, HEAD_CHUNK_ELEMENTS // head.out_features)
    pieces = []
    for start in range(0, max(1, hidden.shape[0]), rows):
        args = (
            head,
            hidden[start : start + rows],
            labels[start : start + rows],
            temperature,
            entropy,
            entropy_grad,
        )
        if grad:
            pieces.append(checkpoint(_head_chunk, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_head_chunk(*args))
    logps = torch.cat([piece[0] for piece in pieces])
    return logps, (torch.cat([piece[1] for piece in pieces]) if entropy else None)


def _head_chunk(
    head: torch.nn.Module,
    hidden: Tensor,
    labels: Tensor,
    temperature: float,
    entropy: bool,
    entropy_grad: bool = True,
) -> tuple[Tensor, ...]:
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    logps = token_logprobs(logits, labels)
    if not entropy:
        return (logps,)
    return logps, entropy_from_logits(logits if entropy_grad else logits.detach())


def selected_token_logprobs(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, select: Tensor
) -> Tensor:
    """log p(token_t | tokens_<t) at the positions ``select`` [B, T-1] marks (position t-1 scores token t).

    Returns [B, T-1], 0 where not selected. The LM head runs on the selected positions only: a DPO batch
    has its prompts and padding outside the response mask, and a [B, T, V] float logits tensor (the largest
    activation of a small-vocabulary-heavy model) is never built. Models whose logits are post-processed
    after the head (soft-capping, scaling) take the plain full forward.
    """
    split = _head_split(model)
    if split is None:
        logps = next_token_logprobs(model, input_ids, attention_mask)
        return logps.masked_fill(select == 0, 0.0)
    backbone, head = split
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state[:, :-1]
    keep = select != 0
    picked, _ = head_token_logprobs(head, hidden[keep], input_ids[:, 1:][keep])  # the N selected positions
    out = torch.zeros(select.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(keep, picked)


def response_logps(
    model: PreTrainedModel, batch: dict[str, Tensor], *, average: bool, shared_prompts: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-sequence response log-probs ([B], summed, or per-token mean if ``average``) and per-token means.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``response_mask`` [B, T]. Only response positions
    go through the LM head (see :func:`selected_token_logprobs`). ``shared_prompts``: the batch is a
    preference batch [chosen; rejected] (rows i and B+i share a prompt), so each prompt can run once (see
    :func:`shared_prompt_response_logps`; other layouts take the plain path).
    """
    if shared_prompts:
        out = shared_prompt_response_logps(model, batch, average=average)
        if out is not None:
            return out
    mask = batch["response_mask"][:, 1:]
    token_logps = selected_token_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
    per_token = sequence_logprobs(token_logps, mask, average=True)
    return (per_token if average else sequence_logprobs(token_logps, mask)), per_token


def _activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (``is_activation_checkpointing`` in transformers >= 5.x)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if flag is not None else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _repeat_cache(cache, times: int) -> None:
    """Stack a KV cache ``times`` over in the batch (rows b, B + b, ... get row b's keys and values).

    ``torch.cat`` rather than the cache's index-based ``batch_select_indices``: the backward of a
    concatenation is a cheap sum of slices, that of advanced indexing a scatter-add.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4.x DynamicCache
        cache.key_cache = [torch.cat([k] * times) for k in cache.key_cache]
        cache.value_cache = [torch.cat([v] * times) for v in cache.value_cache]
        return
    for layer in layers:
        layer.keys = torch.cat([layer.keys] * times)
        layer.values = torch.cat([layer.values] * times)


def _shared_prompt_layout(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(prompt_len, response_len) [2B] if rows i and B+i share their prompt, laid out prompt | response | pad.

    None for any other layout (odd rows, left padding, differing prompts): callers then take the plain path.
    """
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    rows, width = ids.shape
    if rows % 2 or rows == 0:
        return None
    positions = torch.arange(width, device=ids.device)
    response_len = response.sum(1)
    prompt_len = (response != 0).long().argmax(1)
    if bool((response_len == 0).any()) or bool((prompt_len == 0).any()):
        return None
    end = (prompt_len + response_len)[:, None]
    expected_response = (positions >= prompt_len[:, None]) & (positions < end)
    if not (torch.equal(response != 0, expected_response) and torch.equal(attention != 0, positions < end)):
        return None
    half = rows // 2
    if not torch.equal(prompt_len[:half], prompt_len[half:]):
        return None
    in_prompt = positions < prompt_len[:half, None]
    if not torch.equal(torch.where(in_prompt, ids[:half], 0), torch.where(in_prompt, ids[half:], 0)):
        return None
    return prompt_len, response_len


def shared_prompt_response_logps(
    model: PreTrainedModel, batch: dict[str, Tensor], *, average: bool
) -> tuple[Tensor, Tensor] | None:
    """:func:`response_logps` for a preference batch whose chosen row i and rejected row B+i share a prompt,
    running each prompt through the model once instead of twice.

    The B prompts go through the backbone with a KV cache; the cache is duplicated for the 2B responses,
    which attend to it (gradients flow back through the cached keys and values). Same numbers as the
    plain path up to float rounding. Returns None (caller falls back) when the batch is not in that
    layout, the model's logits are post-processed, or activation checkpointing is on (it disables caches).
    """
    split = _head_split(model)
    layout = _shared_prompt_layout(batch)
    checkpointing = _activation_checkpointing(model)
    if split is None or layout is None or checkpointing:
        return None
    backbone, head = split
    ids = batch["input_ids"]
    prompt_len, response_len = layout
    rows = ids.shape[0]
    half = rows // 2
    device = ids.device
    p_max, r_max = int(prompt_len.max()), int(response_len.max())
    prompt_mask = (torch.arange(p_max, device=device) < prompt_len[:half, None]).long()
    prompt = backbone(
        input_ids=ids[:half, :p_max],
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
    )
    cache = getattr(prompt, "cache", None) or prompt.past_key_values
    _repeat_cache(cache, 2)
    steps = torch.arange(r_max, device=device)
    gather_at = (prompt_len[:, None] + steps).clamp(max=ids.shape[1] - 1)
    response_ids = ids.gather(1, gather_at)
    response_mask = steps < response_len[:, None]
    hidden = backbone(
        input_ids=response_ids,
        attention_mask=torch.cat([prompt_mask.repeat(2, 1), response_mask.long()], 1),
        position_ids=prompt_len[:, None] + steps,
        use_cache=True,
        **{_cache_argument(backbone): cache},
    ).last_hidden_state
    # Response token j is predicted by the hidden state before it: the prompt's last one for j = 0.
    last_prompt = prompt.last_hidden_state[torch.arange(half, device=device), prompt_len[:half] - 1]
    last_prompt = last_prompt.repeat(2, 1)
    predictors = torch.cat([last_prompt[:, None], hidden[:, :-1]], 1)
    picked, _ = head_token_logprobs(head, predictors[response_mask], response_ids[response_mask])
    token_logps = torch.zeros(response_mask.shape, dtype=picked.dtype, device=device)
    token_logps = token_logps.masked_scatter(response_mask, picked)
    per_token = sequence_logprobs(token_logps, response_mask, average=True)
    return (per_token if average else sequence_logprobs(token_logps, response_mask)), per_token


def response_token_logprobs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    *,
    entropy: bool = False,
    temperature: float = 1.0,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, R] of the response tokens ``input_ids[:, prompt_len:]`` (and their entropies if asked;
    ``entropy_grad=False``: without autograd, for logging).

    The response token at column ``prompt_len + t`` is predicted by the logits at ``prompt_len + t - 1``.
    ``temperature`` divides the logits, so the log-probs are those of the distribution sampled from.
    The LM head runs on those positions only, not on the prompt's (see :func:`selected_token_logprobs`).
    """
    split = _head_split(model)
    labels = input_ids[:, prompt_len:]
    if split is None:
        logits = policy_logits(model, input_ids, attention_mask)[:, prompt_len - 1 : -1]
        if temperature != 1.0:
            logits = logits / temperature
        logps = token_logprobs(logits, labels)
        if not entropy:
            return logps, None
        return logps, entropy_from_logits(logits if entropy_grad else logits.detach())
    backbone, head = split
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state[:, prompt_len - 1 : -1]
    logps, entropies = head_token_logprobs(
        head,
        hidden.reshape(-1, hidden.shape[-1]),
        labels.reshape(-1),
        temperature=temperature,
        entropy=entropy,
        entropy_grad=entropy_grad,
    )
    return logps.view(labels.shape), (entropies.view(labels.shape) if entropy else None)


def response_values(
    critic: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, prompt_len: int
) -> Tensor:
    """Critic values [N, R] of the states before each response token (same positions as the log-probs)."""
    return token_scores(critic, input_ids, attention_mask)[:, prompt_len - 1 : -1].float()


def _score_head(model: PreTrainedModel) -> torch.nn.Module:
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no `score` head; lightning_rlhf reward models and critics need a "
            "decoder *ForSequenceClassification model (Llama, Mistral, Qwen, GPT-2, ... all have one)"
        )
    return head


def token_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head at every position, [B, T]: a critic's values, a reward model's per-token view."""
    # A PEFT wrapper's own `base_model` is its LoRA layer tree, whose forward returns the head's output;
    # the transformers model inside (adapters still active) has the backbone we want.
    model = unwrap(model)
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state
    return _score_head(model)(hidden).squeeze(-1)


def sequence_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The reward of each sequence, read at its last real token: [B] (float32 for any model dtype)."""
    scores = token_scores(model, input_ids, attention_mask)
    index = last_token_index(attention_mask)
    return scores.gather(1, index[:, None]).squeeze(1).float()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and values (keys caches to the exact weights).

    ``model`` is anything with a ``state_dict()``: for a LoRA reference, ``lora.AdaptersDisabled``. ZeRO-3
    shards are gathered one tensor at a time, so a partitioned model is never whole on a rank.
    """
    from lightning_rlhf.zero import gathered_tensors

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        with gathered_tensors([tensor]):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0.

    RLHF compares log-probs of the same tokens across forwards (policy vs reference, old vs new policy);
    dropout makes those differ at random, so DPO and PPO turn it off by default (as TRL does). Besides
    ``nn.Dropout`` modules, attention layers keep their rate as a plain float (Llama's
    ``attention_dropout``), so float attributes named like ``*dropout*`` are zeroed too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(config.to_dict().items()):
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its first floating parameter's (a ZeRO-3 shard's when partitioned)."""
    for param in model.parameters():
        tensor = getattr(param, "ds_tensor", param)
        if tensor.is_floating_point():
            return tensor.dtype
    return LOAD_DTYPE


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no gradients: how reference and reward models are held."""
    model.eval()
    model.requires_grad_(False)
    return model
