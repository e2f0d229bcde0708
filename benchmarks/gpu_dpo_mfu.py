"""DPO step MFU and PPO generation throughput of lightning_rlhf on one GPU (bf16), standalone.

    python benchmarks/gpu_dpo_mfu.py --out gpu.json --profile          # ~0.5B Llama, bf16, CUDA
    python benchmarks/gpu_dpo_mfu.py --device cpu --tiny --out t.json  # the same code path, tiny, on CPU

Needs only torch, transformers, lightning and this package (no TRL, no DeepSpeed). The model is a Llama of
the shape of a 0.5B model with random weights, written once with ``save_pretrained`` and loaded through
``DPOModule`` (policy and frozen reference), so the step is the package's own code: one concatenated
chosen+rejected forward, the LM head on response positions only, chunked float32 log-probs of bf16 logits.
Prints one JSON line and writes it to ``--out``.

FLOPs per DPO step are counted the usual way, ``6 * N * T`` for the policy's forward and backward plus
``2 * N * T`` for the reference forward, with T the tokens in the batch (chosen and rejected, padding
included) and N the parameters that do matrix work per token (all but the input embedding; the LM head
counted at every position, although we run it on response positions only). Attention's ``T^2`` term is left
out, so MFU is slightly understated for long sequences. MFU = counted FLOPs / step time / peak dense bf16
FLOP/s of the GPU (``--peak-tflops``, else a table of known GPUs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L4": 121.0,
    "L40S": 362.0,
    "B200": 2250.0,
}

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "0.5b": (1024, 24, 16, 16, 2816, 32000),
    "tiny": (64, 2, 4, 4, 128, 512),
}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def write_model(folder: Path, shape: str) -> int:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def preference_batch(pairs: int, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """2*pairs sequences of ``length`` tokens (no padding), the first quarter the prompt."""
    ids = torch.randint(2, vocab, (2 * pairs, length), device=device)
    ids[pairs:, : length // 4] = ids[:pairs, : length // 4]  # rejected shares the chosen's prompt
    attention = torch.ones_like(ids)
    response = attention.clone()
    response[:, : length // 4] = 0
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "response_mask": response,
        "index": torch.arange(pairs, device=device),
    }


def dpo_mfu(args, folder: Path, matmul_params: int, device: torch.device, dtype: torch.dtype) -> dict:
    from lightning_rlhf import DPOModule

    module = DPOModule(str(folder), diagnostic_batches=0, gradient_checkpointing=args.gradient_checkpointing)
    module.configure_model()
    module.to(device)
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-6, fused=device.type == "cuda")
    batch = preference_batch(args.pairs, args.length, module.policy.config.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        with autocast:
            out, _ = module.compute_loss(batch, "train")
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    for _ in range(args.warmup):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()  # float() synchronises
        times.append(time.perf_counter() - start)
    tokens = batch["input_ids"].numel()
    flops = 8 * matmul_params * tokens  # 6NT policy fwd+bwd, 2NT reference fwd
    seconds = sorted(times)[len(times) // 2]
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "dpo_step_seconds_median": seconds,
        "dpo_step_seconds": times,
        "dpo_tokens_per_step": tokens,
        "dpo_tokens_per_second": tokens / seconds,
        "dpo_model_tflops_per_second": flops / seconds / 1e12,
        "dpo_mfu": (flops / seconds / 1e12 / peak) if peak else None,
        "peak_bf16_tflops": peak,
        "dpo_loss_last": loss,
    }
    if device.type == "cuda":
        result["dpo_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile:
        result.update(profile_steps(step, device, args.profile_steps))
    return result


def profile_steps(step, device: torch.device, steps: int) -> dict:
    """Where a DPO step's time goes: torch.profiler over ``steps`` steps.

    ``dpo_device_busy_fraction`` is the kernels' summed device time over the wall time: well below 1 means
    the GPU waits on the host (kernel launches, Python, synchronisation), not on its own arithmetic.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {
        "dpo_profile_table": averages.table(sort_by=sort_by, row_limit=25, max_name_column_width=60),
        "dpo_profile_wall_seconds": wall,
        "dpo_device_busy_fraction": (device_us / 1e6 / wall) if device.type == "cuda" else None,
    }


def generation_throughput(args, folder: Path, device: torch.device, dtype: torch.dtype) -> dict:
    from lightning_rlhf.rollout.generation import SamplingConfig, generate_responses

    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    vocab = policy.config.vocab_size
    prompts = torch.randint(2, vocab, (args.gen_prompts, args.gen_prompt_length), device=device)
    mask = torch.ones_like(prompts)
    sampling = SamplingConfig(max_new_tokens=args.gen_new_tokens, temperature=1.0)

    def ours() -> int:
        response, response_mask = generate_responses(
            policy, prompts, mask, sampling, eos_token_id=1, pad_token_id=0
        )
        return int(response_mask.sum())

    def bare() -> int:
        with torch.no_grad():
            out = policy.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=args.gen_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=None,
                eos_token_id=1,
                pad_token_id=0,
            )
        return int((out[:, prompts.shape[1] :] != 0).sum())

    ours()  # warm-up
    timings = {"ours": [], "bare": []}
    tokens = 0
    for i in range(args.gen_repeats):
        for name, fn in (("ours", ours), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("ours", ours)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = fn()
            timings[name].append(time.perf_counter() - start)
            if name == "ours":
                tokens = n
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    return {
        "generation_tokens_per_second": tokens / median["ours"],
        "generation_seconds": timings["ours"],
        "generation_bare_seconds": timings["bare"],
        "generation_overhead": median["ours"] / median["bare"] - 1,
        "generation_tokens": tokens,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file to write the results to")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU check of the path)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 (fp32 on CPU)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per DPO step (default 8; tiny 2)")
    parser.add_argument(
        "--length", type=int, default=None, help="tokens per sequence (default 1024; tiny 32)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed DPO steps (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--gen-prompts", type=int, default=None, help="prompts per generate (default 64)")
    parser.add_argument("--gen-prompt-length", type=int, default=None, help="default 128; tiny 8")
    parser.add_argument("--gen-new-tokens", type=int, default=None, help="default 256; tiny 8")
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU")
    parser.add_argument(
        "--profile", action="store_true", help="also profile DPO steps (top kernels, device busy fraction)"
    )
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (
        ("pairs", 8, 2),
        ("length", 1024, 32),
        ("steps", 10, 2),
        ("gen_prompts", 64, 4),
        ("gen_prompt_length", 128, 8),
        ("gen_new_tokens", 256, 8),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if tiny:
        args.warmup = min(args.warmup, 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --tiny to check the path")
    dtype_name = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    shape = "tiny" if tiny else "0.5b"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        matmul_params = write_model(folder, shape)
        result = {
            "model": shape,
            "matmul_parameters": matmul_params,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": dtype_name,
            "pairs": args.pairs,
            "length": args.length,
            "flops_formula": "8*N*tokens (6NT policy fwd+bwd + 2NT reference fwd), N = non-embedding params",
            "torch": torch.__version__,
        }
        result.update(dpo_mfu(args, folder, matmul_params, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result.update(generation_throughput(args, folder, device, dtype))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
