"""The word-testbed RL start the PPO, critic-free and vLLM tests share: one testbed, one SFT policy.

Every "RL raises the held-out gold reward over SFT" test starts from the same tiny policy after the same two
SFT epochs; conftest.py's session fixtures build it once (seeded, so each test sees what it trained before).
"""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_rlhf import SFTDataModule, SFTModule
from lightning_rlhf.quickstart import read_prompts
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig, WordTask

SIZES = SplitSizes(
    sft_train=1000, sft_eval=16, pairs_train=8, pairs_eval=8, prompts_train=256, prompts_eval=96
)


def write_rl_testbed(out: Path) -> Path:
    write_testbed(out, TaskConfig(seed=0), SIZES, model_size="tiny")
    return out


def cpu_trainer(root, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet one-device CPU Trainer writing under ``root``."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
        **kwargs,
    )


@dataclass(frozen=True)
class SFTStart:
    """The SFT policy folder and what the tests measure against: its held-out gold reward (``before``)."""

    path: Path
    tokenizer: PreTrainedTokenizerBase
    task: WordTask
    held_out: list[str]
    before: dict[str, float]


def train_sft_start(testbed: Path, out: Path) -> SFTStart:
    """Seeded: two SFT epochs of the tiny policy (lr 3e-3), saved in ``out / "sft"``, then scored."""
    L.seed_everything(0, verbose=False)
    sft = SFTModule(str(testbed / "init_policy"), learning_rate=3e-3)
    cpu_trainer(out, max_epochs=2, enable_checkpointing=False, deterministic=True).fit(
        sft, SFTDataModule(str(testbed / "tokenizer"), str(testbed / "sft_train.jsonl"), batch_size=32)
    )
    sft.save_pretrained(out / "sft")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    task = GoldReward(str(testbed)).task
    held_out = read_prompts(testbed / "prompts_eval.jsonl")
    before = evaluate_policy(sft.policy, tokenizer, task, held_out, samples_per_prompt=2, seed=1)
    return SFTStart(out / "sft", tokenizer, task, held_out, before)
