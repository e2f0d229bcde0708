"""PPO with the paper's recipe in your own Lightning script, no CLI, on the testbed.

The reward here is a Python function (the testbed's gold reward); pass `reward_model=` a folder written by
RewardModule to train against a learned reward instead.

    python examples/ppo_plain_trainer.py --out runs/ppo_example
"""

import argparse
from pathlib import Path

import lightning as L
from transformers import AutoTokenizer

from lightning_rlhf import (
    AdvantageNormalization,
    EMAReferenceUpdate,
    PPOModule,
    PromptDataModule,
    SampleTable,
)
from lightning_rlhf.quickstart import read_prompts
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import write_testbed
from lightning_rlhf.testbed.models import MODEL_SIZES
from lightning_rlhf.testbed.reward import GoldReward

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/ppo_example")
parser.add_argument("--model-size", default="tiny", choices=sorted(MODEL_SIZES), help="testbed model size")
parser.add_argument("--max-steps", type=int, default=80)
args = parser.parse_args()

out = Path(args.out)
write_testbed(out, model_size=args.model_size)  # or your own prompts file and model folder
L.seed_everything(0)
ppo = PPOModule(
    str(out / "init_policy"),
    reward_function=GoldReward(str(out)),
    max_new_tokens=12,
    mini_batch_size=16,
    micro_batch_size=16,
    learning_rate=1e-4,
    critic_learning_rate=1e-3,
    kl_coef=0.05,
)
prompts = PromptDataModule(str(out / "init_policy"), str(out / "prompts_train.jsonl"), batch_size=64)
callbacks = [AdvantageNormalization(), EMAReferenceUpdate(decay=0.05), SampleTable(every_n_steps=5)]
trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", default_root_dir=out, callbacks=callbacks)
trainer.fit(ppo, prompts)
ppo.save_pretrained(out / "ppo_policy")

tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
held_out = read_prompts(out / "prompts_eval.jsonl")
print(evaluate_policy(ppo.policy, tokenizer, GoldReward(str(out)).task, held_out))
