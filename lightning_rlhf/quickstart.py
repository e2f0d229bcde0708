"""The main job on the embedded testbed: SFT -> reward model -> DPO, DPO-Iter and PPO, scored with the gold
reward that the testbed knows exactly.

Run it with ``lightning-rlhf quickstart``. Every stage is an ordinary Lightning fit of a package module on
the testbed's jsonl files, so this file is also a worked example of chaining the stages in Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.console import package_logs_at, quiet_third_party
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.pipeline import (  # noqa: F401  (StageSettings and read_prompts: re-exported)
    StageSettings,
    read_prompts,
    train_dpo,
    train_iterative_dpo,
    train_ppo,
    train_reward_model,
    train_sft,
)
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig, WordTask

EVAL_SAMPLES = 4  # samples per held-out prompt: the mean gold reward's standard error drops to ~0.02


def gold_pairwise_accuracy(task: WordTask, path: Path) -> float:
    """How often the gold reward agrees with the (Bradley-Terry drawn) labels: a reward model's ceiling."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    agree = 0.0
    for row in rows:
        chosen, rejected = (
            task.gold_reward(row["prompt"], row["chosen"]),
            task.gold_reward(row["prompt"], row["rejected"]),
        )
        agree += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return agree / len(rows)


def run_pipeline(out: Path, settings: StageSettings, *, seed: int) -> dict[str, float]:
    """Train SFT, reward model, DPO, DPO-Iter and PPO (paper recipe) on the testbed in ``out``."""
    train_sft(out, settings, seed)
    reward_accuracy = train_reward_model(out, settings, seed)
    train_dpo(out, settings, seed)
    train_iterative_dpo(out, settings, seed)
    train_ppo(out, settings, seed)
    return {"reward_model_accuracy": reward_accuracy}


def quiet_training_output() -> None:
    """Silence progress bars, load reports and Trainer banners: each stage announces itself instead."""
    quiet_third_party()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf quickstart",
        description="Run the testbed pipeline and print the gold reward per stage.",
    )
    parser.add_argument("--out", default="runs/quickstart", help="folder for the testbed data and models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the data and the training")
    parser.add_argument("--model-size", default="tiny", help="testbed model size (nano, tiny, small)")
    parser.add_argument("--fast", action="store_true", help="one epoch per stage on less data (a smoke run)")
    args = parser.parse_args(argv)
    quiet_training_output()

    out = Path(args.out)
    start = time.perf_counter()
    sizes, settings = SplitSizes(), StageSettings()
    if args.fast:
        sizes = SplitSizes(
            sft_train=256, sft_eval=32, pairs_train=256, pairs_eval=64, prompts_train=32, prompts_eval=32
        )
        settings = StageSettings(
            sft_epochs=1, reward_epochs=1, dpo_epochs=1, ppo_epochs=1, ppo_rollout_batch=32
        )
    task = write_testbed(out, TaskConfig(seed=args.seed), sizes, model_size=args.model_size)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompts = read_prompts(out / "prompts_eval.jsonl")

    # Each stage announces itself; the package's per-file INFO lines (rows kept, caches, exports) would only
    # repeat what the embedded testbed guarantees. Its warnings still show.
    with package_logs_at(logging.WARNING):
        summary = run_pipeline(out, settings, seed=args.seed)
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    policies = {
        "untrained": "init_policy",
        "sft": "sft_policy",
        "dpo": "dpo_policy",
        "dpo_iter": "dpo_iter_policy",
        "ppo": "ppo_policy",
    }
    results = {
        name: evaluate_policy(
            load_causal_lm(str(out / folder)),
            tokenizer,
            task,
            prompts,
            reward_model=reward_model,
            samples_per_prompt=EVAL_SAMPLES,
            seed=args.seed,
        )
        for name, folder in policies.items()
    }
    best = sum(task.best_reward(p) for p in prompts) / len(prompts)
    ceiling = gold_pairwise_accuracy(task, out / "pairs_eval.jsonl")

    print(
        f"\nHeld-out prompts: {len(prompts)} x {EVAL_SAMPLES} samples; "
        f"best reachable mean gold reward {best:.3f}"
    )
    accuracy = summary["reward_model_accuracy"]
    print(f"Reward model pairwise accuracy {accuracy:.3f} (the gold reward's own: {ceiling:.3f})")
    print(f"\n{'policy':<12}{'gold reward':>13}{'RM score':>10}{'EOS rate':>10}{'tokens':>8}")
    for name, row in results.items():
        print(
            f"{name:<12}{row['gold_reward']:>13.3f}{row['rm_score']:>10.3f}{row['eos_rate']:>10.2f}"
            f"{row['response_tokens']:>8.1f}"
        )
    print(f"\nModels and data in {out}/ ({time.perf_counter() - start:.0f} s)")
    report = {
        "policies": results,
        "reward_model_accuracy": summary["reward_model_accuracy"],
        "gold_pairwise_accuracy": ceiling,
        "best_gold_reward": best,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
