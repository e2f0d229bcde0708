"""TRL 1.12 ``trl.experimental.ppo.PPOTrainer`` on the shared fixtures, in its own virtual environment.

TRL removed PPO after 1.12, so this file imports nothing of lightning_rlhf and runs under a separate
interpreter (``run.py`` builds it). Phases are timed by wrapping the module-level functions the trainer calls:
``batch_generation`` (generation), ``forward`` / ``get_reward`` outside the update (inference of reference
log-probs, values and scores; TRL takes the old log-probs from the generation logits, so it has no policy
forward there); the rest of each step is the update.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meta", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = json.loads(Path(args.meta).read_text())
    cfg = meta["config"]

    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    clock = {"generation": 0.0, "inference": 0.0, "in_update": False}

    def timed(fn, phase):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            if phase == "generation" or not clock["in_update"]:
                clock[phase] += time.perf_counter() - start
            return out

        return wrapper

    original_forward = ppo_trainer.forward
    ppo_trainer.batch_generation = timed(ppo_trainer.batch_generation, "generation")
    ppo_trainer.get_reward = timed(ppo_trainer.get_reward, "inference")

    def forward(model, *a, **k):
        # The update calls forward(model=PolicyAndValueWrapper, ...) with gradients on: not inference.
        clock["in_update"] = torch.is_grad_enabled()
        return timed(original_forward, "inference")(model, *a, **k)

    ppo_trainer.forward = forward

    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"], padding_side="left")
    dataset = load_dataset("json", data_files=meta["prompts"], split="train")
    dataset = dataset.map(
        lambda row: {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]},
        remove_columns=["prompt"],
    )
    policy = AutoModelForCausalLM.from_pretrained(meta["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(meta["policy"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(meta["reward_model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(meta["reward_model"], num_labels=1)
    n = cfg["ppo_prompts"]
    config = PPOConfig(
        output_dir=str(Path(args.work) / "trl_ppo"),
        per_device_train_batch_size=cfg["ppo_micro"],
        gradient_accumulation_steps=n // cfg["ppo_micro"],
        num_mini_batches=1,
        num_ppo_epochs=1,
        total_episodes=n * cfg["ppo_steps"],
        local_rollout_forward_batch_size=n,
        response_length=cfg["ppo_new_tokens"],
        temperature=1.0,
        stop_token="eos",
        kl_coef=0.05,
        learning_rate=1e-6,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=cfg["seed"],
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
    )
    steps: list[dict] = []
    mark = {"last": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            mark["last"], mark["cpu"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            now, cpu = time.perf_counter(), time.process_time()
            steps.append(
                {
                    "seconds": now - mark["last"],
                    "cpu_seconds": cpu - mark["cpu"],
                    "generation": clock["generation"],
                    "inference": clock["inference"],
                }
            )
            mark["last"], mark["cpu"] = now, cpu
            clock["generation"] = clock["inference"] = 0.0

    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    for row in steps:
        row["update"] = row["seconds"] - row["generation"] - row["inference"]
    result = {
        "steps": steps,
        "fit_seconds": total,
        "trl_version": trl.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
