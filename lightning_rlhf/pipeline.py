"""The testbed's training stages as functions: SFT, reward model, DPO, DPO-Iter and PPO on a testbed folder.

``lightning-rlhf quickstart`` chains them once; ``lightning-rlhf study`` (the paper study) runs them with
ablations, several seeds and a gold-reward curve. Each stage is an ordinary Lightning fit of a package
module on the testbed's jsonl files and saves its model as a ``save_pretrained`` folder inside the testbed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lightning_rlhf.callbacks import AdvantageNormalization, EMAReferenceUpdate
from lightning_rlhf.data.preference import PreferenceDataModule
from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule
from lightning_rlhf.losses import SigmoidDPOLoss
from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.modules.iterative_dpo import IterativeDPOModule
from lightning_rlhf.modules.ppo import PPOModule
from lightning_rlhf.modules.reward import RewardModule
from lightning_rlhf.modules.sft import SFTModule
from lightning_rlhf.rollout.advantages import AdvantageEstimator
from lightning_rlhf.testbed.reward import GoldReward


@dataclass(frozen=True)
class StageSettings:
    """Epochs and learning rates of each stage (tiny models like high learning rates)."""

    sft_epochs: int = 3
    sft_lr: float = 3e-3
    sft_grad_clip: float | None = None  # gradient norm clip of the SFT stage (None: off)
    reward_epochs: int = 3
    reward_lr: float = 3e-4
    dpo_epochs: int = 2
    dpo_lr: float = 1e-3
    dpo_beta: float = 0.1  # the paper's DPO beta
    batch_size: int = 32
    max_new_tokens: int = 12
    iterative_dpo_epochs: int = 1  # 32 iterations of 32 prompts x 4 samples
    iterative_dpo_lr: float = 3e-4
    ppo_epochs: int = 12  # 24 rollouts of 512 prompts (the paper's rollout batch)
    ppo_rollout_batch: int = 512
    ppo_lr: float = 1e-4
    ppo_critic_lr: float = 1e-3
    ppo_kl_coef: float = 0.1
    ppo_ema_decay: float = 0.05


PROGRAM_SETTINGS = StageSettings(
    sft_epochs=1,  # one pass over 48000 fresh demonstrations (1500 steps): more problems, not more epochs
    sft_lr=1e-3,
    sft_grad_clip=1.0,
    max_new_tokens=10,  # a program is at most 8 ops, one token each, then EOS
    ppo_epochs=4,  # 8 rollouts of 512 prompts
)
"""The program testbed's stages (``quickstart --task programs``, ``benchmarks/program_calibration.py``):
the SFT settings are the calibration's (README "The program testbed"), fixed before any RL was run."""


def read_prompts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


def fit(
    module: L.LightningModule,
    data: L.LightningDataModule,
    epochs: int,
    seed: int,
    callbacks: list | None = None,
    *,
    validate: bool = True,
    gradient_clip_val: float | None = None,
    limit_train_batches: int | None = None,
) -> L.Trainer:
    """One quiet, deterministic CPU fit; ``validate=False`` skips the validation loop (the study scores
    policies with the gold reward instead, and validation is a large share of a tiny model's time)."""
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
        limit_val_batches=None if validate else 0,
        limit_train_batches=limit_train_batches,
        gradient_clip_val=gradient_clip_val,
    )
    trainer.fit(module, data)
    return trainer


def preference_data(out: Path, settings: StageSettings, seed: int) -> PreferenceDataModule:
    return PreferenceDataModule(
        tokenizer=str(out / "tokenizer"),
        train_file=str(out / "pairs_train.jsonl"),
        val_file=str(out / "pairs_eval.jsonl"),
        max_length=128,
        batch_size=settings.batch_size,
        seed=seed,
        apply_chat_template=False,  # the testbed rows are plain text; its chat template is for chat data
    )


def train_sft(
    out: Path,
    settings: StageSettings,
    seed: int,
    *,
    init: str = "init_policy",
    train_file: str = "sft_train.jsonl",
    save_as: str = "sft_policy",
    callbacks: list | None = None,
    validate: bool = True,
) -> None:
    """SFT of the folder ``init`` on ``train_file`` (prompt/completion rows), saved as ``save_as``."""
    s = settings
    module = SFTModule(str(out / init), learning_rate=s.sft_lr)
    data = SFTDataModule(
        str(out / "tokenizer"),
        str(out / train_file),
        str(out / "sft_eval.jsonl"),
        batch_size=s.batch_size,
        apply_chat_template=False,
    )
    fit(module, data, s.sft_epochs, seed, callbacks, validate=validate, gradient_clip_val=s.sft_grad_clip)
    module.save_pretrained(out / save_as)


def train_reward_model(out: Path, settings: StageSettings, seed: int) -> float:
    """The reward model, from the SFT policy, on the pairs; returns its held-out pairwise accuracy."""
    reward = RewardModule(str(out / "sft_policy"), learning_rate=settings.reward_lr)
    trainer = fit(reward, preference_data(out, settings, seed), settings.reward_epochs, seed)
    reward.save_pretrained(out / "reward_model")
    return float(trainer.callback_metrics["val/accuracy"])


