"""The main job on the embedded testbed: generate the task, fine-tune, and report the gold reward.

Run it with ``lightning-rlhf quickstart``. It grows with the package into the full pipeline
(SFT -> reward model -> DPO / PPO); today it runs the SFT stage and shows what SFT buys on the gold reward.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets
import lightning as L
import torch
import transformers
from transformers import AutoTokenizer

from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.modules.sft import SFTModule
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig


def read_prompts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


def run_sft_stage(out: Path, *, epochs: int, learning_rate: float, seed: int) -> SFTModule:
    """Fine-tune the testbed's initial policy on its demonstrations and save it to ``out/sft_policy``."""
    L.seed_everything(seed, verbose=False)
    module = SFTModule(str(out / "init_policy"), learning_rate=learning_rate)
    data = SFTDataModule(
        str(out / "tokenizer"),
        str(out / "sft_train.jsonl"),
        str(out / "sft_eval.jsonl"),
        batch_size=32,
        seed=seed,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    module.policy.save_pretrained(out / "sft_policy")
    data.tokenizer.save_pretrained(out / "sft_policy")
    return module


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf quickstart",
        description="Run the testbed pipeline and print the gold reward per stage.",
    )
    parser.add_argument("--out", default="runs/quickstart", help="folder for the testbed data and models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the data and the training")
    parser.add_argument("--model-size", default="tiny", help="testbed model size (nano, tiny, small)")
    parser.add_argument("--sft-epochs", type=int, default=3, help="epochs of supervised fine-tuning")
    parser.add_argument(
        "--sft-lr", type=float, default=3e-3, help="SFT learning rate (tiny models like it high)"
    )
    args = parser.parse_args(argv)
    # Per-file progress bars from transformers/datasets drown the table this command exists to print.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    out = Path(args.out)
    start = time.perf_counter()
    task = write_testbed(out, TaskConfig(seed=args.seed), SplitSizes(), model_size=args.model_size)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompts = read_prompts(out / "prompts_eval.jsonl")
    best = sum(task.best_reward(p) for p in prompts) / len(prompts)

    init = SFTModule(str(out / "init_policy"))
    init.configure_model()
    results = {"untrained": evaluate_policy(init.policy, tokenizer, task, prompts, seed=args.seed)}
    sft = run_sft_stage(out, epochs=args.sft_epochs, learning_rate=args.sft_lr, seed=args.seed)
    results["sft"] = evaluate_policy(sft.policy, tokenizer, task, prompts, seed=args.seed)

    print(f"\nHeld-out prompts: {len(prompts)} (best reachable mean gold reward {best:.3f})")
    print(f"{'policy':<12}{'gold reward':>13}{'EOS rate':>10}{'tokens':>8}")
    for name, row in results.items():
        print(f"{name:<12}{row['gold_reward']:>13.3f}{row['eos_rate']:>10.2f}{row['response_tokens']:>8.1f}")
    print(f"\nModels and data in {out}/ ({time.perf_counter() - start:.0f} s)")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
