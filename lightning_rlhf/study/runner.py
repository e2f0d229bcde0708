"""The study's jobs: one per seed (every method) and one per (behaviour shift, seed) of the shift sweep.

A job trains on its own testbed folder and writes ``result.json`` there; a finished job is not run again,
so an interrupted study resumes where it stopped. Jobs are independent processes (``--jobs``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.callbacks import RewardCurve
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.pipeline import (
    StageSettings,
    read_prompts,
    train_dpo,
    train_iterative_dpo,
    train_ppo,
    train_reward_model,
    train_sft,
)
from lightning_rlhf.rollout.generation import SamplingConfig, generate_texts
from lightning_rlhf.rollout.scoring import score_texts
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.reward import GoldReward
from lightning_rlhf.testbed.task import TaskConfig

# name -> what the table says about it. "sft" is where every method starts.
METHODS: dict[str, str] = {
    "sft": "SFT policy (every method starts here)",
    "dpo": "DPO on the offline pairs",
    "dpo_sft": "SFT on the preferred responses, then DPO",
    "dpo_iter": "DPO-Iter (fresh samples paired by the reward model)",
    "ppo_naive": "PPO naive: small rollout batch, raw advantages, fixed reference",
    "ppo_adv_norm": "PPO naive + advantage normalization",
    "ppo_large_batch": "PPO naive + large rollout batch",
    "ppo_ema": "PPO naive + EMA reference",
    "ppo_paper": "PPO with all three (the paper's recipe)",
}
SHIFT_METHODS = ("sft", "dpo", "ppo_paper")
# PPO variants: (large rollout batch, advantage normalization, EMA reference).
PPO_TRICKS = {
    "ppo_naive": (False, False, False),
    "ppo_adv_norm": (False, True, False),
    "ppo_large_batch": (True, False, False),
    "ppo_ema": (False, False, True),
    "ppo_paper": (True, True, True),
}


@dataclass(frozen=True)
class StudySettings:
    """Everything one study run depends on (stored in the JSON next to the numbers)."""

    stages: StageSettings = field(default_factory=StageSettings)
    methods: tuple[str, ...] = tuple(METHODS)
    """Methods of the main runs ("sft" is always evaluated: the win rates are against it)."""
    sizes: SplitSizes = field(default_factory=SplitSizes)
    seeds: tuple[int, ...] = (0, 1, 2)
    shifts: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
    """Behaviour shifts of the sweep; TaskConfig's default (1.0) is the shift of the main runs."""
    shift_seeds: tuple[int, ...] = (0,)
    small_rollout_batch: int = 64
    """The naive PPO's rollout batch (the large one is ``stages.ppo_rollout_batch``)."""
    eval_samples: int = 4
    """Samples per held-out prompt in the final evaluation."""
    curve_prompts: int = 32
    curve_points: int = 10
    """About how many points each gold-reward curve gets."""
    model_size: str = "tiny"


def _every(total_batches: int, points: int) -> int:
    return max(1, total_batches // points)


def _curve(out: Path, s: StudySettings, total_batches: int, seed: int) -> RewardCurve:
    prompts = read_prompts(out / "prompts_eval.jsonl")[: s.curve_prompts]
    return RewardCurve(
        prompts,
        GoldReward(str(out)),
        AutoTokenizer.from_pretrained(out / "tokenizer"),
        every_n_batches=_every(total_batches, s.curve_points),
        max_new_tokens=s.stages.max_new_tokens,
        seed=seed,
    )


def _rows(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for _ in f)


def write_chosen_sft_file(out: Path) -> str:
    """The preferred responses of the training pairs as prompt/completion rows (SFT before DPO)."""
    name = "sft_chosen_train.jsonl"
    with (
        (out / "pairs_train.jsonl").open(encoding="utf-8") as src,
        (out / name).open("w", encoding="utf-8") as dst,
    ):
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen"]}) + "\n")
    return name


def evaluate_policies(out: Path, s: StudySettings, folders: dict[str, str], seed: int) -> dict[str, dict]:
    """Mean gold reward, win rate against the SFT policy under the gold reward, and reward-model score.

    Every policy samples ``eval_samples`` responses per held-out prompt with the same seed; a win compares
    the policy's i-th sample with the SFT policy's i-th sample for the same prompt (a tie counts half).
    """
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    gold = GoldReward(str(out))
    prompts = [p for p in read_prompts(out / "prompts_eval.jsonl") for _ in range(s.eval_samples)]
    sampling = SamplingConfig(max_new_tokens=s.stages.max_new_tokens)
    golds: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for name, folder in folders.items():
        policy = load_causal_lm(str(out / folder))
        texts = generate_texts(policy, tokenizer, prompts, sampling, seed=seed).texts
        golds[name] = gold(prompts, texts)
        k = s.eval_samples  # prompt-major: prompt i's samples at i * k .. i * k + k - 1
        results[name] = {
            "gold_reward": sum(golds[name]) / len(prompts),
            "gold_per_prompt": [sum(golds[name][i : i + k]) / k for i in range(0, len(prompts), k)],
            "rm_score": float(score_texts(reward_model, tokenizer, prompts, texts).mean()),
        }
    for name, values in golds.items():
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(values, golds["sft"], strict=True)]
        results[name]["win_rate_vs_sft"] = sum(wins) / len(wins)
    return results


