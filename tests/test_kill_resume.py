"""SFT, reward model, DPO, DPO-Iter, GRPO and PPO runs killed with SIGKILL after k steps and resumed from
their last (mid-epoch) checkpoint end exactly like uninterrupted runs: the same weights, optimizer state,
logged metrics and data order, plus the EMA reference, DPO-Iter's refreshed reference, the adaptive KL
coefficient, the score statistics and the sampling RNG.

Real processes on CPU, seeded and deterministic; a few seconds per run, three runs per stage.
tests/test_kill_resume_ranks.py does the same on 2 ranks (DDP and ZeRO-2).
"""

import pytest
import torch
from resume_helpers import assert_same_history, assert_same_tensors, crash_and_resume, steps

from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig

JOB = """
from lightning_rlhf import (DPOModule, EMAReferenceUpdate, IterativeDPOModule, PPOModule,
                            PreferenceDataModule, PromptDataModule, RewardModule, SFTDataModule, SFTModule)
from lightning_rlhf.testbed.reward import GoldReward

testbed, stage = sys.argv[4], sys.argv[5]
policy = os.path.join(testbed, "init_policy")
L.seed_everything(0)
callbacks = []
if stage == "sft":
    module = SFTModule(policy, learning_rate=1e-3)
    data = SFTDataModule(policy, os.path.join(testbed, "sft_train.jsonl"), batch_size=4)
elif stage == "dpo_iter":
    # Samples 2 responses per prompt from the current policy (the RNG) and refreshes the reference each step
    # (saved in the checkpoint).
    module = IterativeDPOModule(policy, reward_function=GoldReward(testbed), num_samples=2, max_new_tokens=5,
                                mini_batch_size=4, micro_batch_size=2, learning_rate=1e-3)
    data = PromptDataModule(policy, os.path.join(testbed, "prompts_train.jsonl"), batch_size=4)
elif stage == "rm":
    module = RewardModule(policy, learning_rate=1e-3)
    # Length-grouped batches: the LengthGroupedSampler resumes mid-epoch too.
    data = PreferenceDataModule(policy, os.path.join(testbed, "pairs_train.jsonl"), batch_size=4,
                                group_by_length=True)
elif stage == "dpo":
    module = DPOModule(policy, learning_rate=1e-3, diagnostic_batches=1)
    data = PreferenceDataModule(policy, os.path.join(testbed, "pairs_train.jsonl"), batch_size=4)
    callbacks = [EMAReferenceUpdate(decay=0.5, every_n_steps=2)]
elif stage == "grpo":
    # Critic-free: 2 responses per prompt, group-normalised advantages, KL as a k3 loss term, EMA reference.
    from lightning_rlhf.rollout.advantages import GRPO
    module = PPOModule(policy, reward_function=GoldReward(testbed), advantage=GRPO(), num_generations=2,
                       kl_penalty="loss", loss_aggregation="sequence_mean", max_new_tokens=5,
                       mini_batch_size=4, micro_batch_size=2, learning_rate=1e-3)
    data = PromptDataModule(policy, os.path.join(testbed, "prompts_train.jsonl"), batch_size=2)
    callbacks = [EMAReferenceUpdate(decay=0.5, every_n_steps=2)]
else:
    module = PPOModule(policy, reward_function=GoldReward(testbed), max_new_tokens=5, mini_batch_size=4,
                       micro_batch_size=2, ppo_epochs=2, target_kl=0.05, normalize_scores=True,
                       learning_rate=1e-3, critic_learning_rate=1e-3)
    # Validation samples too; it must not shift the training RNG (it reruns after a resume).
    data = PromptDataModule(policy, os.path.join(testbed, "prompts_train.jsonl"),
                            os.path.join(testbed, "prompts_eval.jsonl"), batch_size=4)
    callbacks = [EMAReferenceUpdate(decay=0.5, every_n_steps=4)]
# PPO validates after the 2nd rollout of each epoch, i.e. right after the step-4 checkpoint it resumes from.
validate = {"val_check_interval": 2, "limit_val_batches": 1} if stage == "ppo" else {}
trainer = trainer_for(int(sys.argv[6]), **validate)
trainer.callbacks[:0] = callbacks
trainer.fit(module, datamodule=data, ckpt_path=resume)
final = {"module": module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
         "step": trainer.global_step, "callbacks": [c.state_dict() for c in callbacks]}
if stage == "ppo":
    final["ppo"] = {"kl": module.kl_controller.state_dict(), "moments": module.score_moments.state_dict()}
torch.save(final, os.path.join(root, "final.pt"))
"""


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(
        sft_train=12, sft_eval=2, pairs_train=12, pairs_eval=2, prompts_train=12, prompts_eval=2
    )
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


# 12 rows in batches of 4 is 3 batches an epoch: every run resumes after batch 2 of epoch 0 (mid-epoch) and
# goes on into the next epoch(s). PPO makes 2 optimizer steps per rollout of 4 prompts (1 mini-batch x 2 PPO
# epochs), so its steps count in twos: the kill at step 6 comes after rollout 3, the resume is from step 4.
# GRPO takes 2 prompts x 2 responses a rollout (one optimizer step), 6 rollouts an epoch.
@pytest.mark.parametrize(
    ("stage", "max_steps", "kill_at"),
    [("sft", 5, 3), ("rm", 5, 3), ("dpo", 5, 3), ("dpo_iter", 5, 3), ("grpo", 5, 3), ("ppo", 16, 6)],
)
def test_killed_run_resumes_exactly(testbed, tmp_path, stage, max_steps, kill_at):
    full, crashed, resumed, resumed_from = crash_and_resume(
        JOB, tmp_path, str(testbed), stage, str(max_steps), kill_at=kill_at
    )
    assert resumed_from == (4 if stage == "ppo" else 2)
    assert_same_history(full, crashed, resumed, resumed_from)
    want = torch.load(full / "final.pt", weights_only=True)
    got = torch.load(resumed / "final.pt", weights_only=True)
    assert want["step"] == max_steps
    assert_same_tensors(want, got, stage)
    if stage == "ppo":
        assert want["ppo"]["kl"]["value"] != 0.1 and want["ppo"]["moments"]["count"] > 0
        assert [s["step"] for s in steps(full, "val.jsonl")] == [4, 10, 16]
