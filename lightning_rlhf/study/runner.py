"""The study's jobs: one per (task, seed) with every arm of ``study/arms.py``, and one per (behaviour shift,
seed) of the word task's shift sweep.

A job trains on its own testbed folder. Each arm writes ``arms/<name>.json`` (its validation curve, best
point and seconds) next to its ``<name>_best`` and ``<name>_final`` policies, and the job writes
``result.json`` after the held-out evaluation; a rerun skips every finished arm and job, so an interrupted
study resumes where it stopped. Jobs are independent processes (``--jobs``).

The held-out prompts are split once per job by row parity: odd rows are the validation prompts (checkpoint
selection, DPO's learning rate), even rows the test prompts (every number of the report).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.pipeline import (
    PROGRAM_SETTINGS,
    StageSettings,
    read_prompts,
    train_dpo,
    train_iterative_dpo,
    train_ppo,
    train_reward_model,
    train_sft,
)
from lightning_rlhf.rollout.advantages import GRPO
from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
from lightning_rlhf.rollout.scoring import score_texts
from lightning_rlhf.study.arms import ARMS, CONTROLS, DPO_LEARNING_RATES, GRPO_GROUP, TASKS, Arm, task_arms
from lightning_rlhf.study.checkpoints import ValidationCheckpoints
from lightning_rlhf.testbed.files import (
    ProgramSplitSizes,
    SplitSizes,
    write_jsonl,
    write_program_testbed,
    write_testbed,
)
from lightning_rlhf.testbed.program_eval import per_prompt_pass_at_k, sample_programs, tier_report
from lightning_rlhf.testbed.programs import ProgramReward, ProgramsConfig
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig

SHIFT_ARMS = (*(f"dpo_lr{lr:g}" for lr in DPO_LEARNING_RATES), "ppo_D")
"""The shift sweep's arms: DPO (its grid, the validation pick scored) and the paper's PPO recipe."""
SHIFT_COLUMNS = ("sft", "dpo", "ppo_D")
"""What the shift table reports per point ("dpo" is the pick)."""
PROGRAM_PASS_K = (1, 5, 10)
PROGRAM_SUBMISSIONS = 10
"""n of the reported n@k: up to 10 submissions of the k samples (the full study: 10@64, the paper's form)."""
PAIRED_PASS_K = 5
"""Programs are compared per prompt by pass@5 (the paper's APPS metric in its Table 3)."""


@dataclass(frozen=True)
class StudySettings:
    """Everything one study run depends on (stored in the JSON next to the numbers)."""

    tasks: tuple[str, ...] = TASKS
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)
    control_seeds: tuple[int, ...] | None = None
    """Seeds on which the control arms (``arms.CONTROLS``) run (None: every seed)."""
    samples: dict[str, int] = field(default_factory=lambda: {"words": 4096, "programs": 4096})
    """Responses every on-policy arm samples for training, per task."""
    ema_sft_share: float = 0.5
    """Share of the SFT weights left in every EMA reference at the end (η per sample set from it)."""
    iterative_dpo_rounds: int = 4
    iterative_dpo_epochs: int = 2
    """DPO passes over each round's pairs."""
    word_stages: StageSettings = field(default_factory=lambda: StageSettings(ppo_rollout_batch=512))
    program_stages: StageSettings = PROGRAM_SETTINGS
    word_sizes: SplitSizes = field(default_factory=lambda: SplitSizes(prompts_eval=256))
    program_sizes: ProgramSplitSizes = field(default_factory=lambda: ProgramSplitSizes(prompts_eval=180))
    shifts: tuple[float, ...] = (0.0, 3.0)
    """Behaviour shifts of the word task's sweep; TaskConfig's default (1.0) is the main runs' shift."""
    shift_seeds: tuple[int, ...] = (0,)
    checkpoints: int = 8
    """Validation points per arm after the start (the best one is the arm's selected checkpoint)."""
    validation_samples: dict[str, int] = field(default_factory=lambda: {"words": 2, "programs": 4})
    eval_samples: dict[str, int] = field(default_factory=lambda: {"words": 4, "programs": 64})
    """Samples per test prompt in the final evaluation."""
    batch_scale: int = 1
    """Every arm's prompts per rollout are divided by this (the smoke run: 8 and 64 instead of 64 and 512)."""
    model_size: str = "tiny"

    def __post_init__(self) -> None:
        for task in self.tasks:
            task_arms(task, self.arms)  # names the unknown task or arm
            if task not in self.samples:
                raise ValueError(f"StudySettings.samples has no budget for task {task!r}")
        if any(ARMS[a].prompts_per_rollout % self.batch_scale for a in self.arms):
            raise ValueError(f"StudySettings.batch_scale {self.batch_scale} must divide every arm's batch")
        for task in self.tasks:
            budget = self.samples[task]
            for name in task_arms(task, self.arms):
                rollout = self.rollout(task, name)
                if rollout is None:
                    continue
                prompts, batch = rollout
                if prompts < 1 or budget % batch:
                    raise ValueError(
                        f"the {task} budget of {budget} samples must be a multiple of arm {name}'s "
                        f"{max(batch, 1)} samples per rollout (set --samples to a multiple of 512)"
                    )
        if not 0 < self.ema_sft_share < 1:
            raise ValueError(f"StudySettings.ema_sft_share must be in (0, 1) (got {self.ema_sft_share})")

    def stages(self, task: str) -> StageSettings:
        return self.program_stages if task == "programs" else self.word_stages

    def rollout(self, task: str, name: str) -> tuple[int, int] | None:
        """(prompts, sampled responses) of one batch of on-policy arm ``name`` on ``task`` (None: offline
        DPO). A DPO-Iter batch is one round: the budget over ``iterative_dpo_rounds``, 4 samples a prompt."""
        arm = ARMS[name]
        if arm.kind == "dpo":
            return None
        if arm.kind == "dpo_iter":
            prompts = self.samples[task] // (self.iterative_dpo_rounds * 4)
            return prompts, 4 * prompts
        prompts = arm.prompts_per_rollout // self.batch_scale
        return prompts, prompts * (GRPO_GROUP if arm.kind == "grpo" else 1)


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_held_out(out: Path) -> None:
    """``prompts_eval.jsonl`` -> ``prompts_val.jsonl`` (odd rows) and ``prompts_test.jsonl`` (even rows)."""
    rows = _rows(out / "prompts_eval.jsonl")
    write_jsonl(out / "prompts_val.jsonl", rows[1::2])
    write_jsonl(out / "prompts_test.jsonl", rows[0::2])


