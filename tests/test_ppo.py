"""PPOModule: argument checks, the first-step guard, checkpointed state, and PPO improving the gold reward."""

import contextlib
import json

import fork_server
import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from word_rl import cpu_trainer

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.modules.ppo import FirstStepCheckError
from lightning_rlhf.testbed.evaluate import evaluate_policy
from lightning_rlhf.testbed.reward import GoldReward


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_range": 0.0}, "clip_range must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        (
            {"mini_batch_size": 8, "micro_batch_size": 3},
            "micro_batch_size \\(3\\) must divide mini_batch_size",
        ),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ({"clip_range_value": 0.0}, "clip_range_value must be > 0 or null"),
        ({"gamma": 1.5}, "gamma must be in \\[0, 1\\]"),
        ({"old_logprobs": "cache"}, "old_logprobs must be one of"),
    ],
)
def test_impossible_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOModule(**{"model": "m", "reward_function": len, **kwargs})


def test_a_reward_is_required_to_fit_but_not_to_export():
    module = PPOModule("m")  # loading from a checkpoint (no reward function stored) must work
    with pytest.raises(ValueError, match="give a reward_model, a reward_function, or both"):
        module.setup("fit")


@pytest.fixture(scope="module")
def testbed(word_rl_testbed):
    return word_rl_testbed  # tests/word_rl.py, shared with the critic-free tests


def prompts(testbed, batch_size=16):
    return PromptDataModule(
        str(testbed / "init_policy"), str(testbed / "prompts_train.jsonl"), batch_size=batch_size
    )


def test_first_step_guard_trips_when_dropout_is_left_on(testbed, tmp_path):
    """Dropout on in training but not in sampling: the first update's ratio is not 1, and we say why."""
    model = AutoModelForCausalLM.from_pretrained(testbed / "init_policy", attention_dropout=0.5)
    model.save_pretrained(tmp_path / "dropout_policy")
    AutoTokenizer.from_pretrained(testbed / "init_policy").save_pretrained(tmp_path / "dropout_policy")
    module = PPOModule(
        str(tmp_path / "dropout_policy"),
        reward_function=GoldReward(str(testbed)),
        disable_dropout=False,
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=8,
    )
    with pytest.raises(FirstStepCheckError, match="dropout left on"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, prompts(testbed))
    # The same model with dropout disabled (the default) passes the check and trains.
    module = PPOModule(
        str(tmp_path / "dropout_policy"),
        reward_function=GoldReward(str(testbed)),
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=8,
    )
    cpu_trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, prompts(testbed))


def test_rollout_batch_must_split_into_mini_batches(testbed, tmp_path):
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        mini_batch_size=12,
        micro_batch_size=4,
        max_new_tokens=4,
    )
    with pytest.raises(ValueError, match="batch_size=16\\) is not divisible by model mini_batch_size=12"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, prompts(testbed))


def test_adaptive_kl_and_score_statistics_are_checkpointed(testbed, tmp_path, monkeypatch):
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        target_kl=1.0,
        normalize_scores=True,
        mini_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=6,
    )
    cpu_trainer(tmp_path, max_steps=4).fit(module, prompts(testbed))
    assert module.kl_controller.value != 0.1 and module.score_moments.count == 32
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    loaded = PPOModule.load_from_checkpoint(
        checkpoint, reward_function=GoldReward(str(testbed)), weights_only=False
    )
    assert loaded.kl_controller.state_dict() == module.kl_controller.state_dict()
    assert loaded.score_moments.state_dict() == module.score_moments.state_dict()
    # `lightning-rlhf export` works from a PPO checkpoint too (no reward function needed to rebuild it), and
    # loads only the policy it writes: no critic, reference or reward model (#16 item 6).
    import lightning_rlhf.modules.ppo as ppo_module
    from lightning_rlhf.export import export_checkpoint

    def no_other_model(*args, **kwargs):
        raise AssertionError("export loaded a critic / reward model")

    monkeypatch.setattr(ppo_module, "load_reward_model", no_other_model)
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(checkpoint, tmp_path / "exported"))
    torch.testing.assert_close(exported.lm_head.weight, module.policy.lm_head.weight)


def test_ppo_raises_held_out_gold_reward_over_the_sft_policy(testbed, word_sft_start, tmp_path):
    """Seeded, ~30 s: from the SFT'd tiny policy (tests/word_rl.py), PPO against the testbed's gold reward
    (a reward function); the held-out mean gold reward must rise clearly (measured: about +0.3)."""
    start = word_sft_start
    L.seed_everything(0, verbose=False)
    ppo = PPOModule(
        str(start.path),
        reward_function=GoldReward(str(testbed)),
        max_new_tokens=12,
        mini_batch_size=16,
        micro_batch_size=16,
        learning_rate=1e-4,
        critic_learning_rate=1e-3,
        kl_coef=0.05,
    )
    fit = cpu_trainer(tmp_path, max_steps=4 * 30, enable_checkpointing=False, deterministic=True)
    fit.fit(ppo, PromptDataModule(str(start.path), str(testbed / "prompts_train.jsonl"), batch_size=64))
    after = evaluate_policy(
        ppo.policy, start.tokenizer, start.task, start.held_out, samples_per_prompt=2, seed=1
    )
    assert after["gold_reward"] > start.before["gold_reward"] + 0.15, (start.before, after)
    for name in (
        "rollout/gold_score",
        "rollout/kl",
        "ppo/clip_fraction",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/entropy",
        "rollout/eos_rate",
        "time/generation",
        "time/update",
    ):
        assert name in fit.callback_metrics or name == "rollout/gold_score", name
    assert torch.isfinite(fit.callback_metrics["ppo/loss"])
    json.dumps({k: float(v) for k, v in fit.callback_metrics.items()})  # every metric is a plain number


