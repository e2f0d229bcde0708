"""DPO and PPO on 2 gloo ranks, under DDP and under DeepSpeed ZeRO-2 (the test-only CPU strategy), killed
with SIGKILL on both ranks after a mid-epoch checkpoint and resumed from it: every rank's steps (rows, logged
metrics) and final state equal those of the uninterrupted 2-rank run.

That needs each rank's own RNG state back (a checkpoint is written by one rank) and each rank's position in
its share of the epoch (Lightning's distributed sampler wrapper has none to save). Each run is 2 processes on
CPU, a few seconds each.
"""

import pytest
import torch
from resume_helpers import assert_same_history, assert_same_tensors, crash_and_resume

from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig

JOB = """
from lightning_rlhf import DPOModule, EMAReferenceUpdate, PPOModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.testbed.reward import GoldReward

testbed, stage = sys.argv[4], sys.argv[5]
policy = os.path.join(testbed, "init_policy")
L.seed_everything(0)


# Rank r draws r more numbers from each generator per step, as in real runs where one rank's responses all
# end early and its generate stops sampling first: the ranks' streams drift apart. (Every rank starts from
# the same seed, and the tiny random policy's responses never end early, so without this they would not.)
class UnevenDraws(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import random
        import numpy as np
        torch.rand(rank)
        np.random.rand(rank)
        [random.random() for _ in range(rank)]


if stage == "dpo":
    module = DPOModule(policy, learning_rate=1e-3, diagnostic_batches=0)
    # Length-grouped: each step's two local batches come from one global batch (the sharded sampler).
    data = PreferenceDataModule(policy, os.path.join(testbed, "pairs_train.jsonl"), batch_size=2,
                                group_by_length=True)
    callbacks = [EMAReferenceUpdate(decay=0.5, every_n_steps=2)]
else:
    module = PPOModule(policy, reward_function=GoldReward(testbed), max_new_tokens=5, mini_batch_size=2,
                       micro_batch_size=1, ppo_epochs=2, target_kl=0.05, normalize_scores=True,
                       learning_rate=1e-3, critic_learning_rate=1e-3)
    data = PromptDataModule(policy, os.path.join(testbed, "prompts_train.jsonl"),
                            os.path.join(testbed, "prompts_eval.jsonl"), batch_size=2)
    callbacks = []
validate = {"val_check_interval": 2, "limit_val_batches": 1} if stage == "ppo" else {}
trainer = trainer_for(int(sys.argv[6]), **validate)
trainer.callbacks[:0] = [*callbacks, UnevenDraws()]
trainer.fit(module, datamodule=data, ckpt_path=resume)
final = {"module": module.state_dict(), "step": trainer.global_step,
         "callbacks": [c.state_dict() for c in callbacks]}
if os.environ["RESUME_STRATEGY"] == "ddp":
    final["optimizer"] = trainer.optimizers[0].state_dict()
else:  # this rank's partition of the fp32 master weights and their Adam moments
    zero = trainer.strategy.deepspeed_engine.optimizer
    final["optimizer"] = {"fp32": [p.detach().clone() for p in zero.single_partition_of_fp32_groups],
                          "adam": zero.optimizer.state_dict()["state"]}
if stage == "ppo":
    final["ppo"] = {"kl": module.kl_controller.state_dict(), "moments": module.score_moments.state_dict()}
torch.save(final, FINAL)
"""


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(
        sft_train=4, sft_eval=2, pairs_train=12, pairs_eval=2, prompts_train=12, prompts_eval=4
    )
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


# 12 rows over 2 ranks in batches of 2: 3 steps an epoch. DPO is killed at step 3 and resumes from step 2;
# PPO makes 2 optimizer steps per rollout, is killed at step 6 and resumes from step 4 (rollout 2 of 3, where
# it also validates). Both go on into the next epoch.
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
@pytest.mark.parametrize(("stage", "max_steps", "kill_at"), [("dpo", 5, 3), ("ppo", 10, 6)])
def test_killed_two_rank_run_resumes_exactly(testbed, tmp_path, strategy, stage, max_steps, kill_at):
    if strategy != "ddp":
        pytest.importorskip("deepspeed")
    full, crashed, resumed, resumed_from = crash_and_resume(
        JOB, tmp_path, str(testbed), stage, str(max_steps), kill_at=kill_at, ranks=2, strategy=strategy
    )
    assert resumed_from == (4 if stage == "ppo" else 2)
    for rank, suffix in enumerate(["", "-rank1"]):
        assert_same_history(full, crashed, resumed, resumed_from, f"steps{suffix}.jsonl")
        want = torch.load(full / f"final{suffix}.pt", weights_only=False)
        got = torch.load(resumed / f"final{suffix}.pt", weights_only=False)
        assert want["step"] == max_steps
        assert_same_tensors(want, got, f"{stage} rank {rank}")