def schedule(samples: int, per_batch: int, dataset_rows: int, prompts_per_batch: int) -> tuple[int, int]:
    """(epochs, batches per epoch) so that training samples exactly ``samples`` responses, ``per_batch`` per
    batch of ``prompts_per_batch`` prompts from a prompt file of ``dataset_rows`` rows."""
    if samples % per_batch:
        raise ValueError(
            f"the study's budget of {samples} samples is not a multiple of a batch's {per_batch}"
        )
    batches = samples // per_batch
    per_epoch = dataset_rows // prompts_per_batch
    if batches <= per_epoch:
        return 1, batches
    if batches % per_epoch:
        raise ValueError(
            f"{batches} batches of {prompts_per_batch} prompts do not fill whole epochs of "
            f"{dataset_rows} rows"
        )
    return batches // per_epoch, per_epoch


def _validation(out: Path, s: StudySettings, task: str, seed: int):
    """(prompts repeated per validation sample, prompt-major; reward function on them)."""
    k = s.validation_samples[task]
    rows = _rows(out / "prompts_val.jsonl")
    prompts = [row["prompt"] for row in rows for _ in range(k)]
    if task == "words":
        return prompts, GoldReward(str(out))
    tests = [row["tests"] for row in rows for _ in range(k)]
    scorer = ProgramReward()
    return prompts, lambda p, r: scorer(p, r, tests=tests)


