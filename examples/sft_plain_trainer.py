"""Use lightning_rlhf inside your own Lightning script, no CLI: SFT of the testbed policy.

python examples/sft_plain_trainer.py --out runs/example
"""

import argparse
from pathlib import Path

import lightning as L
from transformers import AutoTokenizer

from lightning_rlhf import SFTDataModule, SFTModule
from lightning_rlhf.quickstart import read_prompts
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import load_task, write_testbed
from lightning_rlhf.testbed.models import MODEL_SIZES

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/example")
parser.add_argument("--model-size", default="tiny", choices=sorted(MODEL_SIZES), help="testbed model size")
parser.add_argument("--max-steps", type=int, default=-1, help="stop early (default: the 2 epochs)")
args = parser.parse_args()

# swap in your own files: any prompt/completion jsonl, csv or parquet works
write_testbed(args.out, model_size=args.model_size)
L.seed_everything(0)
model = SFTModule(f"{args.out}/init_policy", learning_rate=3e-3)  # or a hub name / save_pretrained folder
data = SFTDataModule(f"{args.out}/tokenizer", f"{args.out}/sft_train.jsonl", f"{args.out}/sft_eval.jsonl")
trainer = L.Trainer(max_epochs=2, max_steps=args.max_steps, accelerator="cpu", default_root_dir=args.out)
trainer.fit(model, data)

tokenizer = AutoTokenizer.from_pretrained(f"{args.out}/tokenizer")
prompts = read_prompts(Path(args.out) / "prompts_eval.jsonl")
print(evaluate_policy(model.policy, tokenizer, load_task(args.out), prompts))
