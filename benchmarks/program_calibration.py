"""Measure the program testbed's SFT pass@k by tier (the calibration issue #14 asks for, before any RL).

    python benchmarks/program_calibration.py [--out DIR] [--samples 16] [--sft-epochs 3]

Writes the testbed (seed 0, tiny model), fine-tunes the initial policy on sft_train.jsonl exactly as the
word quickstart's SFT stage does (lr 3e-3, batch 32), samples ``--samples`` responses per held-out prompt
(temperature 1, 10 new tokens) and prints pass@1 / pass@8 / pass@samples per tier as JSON, scored by the
in-process ProgramReward on each row's hidden tests. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
from transformers import AutoTokenizer

from lightning_rlhf import SFTDataModule, SFTModule
from lightning_rlhf.evaluate import generate_texts
from lightning_rlhf.metrics import mean_pass_at_k
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.rollout.generation import SamplingConfig
from lightning_rlhf.testbed.files import ProgramSplitSizes, write_program_testbed
from lightning_rlhf.testbed.programs import TIERS, ProgramReward, ProgramsConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="testbed folder (default: a temporary one)")
    parser.add_argument("--samples", type=int, default=16, help="responses per held-out prompt")
    parser.add_argument("--sft-epochs", type=int, default=3, help="SFT epochs")
    parser.add_argument(
        "--eval-programs",
        choices=("unseen", "any"),
        default="unseen",
        help="unseen: held-out prompts ask only for programs no training file demonstrates (the default); "
        "any: held-out prompts drawn like the training ones (ProgramsConfig.unseen_eval_programs)",
    )
    parser.add_argument("--model-size", default="tiny", help="testbed model size (nano, tiny, small, ...)")
    parser.add_argument("--lr", type=float, default=3e-3, help="SFT learning rate")
    parser.add_argument("--sft-train", type=int, default=3000, help="SFT demonstrations")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="programs_"))
    write_program_testbed(
        out,
        ProgramsConfig(unseen_eval_programs=args.eval_programs == "unseen"),
        ProgramSplitSizes(sft_train=args.sft_train),
        model_size=args.model_size,
    )
    L.seed_everything(0, verbose=False)
    sft = SFTModule(str(out / "init_policy"), learning_rate=args.lr)
    data = SFTDataModule(
        str(out / "tokenizer"),
        str(out / "sft_train.jsonl"),
        str(out / "sft_eval.jsonl"),
        batch_size=32,
        apply_chat_template=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.sft_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(sft, data)
    sft.save_pretrained(out / "sft_policy")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft_policy")
    rows = [json.loads(line) for line in (out / "prompts_eval.jsonl").read_text().splitlines()]
    k = args.samples
    texts = [r["prompt"] for r in rows for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    policy = load_causal_lm(str(out / "sft_policy"))
    generated = generate_texts(policy, tokenizer, texts, sampling, batch_size=64, seed=0)
    scores = ProgramReward()(texts, generated.texts, tests=[r["tests"] for r in rows for _ in range(k)])
    report: dict = {
        "seconds": round(time.perf_counter() - start),
        "eos_rate": sum(generated.ended) / len(texts),
    }
    for tier in TIERS:
        index = [i for i, r in enumerate(rows) if r["tier"] == tier]
        correct = [sum(scores[i * k + j] > 0 for j in range(k)) for i in index]
        report[tier] = {
            f"pass@{n}": round(mean_pass_at_k([k] * len(index), correct, n), 3) for n in sorted({1, 8, k})
        }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