def _prepare(out: Path, s: StudySettings, seed: int, shift: float) -> float:
    """Testbed, SFT policy and reward model of one job; returns the reward model's pairwise accuracy."""
    write_testbed(out, TaskConfig(seed=seed, behaviour_shift=shift), s.sizes, model_size=s.model_size)
    train_sft(out, s.stages, seed, validate=False)
    return train_reward_model(out, s.stages, seed)


def _train_method(out: Path, s: StudySettings, name: str, seed: int) -> list[dict]:
    """Train one method from the SFT policy into ``<name>_policy``; returns its gold-reward curve."""
    st = s.stages
    pair_batches = st.dpo_epochs * math.ceil(_rows(out / "pairs_train.jsonl") / st.batch_size)
    prompt_rows = _rows(out / "prompts_train.jsonl")
    if name in ("dpo", "dpo_sft"):
        curve = _curve(out, s, pair_batches, seed)
        init = "sft_policy"
        if name == "dpo_sft":
            init = "sft_chosen_policy"
            train_sft(
                out,
                st,
                seed,
                init="sft_policy",
                train_file=write_chosen_sft_file(out),
                save_as=init,
                validate=False,
            )
        train_dpo(out, st, seed, init=init, save_as=f"{name}_policy", callbacks=[curve], validate=False)
    elif name == "dpo_iter":
        curve = _curve(out, s, st.iterative_dpo_epochs * (prompt_rows // st.batch_size), seed)
        train_iterative_dpo(out, st, seed, callbacks=[curve])
    elif name in PPO_TRICKS:
        large, normalize, ema = PPO_TRICKS[name]
        batch = st.ppo_rollout_batch if large else s.small_rollout_batch
        curve = _curve(out, s, st.ppo_epochs * (prompt_rows // batch), seed)
        train_ppo(
            out,
            st,
            seed,
            rollout_batch=batch,
            normalize_advantages=normalize,
            ema_reference=ema,
            save_as=f"{name}_policy",
            callbacks=[curve],
        )
    else:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return curve.history


def run_job(out: Path, s: StudySettings, seed: int, shift: float | None = None) -> dict:
    """One seed of every method (``shift=None``: the task's default shift) or one point of the sweep."""
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    start = time.perf_counter()
    methods = ("sft", *(m for m in s.methods if m != "sft")) if shift is None else SHIFT_METHODS
    accuracy = _prepare(out, s, seed, TaskConfig.behaviour_shift if shift is None else shift)
    curves = {}
    for name in methods:
        if name != "sft":
            curves[name] = _train_method(out, s, name, seed)
    folders = {name: "dpo_iter_policy" if name == "dpo_iter" else f"{name}_policy" for name in methods}
    result = {
        "seed": seed,
        "behaviour_shift": TaskConfig.behaviour_shift if shift is None else shift,
        "reward_model_accuracy": accuracy,
        "policies": evaluate_policies(out, s, folders, seed),
        "curves": curves,
        "seconds": time.perf_counter() - start,
    }
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def settings_dict(s: StudySettings) -> dict:
    return asdict(s)
