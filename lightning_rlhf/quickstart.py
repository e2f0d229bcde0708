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
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.console import package_logs_at, quiet_third_party
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.pipeline import (  # noqa: F401  (StageSettings and read_prompts: re-exported)
    PROGRAM_SETTINGS,
    StageSettings,
    read_prompts,
    train_dpo,
    train_iterative_dpo,
    train_ppo,
    train_reward_model,
    train_sft,
)
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import ProgramSplitSizes, SplitSizes, write_program_testbed, write_testbed
from lightning_rlhf.testbed.program_eval import evaluate_programs, format_tier_table
from lightning_rlhf.testbed.programs import ProgramReward, ProgramsConfig
from lightning_rlhf.testbed.task import TaskConfig, WordTask

POLICIES = {
    "untrained": "init_policy",
    "sft": "sft_policy",
    "dpo": "dpo_policy",
    "dpo_iter": "dpo_iter_policy",
    "ppo": "ppo_policy",
}
"""Each stage's policy (name -> folder in the testbed), as both quickstarts train and report them."""
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
        description="Run the testbed pipeline and print how each stage scores on held-out prompts.",
    )
    parser.add_argument(
        "--task",
        choices=("words", "programs"),
        default="words",
        help="words: SFT -> reward model -> DPO, DPO-Iter, PPO, scored by the gold reward; programs: SFT -> "
        "DPO, DPO-Iter and PPO on exact test rewards (no reward model), scored by pass@k per tier",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the testbed data and models "
        "(default: runs/quickstart, or runs/quickstart_programs with --task programs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the data and the training")
    parser.add_argument("--model-size", default="tiny", help="testbed model size (nano, tiny, small)")
    parser.add_argument("--fast", action="store_true", help="one epoch per stage on less data (a smoke run)")
    args = parser.parse_args(argv)
    quiet_training_output()
    if args.task == "programs":
        out = Path(args.out or "runs/quickstart_programs")
        return program_quickstart(out, seed=args.seed, model_size=args.model_size, fast=args.fast)
    return word_quickstart(Path(args.out or "runs/quickstart"), args)


def word_quickstart(out: Path, args: argparse.Namespace) -> dict:
    """The word task: every stage scored by the gold reward (and the reward model) on held-out prompts."""
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
        for name, folder in POLICIES.items()
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


PROGRAM_EVAL_SAMPLES = 64  # per held-out prompt: enough for pass@10 and the paper's n@k form, 10@64
PROGRAM_METRICS = ("pass@1", "pass@5", "pass@10", "10@64")


def program_quickstart(out: Path, *, seed: int = 0, model_size: str = "tiny", fast: bool = False) -> dict:
    """The program task, the paper's code recipe: SFT, then DPO on (correct, mutant) pairs, DPO-Iter on
    fresh samples labelled by the tests, and PPO on the exact reward (10 if every hidden test passes, else
    0; no reward model), each scored by pass@1/5/10 and 10@64 per tier on the held-out prompts."""
    sizes, settings = ProgramSplitSizes(), PROGRAM_SETTINGS
    if fast:
        sizes = ProgramSplitSizes(
            sft_train=512, sft_eval=32, pairs_train=256, pairs_eval=64, prompts_train=64, prompts_eval=30
        )
        settings = replace(PROGRAM_SETTINGS, dpo_epochs=1, ppo_epochs=1, ppo_rollout_batch=32)
    start = time.perf_counter()
    write_program_testbed(out, ProgramsConfig(seed=seed), sizes, model_size=model_size)
    exact = ProgramReward()
    with package_logs_at(logging.WARNING):
        train_sft(out, settings, seed)
        train_dpo(out, settings, seed)
        train_iterative_dpo(out, settings, seed, exact_reward=exact)
        train_ppo(out, settings, seed, exact_reward=exact)
        print(
            f"sampling {PROGRAM_EVAL_SAMPLES} programs per held-out prompt from each policy ...", flush=True
        )
        report = evaluate_programs(
            {name: str(out / folder) for name, folder in POLICIES.items()},
            str(out / "prompts_eval.jsonl"),
            num_samples=PROGRAM_EVAL_SAMPLES,
            pass_k=(1, 5, 10),
            n_at_k=("10@64",),
            seed=seed,
        )
    prompts = int(report["sft"]["all"]["prompts"])
    print(
        f"\nHeld-out problems: {prompts} x {PROGRAM_EVAL_SAMPLES} samples, scored by the hidden tests "
        "(10@64: up to 10 submissions from the 64, filtered by the public examples and clustered)"
    )
    print(format_tier_table(report, PROGRAM_METRICS))
    print(f"\nModels and data in {out}/ ({time.perf_counter() - start:.0f} s)")
    (out / "results.json").write_text(json.dumps({"policies": report}, indent=1) + "\n")
    return {"policies": report}


if __name__ == "__main__":
    main()
