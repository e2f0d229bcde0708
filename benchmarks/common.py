"""Shared fixtures of the benchmark: tokenizer, model folders and data files, written once per run.

Both sides of every comparison read the same files: the same tokenizer folder, the same initial weights
(``save_pretrained`` folders, so the score head of the reward model is the same too) and the same jsonl
rows, so any difference in speed or loss comes from the training code, not the inputs.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
)

from lightning_rlhf.data.tokenize import prompt_token_ids
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig
from lightning_rlhf.testbed.tokenizer import train_tokenizer


@dataclass(frozen=True)
class GRPOShape:
    """The GRPO comparison: the word testbed's prompts, tokenizer, gold reward and initial policy.

    One step is one rollout of ``prompts`` x ``generations`` responses and one optimizer step over it, in
    micro-batches of ``micro`` sequences (TRL: generation batch = per-device batch x accumulation steps).
    """

    model_size: str  # lightning_rlhf.testbed.models.MODEL_SIZES
    prompts: int  # prompts per step
    generations: int  # responses per prompt (the group)
    new_tokens: int  # max_new_tokens / max_completion_length
    micro: int  # sequences per forward/backward
    steps: int  # optimizer steps (= rollouts) per measured run
    beta: float = 0.04  # k3 KL loss coefficient (TRL's beta, our kl_coef with kl_penalty="loss")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape. ``full`` is the default; ``quick`` runs fewer steps; ``smoke`` is for tests."""

    name: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    min_length: int
    max_length: int
    pairs: int  # preference pairs trained on (one epoch): steps = pairs / batch_pairs
    batch_pairs: int  # pairs per optimizer step
    micro_pairs: int  # pairs per forward/backward (gradient accumulation = batch / micro)
    ppo_prompts: int  # prompts per PPO rollout batch
    ppo_steps: int  # rollouts
    ppo_micro: int
    ppo_prompt_length: int
    ppo_new_tokens: int
    grpo: GRPOShape
    seed: int = 0

    @property
    def accumulation(self) -> int:
        return self.batch_pairs // self.micro_pairs


CONFIGS = {
    # ~12.7M parameters (vocab 8192, untied head), sequences of 64-512 tokens: a realistic small shape.
    # GRPO: TRL's default group of 8, one optimizer step per rollout of 64 sequences.
    "full": BenchConfig(
        "full", 8192, 320, 6, 8, 864, 64, 512, 24, 8, 2, 16, 3, 4, 64, 64, GRPOShape("small", 8, 8, 64, 16, 4)
    ),
    "quick": BenchConfig(
        "quick", 8192, 320, 6, 8, 864, 64, 512, 12, 4, 2, 8, 2, 4, 64, 48, GRPOShape("small", 4, 8, 48, 16, 3)
    ),
    "smoke": BenchConfig(
        "smoke", 600, 32, 2, 2, 64, 16, 48, 4, 2, 1, 4, 1, 2, 8, 8, GRPOShape("nano", 2, 2, 6, 2, 2)
    ),
}


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(seen)


def _text_of_tokens(tokenizer, words: list[str], rng: random.Random, n_tokens: int) -> str:
    """Words until the text is ``n_tokens`` tokens long (byte-level BPE splits on spaces, so counts add)."""
    out: list[str] = []
    count = 0
    while count < n_tokens:
        word = rng.choice(words)
        piece = word if not out else " " + word
        k = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if count + k > n_tokens and out:
            break
        out.append(piece)
        count += k
    return "".join(out)


