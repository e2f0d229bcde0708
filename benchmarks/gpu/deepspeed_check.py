"""GPU check of the DeepSpeed paths: RM, DPO and PPO under ZeRO-2/3 on CUDA in bf16, against plain Lightning.

A ~0.5B-parameter Llama (the testbed's ``0.5b`` shape, random weights) is fitted a few steps per stage
with the same seed and data under the single-device strategy, DeepSpeed ZeRO-2 and ZeRO-3 (and, for PPO,
ZeRO-3 with ``zero3_generation: synced``). It records, per run: the logged losses after every step, step
times, peak GPU memory, and PPO's per-phase times; and checks that ZeRO runs stay close to the plain run
(bf16 differs in rounding, so the tolerance is loose: it catches a wrong gradient, not rounding).

Needs CUDA and deepspeed; CI never runs it. On a GPU machine, from the repository root:

    python benchmarks/gpu/deepspeed_check.py --out gpu_deepspeed.json

The JSON and a markdown summary (``--out`` with .md) are what docs/deepspeed.md reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = {
    "reward": ["plain", "zero2", "zero3"],
    "dpo": ["plain", "zero2", "zero3"],
    "ppo": ["plain", "zero2", "zero3", "zero3_synced"],
}
LOSS_KEY = {"reward": "train/loss", "dpo": "train/loss", "ppo": "ppo/loss"}


def strategy(name: str, device: str):
    if name == "plain":
        return "auto"
    if device == "cpu":  # the smoke test's path: the test-only CPU strategy (tests/deepspeed_cpu.py)
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
        from deepspeed_cpu import CPUDeepSpeedStrategy, zero_config

        return CPUDeepSpeedStrategy(config=zero_config(int(name[4])))
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(name[4]), logging_batch_size_per_gpu=1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(stage: str, variant: str, testbed: Path, args):
    from lightning_rlhf import DPOModule, PPOModule, PreferenceDataModule, PromptDataModule, RewardModule
    from lightning_rlhf.testbed.reward import GoldReward

    policy = str(testbed / "init_policy")
    if stage == "ppo":
        module = PPOModule(
            model=policy,
            reward_function=GoldReward(str(testbed)),
            mini_batch_size=args.rollout // 2,
            micro_batch_size=args.rollout // 4,
            generation_batch_size=args.rollout,
            max_new_tokens=args.new_tokens,
            learning_rate=1e-5,
            critic_learning_rate=1e-5,
            zero3_generation="synced" if variant.endswith("synced") else "gather",
        )
        return module, PromptDataModule(policy, str(testbed / "prompts_train.jsonl"), batch_size=args.rollout)
    data = PreferenceDataModule(
        policy, str(testbed / "pairs_train.jsonl"), None, batch_size=args.batch, max_length=256
    )
    if stage == "reward":
        return RewardModule(policy, learning_rate=1e-5), data
    return DPOModule(policy, learning_rate=1e-6, precompute_reference=False, diagnostic_batches=0), data


def fit(stage: str, variant: str, testbed: Path, args) -> dict:
    import lightning as L

    steps: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(args.device)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            steps.append({"seconds": time.perf_counter() - self.t0, **metrics})

    L.seed_everything(0, verbose=False)
    module, data = build(stage, variant, testbed, args)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        strategy=strategy(variant, args.device),
        precision="bf16-mixed" if cuda else "32-true",
        # Synced ZeRO-3 decoding all-gathers every layer at every token: one rollout shows its cost.
        max_steps=2 if variant == "zero3_synced" else args.steps * (2 if stage == "ppo" else 1),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Record()],
        default_root_dir=tempfile.mkdtemp(),
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    record = {
        "stage": stage,
        "variant": variant,
        "wall_s": time.perf_counter() - start,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "losses": [s.get(LOSS_KEY[stage]) for s in steps],
        "step_s": [s["seconds"] for s in steps],
        "phases_s": {k: [s.get(k) for s in steps] for k in steps[0] if k.startswith("time/")}
        if steps
        else {},
    }
    del trainer, module, data
    if cuda:
        torch.cuda.empty_cache()
    return record


def summarise(records: list[dict]) -> tuple[str, list[str]]:
    """A markdown table and the list of failed checks (ZeRO runs far from the plain run)."""
    lines = [
        "| stage | strategy | first loss | last loss | median step s | peak GPU GiB | phases (s, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    failures = []
    # Baselines: the plain run for DPO. The reward model's fresh head and PPO's samples depend on the RNG
    # state, which distributed strategies re-seed in setup, so those compare with ZeRO-2
    # (tests/test_deepspeed.py compares every stage with DDP exactly, on CPU).
    baseline = {"dpo": "plain", "reward": "zero2", "ppo": "zero2"}
    plain = {r["stage"]: r for r in records if r["variant"] == baseline[r["stage"]]}
    for r in records:
        step = sorted(r["step_s"])[len(r["step_s"]) // 2] if r["step_s"] else float("nan")
        phases = ", ".join(
            f"{k[5:]} {sorted(v)[len(v) // 2]:.2f}" for k, v in r["phases_s"].items() if None not in v
        )
        lines.append(
            f"| {r['stage']} | {r['variant']} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {step:.3f} "
            f"| {r['peak_gpu_gib']:.1f} | {phases} |"
        )
        base = plain.get(r["stage"])
        if base is not None and r["variant"] not in ("plain", base["variant"]):
            first, ref = r["losses"][0], base["losses"][0]
            if not abs(first - ref) <= 0.05 * max(1.0, abs(ref)):
                failures.append(
                    f"{r['stage']}/{r['variant']}: first loss {first:.4f} vs {base['variant']} {ref:.4f}"
                )
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_deepspeed.json", help="JSON results (a .md summary beside it)")
    parser.add_argument("--size", default="0.5b", help="testbed model size")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (PPO: rollouts x 2)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per DPO/RM step")
    parser.add_argument("--rollout", type=int, default=32, help="prompts per PPO rollout")
    parser.add_argument("--new-tokens", type=int, default=48, help="PPO response length")
    parser.add_argument("--stages", default="reward,dpo,ppo")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("deepspeed_check needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.task import TaskConfig

    testbed = Path(tempfile.mkdtemp()) / "testbed"
    sizes = SplitSizes(
        sft_train=8, sft_eval=8, pairs_train=256, pairs_eval=8, prompts_train=512, prompts_eval=8
    )
    write_testbed(testbed, TaskConfig(seed=0), sizes, model_size=args.size)
    records = []
    for stage in args.stages.split(","):
        for variant in STAGES[stage]:
            try:
                records.append(fit(stage, variant, testbed, args))
            except Exception as err:  # keep going: one broken path must not hide the others' numbers
                records.append({"stage": stage, "variant": variant, "error": repr(err)[:2000]})
                print(f"{stage}/{variant} FAILED: {err!r}", file=sys.stderr, flush=True)
            print(json.dumps(records[-1])[:400], flush=True)
    ok = [r for r in records if "error" not in r]
    table, failures = summarise(ok)
    failures += [f"{r['stage']}/{r['variant']}: {r['error']}" for r in records if "error" in r]
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "versions": _versions(),
        "args": vars(args),
        "records": records,
        "failures": failures,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(f"{result['device']}, {result['versions']}\n\n{table}\n")
    print(table)
    print("FAILURES:" if failures else "all checks passed", *failures, sep="\n")
    return 1 if failures else 0


def _versions() -> dict:
    import deepspeed
    import lightning
    import transformers

    return {
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
