"""Write the testbed to disk as ordinary files, so it goes through the same data path as a user's dataset.

Layout of ``out_dir``::

    tokenizer/                 save_pretrained folder (byte-level BPE + chat template)
    init_policy/               a randomly initialised causal LM + tokenizer (save_pretrained folder)
    sft_train.jsonl            {"prompt", "completion"}   demonstrations (mediocre gold reward)
    sft_eval.jsonl
    pairs_train.jsonl          {"prompt", "chosen", "rejected"}   Bradley-Terry labelled behaviour pairs
    pairs_eval.jsonl
    prompts_train.jsonl        {"prompt"}   for PPO and iterative DPO
    prompts_eval.jsonl         held-out prompts, disjoint from every training prompt
    task.json                  the hidden utilities, topics and knobs (for analysis, never for training)

:func:`write_program_testbed` writes the list-program task (:mod:`lightning_rlhf.testbed.programs`) in the
same layout; its prompt files also carry the rows' ``tests`` (hidden), ``public_tests`` and ``tier``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from lightning_rlhf.testbed.models import build_causal_lm
from lightning_rlhf.testbed.programs import (
    OPS,
    TIERS,
    ProgramProblem,
    ProgramsConfig,
    ProgramTask,
    fingerprint,
    passes,
)
from lightning_rlhf.testbed.task import _TEMPLATES, TaskConfig, WordTask
from lightning_rlhf.testbed.tokenizer import train_tokenizer


@dataclass(frozen=True)
class SplitSizes:
    """How many rows each file gets."""

    sft_train: int = 2000
    sft_eval: int = 200
    pairs_train: int = 4000
    pairs_eval: int = 1000
    prompts_train: int = 1024
    prompts_eval: int = 128


def tokenizer_corpus(task: WordTask) -> list[str]:
    """Every prompt shape and every word, in a fixed order (BPE training is order-sensitive)."""
    corpus = []
    for template in _TEMPLATES:
        for topic in task.topics:
            for n in range(task.config.min_request, task.config.max_request + 1):
                corpus.extend(template.format(n=n, topic=topic, avoid=w) for w in task.words)
    corpus.extend(" " + " ".join(task.words[i:] + task.words[:i]) for i in range(len(task.words)))
    return corpus


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _distinct_prompts(task: WordTask, rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    """``count`` distinct prompt texts that are not in ``exclude`` (so held-out prompts are really unseen)."""
    out: list[str] = []
    seen = set(exclude)
    for _ in range(count * 50):
        text = task.make_prompt(rng).text
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == count:
                return out
    raise ValueError(f"the task has too few distinct prompts for {count} held-out ones; enlarge num_words")


def write_testbed(
    out_dir: str | Path,
    config: TaskConfig | None = None,
    sizes: SplitSizes | None = None,
    *,
    model_size: str = "tiny",
) -> WordTask:
    """Generate the whole testbed into ``out_dir`` (created if missing) and return the task instance."""
    config = config or TaskConfig()
    sizes = sizes or SplitSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = WordTask(config)
    rng = random.Random(f"word-task-data-{config.seed}")

    eval_prompts = _distinct_prompts(task, rng, sizes.prompts_eval, exclude=set())
    held_out = set(eval_prompts)

    def train_prompts(count: int) -> list:
        prompts = []
        while len(prompts) < count:
            prompt = task.make_prompt(rng)
            if prompt.text not in held_out:
                prompts.append(prompt)
        return prompts

    sft = [
        {"prompt": p.text, "completion": task.sft_response(p, rng)} for p in train_prompts(sizes.sft_train)
    ]
    sft_eval = [
        {"prompt": p.text, "completion": task.sft_response(p, rng)} for p in train_prompts(sizes.sft_eval)
    ]
    pairs = [task.preference_pair(p, rng) for p in train_prompts(sizes.pairs_train + sizes.pairs_eval)]
    prompts = [{"prompt": p.text} for p in train_prompts(sizes.prompts_train)]

    write_jsonl(out / "sft_train.jsonl", sft)
    write_jsonl(out / "sft_eval.jsonl", sft_eval)
    write_jsonl(out / "pairs_train.jsonl", pairs[: sizes.pairs_train])
    write_jsonl(out / "pairs_eval.jsonl", pairs[sizes.pairs_train :])
    write_jsonl(out / "prompts_train.jsonl", prompts)
    write_jsonl(out / "prompts_eval.jsonl", [{"prompt": text} for text in eval_prompts])
    (out / "task.json").write_text(json.dumps(task.describe(), indent=1, sort_keys=True) + "\n")

    tokenizer = train_tokenizer(tokenizer_corpus(task))
    tokenizer.save_pretrained(out / "tokenizer")
    policy = build_causal_lm(model_size, tokenizer, seed=config.seed)
    policy.save_pretrained(out / "init_policy")
    tokenizer.save_pretrained(out / "init_policy")
    return task


def load_task(out_dir: str | Path) -> WordTask:
    """Rebuild the :class:`WordTask` of a testbed folder from its ``task.json``."""
    path = Path(out_dir) / "task.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: generate the testbed first (lightning-rlhf testbed --out DIR)"
        )
    return WordTask(TaskConfig(**json.loads(path.read_text())["config"]))


# --------------------------------------------------------------------------------------- the program task
@dataclass(frozen=True)
class ProgramSplitSizes:
    """How many rows each file of the program testbed gets (eval prompts: split evenly over the tiers)."""

    sft_train: int = 48000
    sft_eval: int = 150
    pairs_train: int = 2000
    pairs_eval: int = 300
    prompts_train: int = 1024
    prompts_eval: int = 150


def program_tokenizer_corpus(task: ProgramTask) -> list[str]:
    """Prompt scaffolding, every digit list shape and every op, in a fixed order (one token per op)."""
    rng = random.Random(f"program-corpus-{task.config.seed}")
    corpus = [" " + " ".join(ops) for ops in itertools.permutations(OPS, 2)]
    corpus += [task.sample(tier, rng).prompt for tier in TIERS for _ in range(40)]
    return corpus


def _mutant(problem: ProgramProblem, rng: random.Random) -> tuple[str, ...]:
    """The reference program with one operation replaced, failing the row's hidden tests."""
    for _ in range(1000):
        program = list(problem.program)
        program[rng.randrange(len(program))] = rng.choice(list(OPS))
        if not passes(program, problem.tests):
            return tuple(program)
    raise ValueError(f"no failing one-operation mutant of {problem.program}")  # pragma: no cover