def _checkpoints(out: Path, s: StudySettings, task: str, seed: int, batches: int, per_batch: int):
    prompts, reward = _validation(out, s, task, seed)
    return ValidationCheckpoints(
        prompts,
        reward,
        AutoTokenizer.from_pretrained(out / "tokenizer"),
        every_n_batches=max(1, batches // s.checkpoints),
        samples_per_batch=per_batch,
        max_new_tokens=s.stages(task).max_new_tokens,
        seed=seed,
    )


def _exact(task: str, arm: Arm) -> ProgramReward | None:
    return ProgramReward(pass_score=arm.pass_score) if task == "programs" else None


def train_arm(out: Path, s: StudySettings, task: str, name: str, seed: int) -> dict:
    """Train one arm from the SFT policy into ``<name>_final`` (and ``<name>_best``); returns its record."""
    record_file = out / "arms" / f"{name}.json"
    if record_file.is_file() and (out / f"{name}_best").is_dir() and (out / f"{name}_final").is_dir():
        return json.loads(record_file.read_text())
    start = time.perf_counter()
    arm, st = ARMS[name], s.stages(task)
    budget = s.samples[task]
    prompt_rows = len(_rows(out / "prompts_train.jsonl"))
    final = f"{name}_final"
    if arm.kind == "dpo":
        pairs = len(_rows(out / "pairs_train.jsonl"))
        batches = st.dpo_epochs * math.ceil(pairs / st.batch_size)
        curve = _checkpoints(out, s, task, seed, batches, 0)
        train_dpo(out, st, seed, save_as=final, callbacks=[curve], validate=False, learning_rate=arm.dpo_lr)
    elif arm.kind == "dpo_iter":
        per_round, per_batch = s.rollout(task, name)
        epochs, per_epoch = schedule(budget, per_batch, prompt_rows, per_round)
        curve = _checkpoints(out, s, task, seed, epochs * per_epoch, per_batch)
        train_iterative_dpo(
            out,
            st,
            seed,
            callbacks=[curve],
            exact_reward=_exact(task, arm),
            prompts_per_iteration=per_round,
            dpo_epochs=s.iterative_dpo_epochs,
            epochs=epochs,
            limit_iterations=per_epoch,
            save_as=final,
        )
    else:
        batch, per_batch = s.rollout(task, name)
        epochs, per_epoch = schedule(budget, per_batch, prompt_rows, batch)
        curve = _checkpoints(out, s, task, seed, epochs * per_epoch, per_batch)
        train_ppo(
            out,
            st,
            seed,
            rollout_batch=batch,
            normalize_advantages=arm.normalize_advantages,
            ema_reference=arm.ema_reference,
            # (1 - eta)^budget = the SFT share left in the reference after every sample of the budget
            ema_decay_per_sample=1 - s.ema_sft_share ** (1 / budget),
            save_as=final,
            callbacks=[curve],
            exact_reward=_exact(task, arm),
            learning_rate=st.ppo_lr * arm.lr_scale,
            value_normalization=arm.kind == "ppo",
            advantage=GRPO(scale_rewards=True) if arm.kind == "grpo" else None,
            num_generations=per_batch // batch,
            epochs=epochs,
            limit_rollouts=per_epoch,
        )
    if (out / f"{name}_best").exists():
        shutil.rmtree(out / f"{name}_best")
    curve.save_best(out / f"{name}_best")
    record = {
        "curve": curve.history,
        "best_point": curve.best_point,
        "best_validation": curve.history[curve.best_point]["reward"],
        "seconds": time.perf_counter() - start,
    }
    record_file.parent.mkdir(exist_ok=True)
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def pick_dpo(records: dict[str, dict]) -> str | None:
    """The DPO grid's arm with the best validation score at its best checkpoint (ties: the smaller lr)."""
    grid = [f"dpo_lr{lr:g}" for lr in DPO_LEARNING_RATES if f"dpo_lr{lr:g}" in records]
    if not grid:
        return None
    return max(grid, key=lambda name: (records[name]["best_validation"], -ARMS[name].dpo_lr))


def evaluate_words(out: Path, s: StudySettings, folders: dict[str, str], seed: int) -> dict[str, dict]:
    """Mean gold reward, win rate against the SFT policy under the gold reward, and reward-model score.

    Every policy samples ``eval_samples`` responses per test prompt with the same seed; a win compares
    the policy's i-th sample with the SFT policy's i-th sample for the same prompt (a tie counts half).
    """
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    gold = GoldReward(str(out))
    k = s.eval_samples["words"]
    prompts = [p for p in read_prompts(out / "prompts_test.jsonl") for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=s.word_stages.max_new_tokens)
    golds: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for name, folder in folders.items():
        policy = load_causal_lm(str(out / folder))
        texts = generate_texts(policy, tokenizer, prompts, sampling, seed=seed).texts
        golds[name] = gold(prompts, texts)
        results[name] = {
            "gold_reward": sum(golds[name]) / len(prompts),
            # prompt-major: prompt i's samples at i * k .. i * k + k - 1
            "per_prompt": [sum(golds[name][i : i + k]) / k for i in range(0, len(prompts), k)],
            "rm_score": float(score_texts(reward_model, tokenizer, prompts, texts).mean()),
        }
    for name, values in golds.items():
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(values, golds["sft"], strict=True)]
        results[name]["win_rate_vs_sft"] = sum(wins) / len(wins)
    return results


