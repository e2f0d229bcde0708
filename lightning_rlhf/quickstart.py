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
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning as L
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.callbacks import AdvantageNormalization, EMAReferenceUpdate
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.losses import SigmoidDPOLoss
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.modules.iterative_dpo import IterativeDPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig, WordTask


@dataclass(frozen=True)
class StageSettings:
    """Epochs and learning rates of each stage (tiny models like high learning rates)."""

    sft_epochs: int = 3
    sft_lr: float = 3e-3
    reward_epochs: int = 3
    reward_lr: float = 1e-3
    dpo_epochs: int = 2
    dpo_lr: float = 1e-3
    dpo_beta: float = 0.1  # the paper's DPO beta
    batch_size: int = 32
    max_new_tokens: int = 12
    iterative_dpo_epochs: int = 1  # 32 iterations of 32 prompts x 4 samples
    iterative_dpo_lr: float = 1e-3
    ppo_epochs: int = 12  # 24 rollouts of 512 prompts (the paper's rollout batch)
    ppo_rollout_batch: int = 512
    ppo_lr: float = 1e-4
    ppo_critic_lr: float = 1e-3
    ppo_kl_coef: float = 0.1
    ppo_ema_decay: float = 0.05


EVAL_SAMPLES = 4  # samples per held-out prompt: the mean gold reward's standard error drops to ~0.02


def read_prompts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


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


def _fit(
    module: L.LightningModule,
    data: L.LightningDataModule,
    epochs: int,
    seed: int,
    callbacks: list | None = None,
) -> L.Trainer:
    print(f"training {type(module).__name__} for {epochs} epoch(s) ...", flush=True)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    trainer.fit(module, data)
    return trainer


def run_pipeline(out: Path, settings: StageSettings, *, seed: int) -> dict[str, float]:
    """Train SFT, reward model and DPO on the testbed in ``out``; save each as a save_pretrained folder."""
    s, tok = settings, str(out / "tokenizer")
    sft = SFTModule(str(out / "init_policy"), learning_rate=s.sft_lr)
    sft_data = SFTDataModule(
        tok, str(out / "sft_train.jsonl"), str(out / "sft_eval.jsonl"), batch_size=s.batch_size
    )
    _fit(sft, sft_data, s.sft_epochs, seed)
    sft.save_pretrained(out / "sft_policy")

    pairs = dict(
        tokenizer=tok,
        train_file=str(out / "pairs_train.jsonl"),
        val_file=str(out / "pairs_eval.jsonl"),
        max_length=128,
        batch_size=s.batch_size,
        seed=seed,
    )
    reward = RewardModule(str(out / "sft_policy"), learning_rate=s.reward_lr)
    trainer = _fit(reward, PreferenceDataModule(**pairs), s.reward_epochs, seed)
    reward.save_pretrained(out / "reward_model")
    reward_accuracy = float(trainer.callback_metrics["val/accuracy"])

    dpo = DPOModule(
        str(out / "sft_policy"),
        loss=SigmoidDPOLoss(beta=s.dpo_beta),
        learning_rate=s.dpo_lr,
        precompute_reference=True,
        reference_cache_dir=str(out / "reference_logps"),
    )
    _fit(dpo, PreferenceDataModule(**pairs), s.dpo_epochs, seed)
    dpo.save_pretrained(out / "dpo_policy")

    sft_dir, reward_dir = str(out / "sft_policy"), str(out / "reward_model")
    gold = GoldReward(str(out))  # logged during training, never trained on
    iterative = IterativeDPOModule(
        sft_dir,
        reward_model=reward_dir,
        gold_function=gold,
        loss=SigmoidDPOLoss(beta=s.dpo_beta),
        num_samples=4,
        max_new_tokens=s.max_new_tokens,
        mini_batch_size=s.batch_size,
        micro_batch_size=s.batch_size,
        learning_rate=s.iterative_dpo_lr,
    )
    prompts = PromptDataModule(sft_dir, str(out / "prompts_train.jsonl"), batch_size=s.batch_size, seed=seed)
    _fit(iterative, prompts, s.iterative_dpo_epochs, seed)
    iterative.save_pretrained(out / "dpo_iter_policy")

    # The paper's PPO recipe: a 512-prompt rollout batch, advantage normalization, an EMA reference.
    ppo = PPOModule(
        sft_dir,
        reward_model=reward_dir,
        gold_function=gold,
        max_new_tokens=s.max_new_tokens,
        mini_batch_size=s.ppo_rollout_batch // 4,
        micro_batch_size=s.ppo_rollout_batch // 8,
        kl_coef=s.ppo_kl_coef,
        gamma=1.0,
        lam=1.0,
        score_clip=20.0,
        learning_rate=s.ppo_lr,
        critic_learning_rate=s.ppo_critic_lr,
    )
    prompts = PromptDataModule(
        sft_dir, str(out / "prompts_train.jsonl"), batch_size=s.ppo_rollout_batch, seed=seed
    )
    callbacks = [AdvantageNormalization(), EMAReferenceUpdate(decay=s.ppo_ema_decay)]
    _fit(ppo, prompts, s.ppo_epochs, seed, callbacks=callbacks)
    ppo.save_pretrained(out / "ppo_policy")
    return {"reward_model_accuracy": reward_accuracy}


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
    # Progress bars, load reports and Trainer banners from every stage would drown the table this command
    # exists to print; each stage announces itself instead.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Frozen reference and reward models are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*validation_step.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

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