def _program_text(program: tuple[str, ...]) -> str:
    return " " + " ".join(program)


def write_program_testbed(
    out_dir: str | Path,
    config: ProgramsConfig | None = None,
    sizes: ProgramSplitSizes | None = None,
    *,
    model_size: str = "tiny",
) -> ProgramTask:
    """Write the list-program task as ordinary files (same layout as :func:`write_testbed`).

    ``sft_*``: prompt / completion (the reference program); ``pairs_*``: the reference program against a
    one-operation mutant that fails the hidden tests; ``prompts_*``: prompt + ``tests`` (hidden, APPS-form
    JSON) + ``public_tests`` + ``tier``, the columns row-aware rewards read. The held-out prompts' programs
    (by semantics) appear in no training file, so evaluation asks for programs never demonstrated.
    """
    config = config or ProgramsConfig()
    sizes = sizes or ProgramSplitSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = ProgramTask(config)
    rng = random.Random(f"program-task-data-{config.seed}")
    tiers = list(config.tiers)

    # With unseen_eval_programs the held-out programs' semantics are excluded from every training file;
    # otherwise only the held-out prompts themselves are (a training row never repeats an evaluation row).
    held_out: set = set()
    eval_problems = [
        task.sample(tiers[i % len(tiers)], rng, seen=held_out if config.unseen_eval_programs else None)
        for i in range(sizes.prompts_eval)
    ]
    eval_prompts = {p.prompt for p in eval_problems}

    def train_problems(count: int) -> list[ProgramProblem]:
        problems = []
        while len(problems) < count:
            problem = task.sample(tiers[len(problems) % len(tiers)], rng)
            if fingerprint(problem.program) not in held_out and problem.prompt not in eval_prompts:
                problems.append(problem)
        return problems

    def prompt_row(problem: ProgramProblem) -> dict:
        return {
            "prompt": problem.prompt,
            "tests": json.dumps(problem.tests),
            "public_tests": json.dumps(problem.public_tests),
            "tier": problem.tier,
        }

    sft = [
        {"prompt": p.prompt, "completion": _program_text(p.program)} for p in train_problems(sizes.sft_train)
    ]
    sft_eval = [
        {"prompt": p.prompt, "completion": _program_text(p.program)} for p in train_problems(sizes.sft_eval)
    ]
    pairs = [
        {"prompt": p.prompt, "chosen": _program_text(p.program), "rejected": _program_text(_mutant(p, rng))}
        for p in train_problems(sizes.pairs_train + sizes.pairs_eval)
    ]
    write_jsonl(out / "sft_train.jsonl", sft)
    write_jsonl(out / "sft_eval.jsonl", sft_eval)
    write_jsonl(out / "pairs_train.jsonl", pairs[: sizes.pairs_train])
    write_jsonl(out / "pairs_eval.jsonl", pairs[sizes.pairs_train :])
    write_jsonl(out / "prompts_train.jsonl", [prompt_row(p) for p in train_problems(sizes.prompts_train)])
    write_jsonl(out / "prompts_eval.jsonl", [prompt_row(p) for p in eval_problems])
    (out / "task.json").write_text(
        json.dumps({"task": "programs", **dataclasses.asdict(config)}, indent=1, sort_keys=True) + "\n"
    )

    tokenizer = train_tokenizer(program_tokenizer_corpus(task), alphanumeric_words=True)
    tokenizer.save_pretrained(out / "tokenizer")
    policy = build_causal_lm(model_size, tokenizer, seed=config.seed)
    policy.save_pretrained(out / "init_policy")
    tokenizer.save_pretrained(out / "init_policy")
    return task