def test_validation_samples_held_out_prompts_and_logs_scores(testbed, tmp_path):
    """validate: one sampled response per held-out prompt, scored; val/gold_score equals the gold reward of
    what the policy samples (recomputed here with the same seed)."""
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        gold_function=GoldReward(str(testbed)),
        max_new_tokens=6,
        mini_batch_size=8,
        micro_batch_size=8,
    )
    data = PromptDataModule(
        str(testbed / "init_policy"),
        str(testbed / "prompts_train.jsonl"),
        str(testbed / "prompts_eval.jsonl"),
        batch_size=16,
    )
    torch.manual_seed(3)
    metrics = cpu_trainer(tmp_path).validate(module, data, verbose=False)[0]
    assert metrics["val/gold_score"] == pytest.approx(metrics["val/score"], abs=1e-6)
    assert 0 < metrics["val/response_length"] <= 6 and 0 <= metrics["val/eos_rate"] <= 1


class _RankState(L.Callback):
    """Writes each rank's step count and PPO controller state at the end of fit (DDP rank processes)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {
            "global_step": trainer.global_step,
            "kl_coef": pl_module.kl_controller.value,
            "moments": pl_module.score_moments.state_dict(),
        }
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(state, f)


class _FirstGradients(L.Callback):
    """Records the policy's gradients at the first optimizer step."""

    grads: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {
                n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None
            }


def test_micro_batch_size_does_not_change_the_gradient(testbed, tmp_path):
    """Gradient accumulation is a memory setting: micro=8 and micro=1 give the same first-step gradient
    (each micro-batch's token-mean loss is weighted by its share of the mini-batch's tokens)."""
    grads = {}
    for micro in (8, 1):
        L.seed_everything(0, verbose=False)
        module = PPOModule(
            str(testbed / "init_policy"),
            reward_function=GoldReward(str(testbed)),
            mini_batch_size=8,
            micro_batch_size=micro,
            max_new_tokens=8,
            max_grad_norm=None,
        )
        recorder = _FirstGradients()
        cpu_trainer(tmp_path, max_steps=1, enable_checkpointing=False, callbacks=[recorder]).fit(
            module, prompts(testbed, batch_size=8)
        )
        grads[micro] = recorder.grads
    assert grads[8].keys() == grads[1].keys() and grads[8]
    for name in grads[8]:
        torch.testing.assert_close(grads[1][name], grads[8][name], atol=1e-6, rtol=1e-4, msg=name)


def test_bad_sampling_and_kl_settings_name_the_flag():
    for kwargs, message in (
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"target_kl": 1.0, "kl_coef": 0.0}, "kl_coef must be > 0 with target_kl"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty must be >= 0"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of .k1., .k2., .k3."),
        ({"ppo_epochs": 1.5}, "ppo_epochs must be an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            PPOModule("m", reward_function=len, **kwargs)


def test_two_ddp_ranks_stay_in_step_with_early_stop_and_adaptive_kl(testbed, tmp_path):
    """2 CPU processes (gloo): early stopping and the KL controller decide on values reduced over ranks, so
    both ranks make the same number of optimizer steps (a per-rank decision used to break the collectives)."""
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=6,
        early_stop_kl=1e-9,
        ppo_epochs=2,
        target_kl=0.5,
        normalize_scores=True,
        learning_rate=1e-3,
    )
    fit = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=fork_server.ddp_strategy(),
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[_RankState(str(tmp_path))],
    )
    fit.fit(module, prompts(testbed, batch_size=8))
    states = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(states) == 2
    # A rollout of 8 prompts is 2 mini-batches of 4 per rank, x 2 PPO epochs = 4 steps. The first mini-batch
    # sees KL 0 (policy == sampler); the second sees the first update's KL and stops: 2 steps per rollout,
    # so max_steps=5 ends after the third rollout at step 6 (without early stop: 2 rollouts, step 8).
    # Both ranks hold the same adaptive KL coefficient and score statistics.
    assert states[0] == states[1]
    assert states[0]["global_step"] == 6 and states[0]["kl_coef"] != 0.1