def write_fixtures(cfg: BenchConfig, root: Path) -> dict:
    """Write tokenizer, policy and reward-model folders and the data files under ``root``; returns paths."""
    root.mkdir(parents=True, exist_ok=True)
    meta_file = root / "fixtures.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("config") == asdict(cfg):
        return json.loads(meta_file.read_text())
    rng = random.Random(cfg.seed)
    words = _words(rng, max(2000, cfg.vocab_size * 3))
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(len(words) // 10)]
    corpus += words  # every word seen whole at least once
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.vocab_size)
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(tok_dir)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=max(1024, cfg.max_length * 2),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config.num_labels = 1
    torch.manual_seed(cfg.seed + 1)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")

    pairs = []
    for _ in range(cfg.pairs):
        total = rng.randint(cfg.min_length, cfg.max_length)
        prompt_len = max(4, int(total * rng.uniform(0.2, 0.5)))
        budget = total - prompt_len - 1  # EOS is added to each response
        chosen_len = budget
        rejected_len = max(2, int(budget * rng.uniform(0.7, 1.0)))
        pairs.append(
            {
                "prompt": _text_of_tokens(tokenizer, words, rng, prompt_len),
                "chosen": " " + _text_of_tokens(tokenizer, words, rng, chosen_len),
                "rejected": " " + _text_of_tokens(tokenizer, words, rng, rejected_len),
            }
        )
    with open(root / "pairs.jsonl", "w") as f:
        for row in pairs:
            f.write(json.dumps(row) + "\n")
    prompts = [
        {
            "prompt": _text_of_tokens(
                tokenizer, words, rng, rng.randint(cfg.ppo_prompt_length // 2, cfg.ppo_prompt_length)
            )
        }
        for _ in range(cfg.ppo_prompts * cfg.ppo_steps)
    ]
    with open(root / "prompts.jsonl", "w") as f:
        for row in prompts:
            f.write(json.dumps(row) + "\n")
    meta = {
        "config": asdict(cfg),
        "grpo": write_grpo_fixtures(cfg.grpo, root / "grpo", seed=cfg.seed),
        "root": str(root),
        "tokenizer": str(tok_dir),
        "policy": str(root / "policy"),
        "reward_model": str(root / "reward_model"),
        "pairs": str(root / "pairs.jsonl"),
        "prompts": str(root / "prompts.jsonl"),
        "vocab_size": len(tokenizer),
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
    }
    meta_file.write_text(json.dumps(meta, indent=1))
    return meta


def write_grpo_fixtures(shape: GRPOShape, root: Path, *, seed: int) -> dict:
    """The word testbed (prompts, tokenizer, initial policy of ``shape.model_size``, task.json for the gold
    reward), plus one step's worth of distinct prompts and fixed completions for the step-1 parity check.

    The completions are the testbed's words (so their gold rewards differ within a group and the advantages
    are not all 0), half of them ending with EOS at a random length and half cut at ``new_tokens`` without
    one, as sampling would leave them, so the check covers both masks and uneven lengths.
    """
    steps_prompts = shape.prompts * shape.steps
    sizes = SplitSizes(1, 1, 1, 1, max(steps_prompts, 4 * shape.prompts), 1)
    task = write_testbed(root, TaskConfig(seed=seed), sizes, model_size=shape.model_size)
    tokenizer = AutoTokenizer.from_pretrained(root / "init_policy")
    rows = [json.loads(line)["prompt"] for line in open(root / "prompts_train.jsonl")]
    with open(root / "prompts.jsonl", "w") as f:
        for text in rows[:steps_prompts]:
            f.write(json.dumps({"prompt": text}) + "\n")
    distinct = list(dict.fromkeys(rows))[: shape.prompts]
    rng = random.Random(f"grpo-completions-{seed}")
    replay = []
    for text in distinct:
        completions = []
        for _ in range(shape.generations):
            ended = rng.random() < 0.5
            length = rng.randint(1, shape.new_tokens - 1) if ended else shape.new_tokens
            ids: list[int] = []
            while len(ids) < length:
                ids += tokenizer(" " + rng.choice(task.words), add_special_tokens=False)["input_ids"]
            completions.append(ids[:length] + ([tokenizer.eos_token_id] if ended else []))
        replay.append(
            {"prompt": text, "prompt_ids": prompt_token_ids(tokenizer, text), "completions": completions}
        )
    with open(root / "check_prompts.jsonl", "w") as f:
        for row in replay:
            f.write(json.dumps({"prompt": row["prompt"]}) + "\n")
    (root / "completions.json").write_text(json.dumps(replay))
    return {
        "root": str(root),
        "policy": str(root / "init_policy"),
        "task_dir": str(root),
        "prompts": str(root / "prompts.jsonl"),
        "check_prompts": str(root / "check_prompts.jsonl"),
        "completions": str(root / "completions.json"),
        "vocab_size": len(tokenizer),
        "policy_parameters": sum(
            p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "init_policy").parameters()
        ),
    }
