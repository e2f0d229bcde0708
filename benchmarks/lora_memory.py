"""Memory of a DPO or PPO run with and without LoRA, on a testbed model of a chosen size.

Each configuration runs in a fresh process, so its peak is its own: CUDA ``max_memory_allocated`` on a
GPU, peak RSS (``ru_maxrss``) on CPU (which includes ~0.5 GiB of libraries: compare the difference).

    python benchmarks/lora_memory.py --stage dpo --size 512x8            # CPU, a 26M-parameter Llama
    python benchmarks/lora_memory.py --stage ppo --size 0.5b --device cuda

Prints one markdown row per configuration: the module's parameter and buffer bytes (each tensor once),
its trainable parameters, the AdamW state bytes after the run, and the peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def distinct_bytes(tensors) -> int:
    unique = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def register_size(size: str) -> None:
    """Sizes other than the testbed's named ones, as HIDDENxLAYERS (64-wide heads, Llama's 2.75x MLP)."""
    from lightning_rlhf.testbed.models import MODEL_SIZES

    if size not in MODEL_SIZES:
        hidden, layers = (int(x) for x in size.split("x"))
        MODEL_SIZES[size] = (hidden, layers, hidden // 64, int(2.75 * hidden) // 64 * 64)


def run_one(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    torch.set_num_threads(1)
    register_size(args.size)

    from lightning_rlhf import (
        DPOModule,
        LoraSettings,
        PPOModule,
        PreferenceDataModule,
        PromptDataModule,
    )
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.reward import GoldReward
    from lightning_rlhf.testbed.task import TaskConfig

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    sizes = SplitSizes(
        sft_train=8, sft_eval=4, pairs_train=64, pairs_eval=8, prompts_train=64, prompts_eval=8
    )
    write_testbed(out, TaskConfig(seed=0), sizes, model_size=args.size)
    model = str(out / "init_policy")
    lora = LoraSettings(r=args.rank, alpha=2.0 * args.rank) if args.one == "lora" else None
    if args.stage == "dpo":
        module = DPOModule(model, learning_rate=1e-5, diagnostic_batches=0, lora=lora)
        data = PreferenceDataModule(model, str(out / "pairs_train.jsonl"), batch_size=8, max_length=128)
    else:
        module = PPOModule(
            model,
            reward_function=GoldReward(str(out)),
            max_new_tokens=16,
            mini_batch_size=8,
            micro_batch_size=8,
            generation_batch_size=8,
            lora=lora,
        )
        data = PromptDataModule(model, str(out / "prompts_train.jsonl"), batch_size=8)
    cuda = args.device == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    optimizer = trainer.optimizers[0]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "stage": args.stage,
        "size": args.size,
        "lora": args.one,
        "module_MiB": distinct_bytes([*module.parameters(), *module.buffers()]) / MIB,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "adam_state_MiB": distinct_bytes(state) / MIB,
        "peak_MiB": peak,
        "peak_kind": "cuda_max_allocated" if cuda else "max_rss",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--stage", choices=["dpo", "ppo"], default="dpo")
    parser.add_argument("--size", default="512x8", help="nano, tiny, small, 0.5b, or HIDDENxLAYERS")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (DPO) / rollouts (PPO)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    print("| stage | size | weights | module MiB | trainable | AdamW state MiB | peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for one in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", one]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {row['stage']} | {row['size']} | {row['lora']} | {row['module_MiB']:.1f} | "
            f"{row['trainable']:,} | {row['adam_state_MiB']:.1f} | {row['peak_MiB']:.0f} "
            f"({row['peak_kind']}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