def train_dpo(
    out: Path,
    settings: StageSettings,
    seed: int,
    *,
    init: str = "sft_policy",
    save_as: str = "dpo_policy",
    callbacks: list | None = None,
    validate: bool = True,
    learning_rate: float | None = None,
) -> None:
    """Offline DPO on the pairs from (and with the reference) ``init``, reference log-probs cached;
    ``learning_rate`` replaces the settings' ``dpo_lr``."""
    s = settings
    module = DPOModule(
        str(out / init),
        loss=SigmoidDPOLoss(beta=s.dpo_beta),
        learning_rate=learning_rate or s.dpo_lr,
        precompute_reference=True,
        # One cache per reference model; the quickstart's SFT reference keeps its historical folder name.
        reference_cache_dir=str(out / ("reference_logps" if init == "sft_policy" else f"reference_{init}")),
    )
    fit(module, preference_data(out, s, seed), s.dpo_epochs, seed, callbacks, validate=validate)
    module.save_pretrained(out / save_as)


def _reward_sources(out: Path, exact_reward: Callable | None) -> dict:
    """The on-policy stages' rewards: the reward model (gold reward logged) or the task's exact reward."""
    if exact_reward is not None:
        return {"reward_function": exact_reward}
    # The gold reward is logged during training, never trained on.
    return {"reward_model": str(out / "reward_model"), "gold_function": GoldReward(str(out))}


def train_iterative_dpo(
    out: Path,
    settings: StageSettings,
    seed: int,
    *,
    callbacks: list | None = None,
    exact_reward: Callable | None = None,
    prompts_per_iteration: int | None = None,
    dpo_epochs: int = 1,
    epochs: int | None = None,
    limit_iterations: int | None = None,
    save_as: str = "dpo_iter_policy",
) -> None:
    """DPO-Iter: fresh samples of the policy, paired by the reward model (or by ``exact_reward``, e.g. the
    program task's tests: the paper's APPS recipe), from the SFT policy. An iteration samples 4 responses
    for each of ``prompts_per_iteration`` prompts (default ``batch_size``), trains ``dpo_epochs`` passes of
    ``batch_size`` mini-batches on the pairs, then makes the policy the next iteration's reference; large
    iterations are the paper's rounds."""
    s = settings
    sft_dir = str(out / "sft_policy")
    per_iteration = prompts_per_iteration or s.batch_size
    module = IterativeDPOModule(
        sft_dir,
        **_reward_sources(out, exact_reward),
        loss=SigmoidDPOLoss(beta=s.dpo_beta),
        num_samples=4,
        dpo_epochs=dpo_epochs,
        max_new_tokens=s.max_new_tokens,
        mini_batch_size=s.batch_size,
        micro_batch_size=s.batch_size,
        generation_batch_size=4 * s.batch_size,
        learning_rate=s.iterative_dpo_lr,
    )
    prompts = PromptDataModule(
        sft_dir,
        str(out / "prompts_train.jsonl"),
        batch_size=per_iteration,
        seed=seed,
        apply_chat_template=False,
    )
    fit(
        module,
        prompts,
        epochs or s.iterative_dpo_epochs,
        seed,
        callbacks,
        limit_train_batches=limit_iterations,
    )
    module.save_pretrained(out / save_as)


def train_ppo(
    out: Path,
    settings: StageSettings,
    seed: int,
    *,
    rollout_batch: int | None = None,
    normalize_advantages: bool = True,
    ema_reference: bool = True,
    save_as: str = "ppo_policy",
    callbacks: list | None = None,
    exact_reward: Callable | None = None,
    learning_rate: float | None = None,
    ema_decay_per_sample: float | None = None,
    value_normalization: bool = False,
    advantage: AdvantageEstimator | None = None,
    num_generations: int = 1,
    epochs: int | None = None,
    limit_rollouts: int | None = None,
) -> None:
    """PPO against the reward model (or ``exact_reward``, no reward model: the critic then starts from the
    policy) from the SFT policy; the defaults are the paper's recipe (a 512-prompt rollout batch, advantage
    normalization, an EMA reference). Every rollout is split into 4 mini-batches whatever its size, so a
    smaller rollout batch also means smaller, noisier and more frequent updates.

    The study's knobs: ``learning_rate`` (default the settings' ``ppo_lr``), an EMA with η per sampled
    sequence (``ema_decay_per_sample``, else the settings' η per rollout), the critic's value
    normalization, an ``advantage`` estimator (GRPO, RLOO: no critic) with ``num_generations`` responses per
    prompt, ``epochs`` over the prompts (default the settings' ``ppo_epochs``) and ``limit_rollouts`` per
    epoch."""
    s = settings
    rollout_batch = rollout_batch or s.ppo_rollout_batch
    sequences = rollout_batch * num_generations
    sft_dir = str(out / "sft_policy")
    module = PPOModule(
        sft_dir,
        **_reward_sources(out, exact_reward),
        max_new_tokens=s.max_new_tokens,
        mini_batch_size=sequences // 4,
        micro_batch_size=max(1, sequences // 8),
        kl_coef=s.ppo_kl_coef,
        gamma=1.0,
        lam=1.0,
        score_clip=20.0,
        learning_rate=learning_rate or s.ppo_lr,
        critic_learning_rate=s.ppo_critic_lr,
        value_normalization=value_normalization,
        advantage=advantage,
        num_generations=num_generations,
    )
    prompts = PromptDataModule(
        sft_dir,
        str(out / "prompts_train.jsonl"),
        batch_size=rollout_batch,
        seed=seed,
        apply_chat_template=False,
    )
    tricks = [AdvantageNormalization()] if normalize_advantages else []
    if ema_reference:
        ema = (
            EMAReferenceUpdate(decay_per_sample=ema_decay_per_sample)
            if ema_decay_per_sample is not None
            else EMAReferenceUpdate(decay=s.ppo_ema_decay)
        )
        tricks.append(ema)
    trainer_epochs = epochs or s.ppo_epochs
    fit(module, prompts, trainer_epochs, seed, tricks + (callbacks or []), limit_train_batches=limit_rollouts)
    module.save_pretrained(out / save_as)