class _FirstGradientsToFile(L.Callback):
    """Saves rank 0's policy gradients at the first optimizer step (DDP rank processes write files)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 0 and trainer.global_step == 0:
            grads = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)


class _CountAllReduces(L.Callback):
    """Counts DDP's gradient all-reduces (bucket by bucket, through a comm hook) up to the first optimizer
    step, and saves rank 0's count: without no_sync every micro-batch's backward would all-reduce."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            self.calls += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(state=None, hook=counting_hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 0 and trainer.global_step == 0:
            torch.save(self.calls, self.path)


def test_ddp_skips_the_all_reduce_before_the_last_micro_batch_with_the_same_gradient(testbed, tmp_path):
    """2 gloo ranks: with micro-batches, backward runs under DDP's no_sync until the last micro-batch of a
    mini-batch, so the first step makes as many all-reduces with 2 micro-batches as with 1 (counted by a
    comm hook: without no_sync it would be twice as many), and the synchronised gradient equals the one of a
    single micro-batch (one backward)."""
    for micro in (4, 2):
        L.seed_everything(0, verbose=False)
        module = PPOModule(
            str(testbed / "init_policy"),
            reward_function=GoldReward(str(testbed)),
            mini_batch_size=4,
            micro_batch_size=micro,
            max_new_tokens=6,
            max_grad_norm=None,
        )
        fit = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=fork_server.ddp_strategy(),
            max_steps=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            callbacks=[
                _FirstGradientsToFile(str(tmp_path / f"grads{micro}.pt")),
                _CountAllReduces(str(tmp_path / f"reduces{micro}.pt")),
            ],
        )
        fit.fit(module, prompts(testbed, batch_size=4))
    one_backward, two_backwards = torch.load(tmp_path / "reduces4.pt"), torch.load(tmp_path / "reduces2.pt")
    assert one_backward > 0 and two_backwards == one_backward, (one_backward, two_backwards)
    whole, split = torch.load(tmp_path / "grads4.pt"), torch.load(tmp_path / "grads2.pt")
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_sync_is_blocked_only_before_the_last_micro_batch():
    """The context used around each micro-batch's backward: the strategy's block_backward_sync before the
    last micro-batch, nothing on the last one or without a parallel strategy."""
    entered = []

    class Strategy:
        def block_backward_sync(self):
            entered.append(True)
            return contextlib.nullcontext()

    module = PPOModule("m", reward_function=len)
    module.trainer = type("T", (), {"strategy": Strategy()})()
    with module._gradient_sync(last_micro_batch=False):
        pass
    with module._gradient_sync(last_micro_batch=True):
        pass
    assert entered == [True]
    module.trainer.strategy = object()
    with module._gradient_sync(last_micro_batch=False):
        pass
    assert entered == [True]


class _KeepRollouts(L.Callback):
    """Each rollout with the critic's raw outputs on it and the value moments before it was collected."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = module.value_moments.state_dict()

    def on_rollout_end(self, trainer, module, rollout):
        from lightning_rlhf.models import response_values
        from lightning_rlhf.rollout.collect import select_rows

        rows = torch.arange(len(rollout))
        ids, attention, width = select_rows(
            rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, rows
        )
        with torch.no_grad():
            raw = response_values(module.critic.eval(), ids, attention, ids.shape[1] - width)
        module.critic.train()
        self.seen.append((rollout, raw, dict(self.before)))


def test_value_normalization_standardises_the_critic_targets_by_the_running_return_moments(testbed, tmp_path):
    """value_normalization: each rollout's values are the critic's outputs de-standardised by the moments
    before it; afterwards the moments are the mean / variance of every rollout's returns so far (float64
    reference); the moments are saved with the checkpoint; GRPO (no critic) refuses the flag."""
    from lightning_rlhf import GRPO

    with pytest.raises(ValueError, match="value_normalization standardises the critic"):
        PPOModule("m", reward_function=len, advantage=GRPO(), num_generations=2, value_normalization=True)
    module = PPOModule(
        str(testbed / "init_policy"),
        reward_function=GoldReward(str(testbed)),
        max_new_tokens=6,
        mini_batch_size=8,
        micro_batch_size=8,
        value_normalization=True,
    )
    keep = _KeepRollouts()
    fit = cpu_trainer(tmp_path, max_steps=3, callbacks=[keep])
    fit.fit(module, prompts(testbed, batch_size=8))
    returns = []
    for rollout, raw, before in keep.seen:
        mask = rollout.response_mask.float()
        std = max(before["var"], 1e-2) ** 0.5
        torch.testing.assert_close(rollout.values, (raw * std + before["mean"]) * mask, atol=1e-5, rtol=1e-5)
        returns.append(rollout.returns[mask > 0].double())
    assert keep.seen[0][2] == {"mean": 0.0, "var": 1.0, "count": 0}  # identity before the first rollout
    every = torch.cat(returns)
    moments = module.value_moments
    assert moments.count == every.numel() and len(keep.seen) == 3
    assert moments.mean == pytest.approx(float(every.mean()), abs=1e-9)
    assert moments.var == pytest.approx(float(every.var(unbiased=False)), rel=1e-9)
    assert keep.seen[1][2]["count"] > 0  # the second rollout was de-standardised by real moments
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["ppo_state"]["value_moments"] == moments.state_dict()