def evaluate_program_policies(out: Path, s: StudySettings, folders: dict[str, str], seed: int) -> dict:
    """pass@1/5/10, 10@64, parse and false-positive rates per tier; ``per_prompt``: pass@5 per test prompt."""
    k = s.eval_samples["programs"]
    pass_k = tuple(x for x in PROGRAM_PASS_K if x <= k)
    n_at_k = (f"{PROGRAM_SUBMISSIONS}@{k}",) if k >= PROGRAM_SUBMISSIONS else ()
    samples, tiers = sample_programs(
        {name: str(out / folder) for name, folder in folders.items()},
        str(out / "prompts_test.jsonl"),
        num_samples=k,
        n_at_k=n_at_k,
        seed=seed,
    )
    report = tier_report(samples, tiers, num_samples=k, pass_k=pass_k, n_at_k=n_at_k)
    return {
        policy.name: {
            "tiers": report[policy.name],
            "per_prompt": per_prompt_pass_at_k(policy, k, min(PAIRED_PASS_K, k)),
        }
        for policy in samples
    }


def _prepare(out: Path, s: StudySettings, task: str, seed: int, shift: float) -> float | None:
    """Testbed, SFT policy (and the word task's reward model: its pairwise accuracy is returned)."""
    st = s.stages(task)
    if not (out / "sft_policy").is_dir():
        if task == "words":
            write_testbed(
                out, TaskConfig(seed=seed, behaviour_shift=shift), s.word_sizes, model_size=s.model_size
            )
        else:
            write_program_testbed(out, ProgramsConfig(seed=seed), s.program_sizes, model_size=s.model_size)
        split_held_out(out)
        train_sft(out, st, seed, validate=False)
    accuracy_file = out / "reward_model_accuracy.json"
    if task == "programs":
        return None
    if not accuracy_file.is_file():
        accuracy_file.write_text(json.dumps(train_reward_model(out, st, seed)) + "\n")
    return float(json.loads(accuracy_file.read_text()))


def run_job(out: Path, s: StudySettings, task: str, seed: int, shift: float | None = None) -> dict:
    """One (task, seed) with every arm (``shift=None``) or one point of the word task's shift sweep."""
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    start = time.perf_counter()
    behaviour_shift = TaskConfig.behaviour_shift if shift is None else shift
    names = task_arms(task, s.arms) if shift is None else SHIFT_ARMS
    if shift is None and s.control_seeds is not None and seed not in s.control_seeds:
        names = tuple(n for n in names if n not in CONTROLS)
    accuracy = _prepare(out, s, task, seed, behaviour_shift)
    records = {name: train_arm(out, s, task, name, seed) for name in names}
    dpo = pick_dpo(records)
    # Only the DPO grid's pick is scored on the test prompts (the others lost on validation); a best
    # checkpoint that is the last point is the final policy, scored once.
    scored = [n for n in names if ARMS[n].kind != "dpo" or n == dpo]
    folders = {"sft": "sft_policy"}
    for name in scored:
        folders[f"{name}/final"] = f"{name}_final"
        if records[name]["best_point"] != len(records[name]["curve"]) - 1:
            folders[f"{name}/best"] = f"{name}_best"
    evaluate = evaluate_words if task == "words" else evaluate_program_policies
    scores = evaluate(out, s, folders, seed)
    for name in scored:
        scores.setdefault(f"{name}/best", scores[f"{name}/final"])
    result = {
        "task": task,
        "seed": seed,
        "behaviour_shift": behaviour_shift if task == "words" else None,
        "reward_model_accuracy": accuracy,
        "dpo_pick": dpo,
        "arms": records,
        "scores": scores,
        "seconds": time.perf_counter() - start,
    }
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def settings_dict(s: StudySettings) -> dict:
    return asdict(s)
