"""DeepSpeed ZeRO-2/3 on CPU ranks (tests/deepspeed_cpu.py): every stage matches the same run under DDP.

Each test spawns fresh ranks (DeepSpeed's process group and ZeRO hooks never touch the pytest process) and
fits one stage under DDP and under ZeRO, recording the logged metrics after every optimizer step. Models,
data, seeds and optimizer (torch AdamW, fp32) are the same, so the runs differ only by float summation
order: per-step metrics must agree to ``TOL``.
"""

from __future__ import annotations

import pytest

deepspeed = pytest.importorskip("deepspeed")

from deepspeed_runs import Run, spawn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lightning_rlhf.export import export_checkpoint  # noqa: E402
from lightning_rlhf.testbed.files import SplitSizes, write_testbed  # noqa: E402
from lightning_rlhf.testbed.task import TaskConfig  # noqa: E402

TOL = 2e-4  # after 3 AdamW steps at lr 1e-3; step 1 agrees to ~1e-6


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(
        sft_train=4, sft_eval=2, pairs_train=32, pairs_eval=4, prompts_train=32, prompts_eval=4
    )
    write_testbed(root, TaskConfig(seed=0), sizes, model_size="nano")
    return root


def assert_same_steps(a: dict, b: dict, keys: list[str], tol: float = TOL, weights_rel: float = 1e-5) -> None:
    assert len(a["steps"]) == len(b["steps"]) > 0
    for i, (x, y) in enumerate(zip(a["steps"], b["steps"], strict=True)):
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=tol, rel=tol), f"step {i + 1}, {key}"
    for name, value in a["weights"].items():
        assert value == pytest.approx(b["weights"][name], rel=weights_rel), f"final {name} weights"


LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
REWARD_KEYS = ["train/loss", "train/accuracy", "train/margin"]
DPO_KEYS = ["train/loss", "rewards/margins", "logps/chosen"]
PPO_KEYS = ["ppo/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "rollout/score", "rollout/kl"]


def test_reward_model_zero2_and_zero3_on_two_ranks_match_ddp(testbed, tmp_path):
    runs = [Run(tag, "reward", tag) for tag in ("ddp", "zero2", "zero3")]
    runs += [Run(f"{tag}_lora", "reward", tag, module_kwargs=LORA) for tag in ("ddp", "zero3")]
    out = spawn(testbed, tmp_path, runs, nprocs=2)
    for tag in ("zero2", "zero3"):
        assert_same_steps(out[tag], out["ddp"], REWARD_KEYS)
    assert_same_steps(out["zero3_lora"], out["ddp_lora"], REWARD_KEYS)


def test_dpo_on_one_rank_zero3_ema_and_zero2_cached_reference_match_ddp(testbed, tmp_path):
    """ZeRO-3 with an EMA reference (gathered update) and ZeRO-2 with reference log-probs precomputed
    under DeepSpeed: the same steps and final weights (policy and reference) as under DDP. One ZeRO-3 run
    recomputes the LM head chunk by chunk in backward (its weight gathered again for the recomputation)."""
    runs = [
        Run("ddp_ema", "dpo", "ddp", ema=True),
        Run("zero3_ema", "dpo", "zero3", ema=True),
        Run("zero3_ema_head_recompute", "dpo", "zero3", ema=True, head_recompute=True),
        Run("ddp_cached", "dpo", "ddp", precompute_reference=True),
        Run("zero2_cached", "dpo", "zero2", precompute_reference=True),
        Run("zero3_cached", "dpo", "zero3", precompute_reference=True),
        Run("ddp_lora", "dpo", "ddp", module_kwargs=LORA),
        Run("zero3_lora", "dpo", "zero3", module_kwargs=LORA),
    ]
    out = spawn(testbed, tmp_path, runs, nprocs=1)
    assert_same_steps(out["zero3_ema"], out["ddp_ema"], DPO_KEYS)
    assert_same_steps(out["zero3_ema_head_recompute"], out["ddp_ema"], DPO_KEYS)
    assert_same_steps(out["zero2_cached"], out["ddp_cached"], DPO_KEYS)
    assert_same_steps(out["zero3_cached"], out["ddp_cached"], DPO_KEYS)
    assert_same_steps(out["zero3_lora"], out["ddp_lora"], DPO_KEYS)
    # The EMA moved the reference (so the comparison above covered it), the cached run has none.
    assert out["ddp_ema"]["weights"]["reference"] != pytest.approx(out["ddp_ema"]["weights"]["policy"])
    assert "reference" not in out["zero2_cached"]["weights"]


def test_dpo_reference_cache_on_two_ranks_is_partitioned_under_zero3_and_equals_the_live_reference(
    testbed, tmp_path
):
    """The one-off reference pass runs under the trainer's strategy and precision: under ZeRO-3 each of 2
    ranks holds half of the reference, in the training dtype (bf16 under bf16-mixed), and training on the
    cached log-probs takes the same steps as training against the live reference (fp32: to TOL; bf16: to
    bf16 rounding, as the cache pass batches the pairs differently from the training steps)."""
    runs = [
        Run("live", "dpo", "zero3"),
        Run("cached", "dpo", "zero3", precompute_reference=True),
        Run("live_bf16", "dpo", "zero3", precision="bf16-mixed"),
        Run("cached_bf16", "dpo", "zero3", precompute_reference=True, precision="bf16-mixed"),
    ]
    out = spawn(testbed, tmp_path, runs, nprocs=2)
    assert_same_steps(out["cached"], out["live"], DPO_KEYS)
    assert_same_steps(out["cached_bf16"], out["live_bf16"], DPO_KEYS, tol=2e-3, weights_rel=1e-4)
    for tag, dtype in (("cached", "torch.float32"), ("cached_bf16", "torch.bfloat16")):
        held = out[tag]["cache_reference"]
        assert held["dtype"] == dtype, tag
        assert held["held"] * 2 == held["total"], f"{tag}: rank 0 held {held['held']} of {held['total']}"


def test_ppo_on_two_ranks_zero2_and_zero3_match_ddp_with_the_paper_callbacks(testbed, tmp_path):
    """2 ranks × 8 prompts per rollout, AdvantageNormalization (whitened over both ranks) and an EMA
    reference; ZeRO-3 sampling from gathered weights and from partitioned ones with synced ranks."""
    paper = dict(ema=True, advantage_normalization=True, max_steps=4)
    runs = [
        Run("ddp", "ppo", "ddp", **paper),
        Run("zero2", "ppo", "zero2", **paper),
        # Old log-probs read from the sampling logits of the gathered policy (the others run a forward).
        Run(
            "zero3_gather",
            "ppo",
            "zero3",
            hf_export=True,
            module_kwargs={"old_logprobs": "sampling"},
            **paper,
        ),
        Run("zero3_synced", "ppo", "zero3", zero3_generation="synced", head_recompute=True, **paper),
    ]
    out = spawn(testbed, tmp_path, runs, nprocs=2)
    for tag in ("zero2", "zero3_gather", "zero3_synced"):
        assert_same_steps(out[tag], out["ddp"], PPO_KEYS)
        assert out[tag]["global_step"] == out["ddp"]["global_step"] == 4
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3_gather_hf")  # HFExport, gathered
    squares = sum(float(p.double().pow(2).sum()) for p in exported.parameters())
    assert squares == pytest.approx(out["zero3_gather"]["weights"]["policy"], rel=1e-7)
    for record in out.values():  # whitened over the whole rollout batch, i.e. across both ranks
        assert record["steps"][0]["rollout/advantage_mean"] == pytest.approx(0.0, abs=1e-5)
        assert record["steps"][0]["rollout/advantage_std"] == pytest.approx(1.0, abs=1e-3)


GRPO = {
    "advantage": {"class_path": "lightning_rlhf.rollout.advantages.GRPO", "init_args": {}},
    "num_generations": 2,
    "kl_penalty": "loss",
    "loss_aggregation": "sequence_mean",
}


def test_grpo_on_two_ranks_zero2_and_zero3_match_ddp(testbed, tmp_path):
    """Critic-free GRPO (groups of 2 on each rank, k3 KL loss, EMA reference): no critic under any strategy,
    and ZeRO-2 / ZeRO-3 take DDP's steps."""
    runs = [Run(tag, "ppo", tag, ema=True, module_kwargs=GRPO) for tag in ("ddp", "zero2", "zero3")]
    out = spawn(testbed, tmp_path, runs, nprocs=2)
    keys = ["ppo/loss", "ppo/policy_loss", "ppo/kl_loss", "ppo/approx_kl", "rollout/score"]
    for tag in ("zero2", "zero3"):
        assert_same_steps(out[tag], out["ddp"], keys)
    for record in out.values():
        assert "ppo/value_loss" not in record["steps"][0]  # no critic was built


def test_dpo_iter_on_two_ranks_zero2_and_zero3_match_ddp(testbed, tmp_path):
    """DPO-Iter through the shared on-policy engine: sampling (ZeRO-3 gathered or synced), labelling, the
    update loop and the reference refresh (one gathered tensor pair at a time) give DDP's steps."""
    runs = [Run(tag, "dpo_iter", tag) for tag in ("ddp", "zero2", "zero3")]
    runs.append(Run("zero3_synced", "dpo_iter", "zero3", zero3_generation="synced"))
    out = spawn(testbed, tmp_path, runs, nprocs=2)
    keys = [*DPO_KEYS, "iteration/score_mean", "iteration/pairs"]
    for tag in ("zero2", "zero3", "zero3_synced"):
        assert_same_steps(out[tag], out["ddp"], keys)
    # The reference was refreshed to the policy after the last iteration, on every strategy.
    for record in out.values():
        assert record["weights"]["reference"] == pytest.approx(record["weights"]["policy"], rel=1e-9)
    assert out["ddp"]["steps"][-1]["iteration/pairs"] > 0


def test_zero3_checkpoint_restores_the_state_and_exports_a_plain_model(testbed, tmp_path):
    """PPO with an EMA reference and adaptive KL under ZeRO-3, checkpointed at step 2 as DeepSpeed's folder of
    shards: loading it restores policy, EMA reference and KL coefficient exactly; training resumes from it to
    step 4; the step-4 folder exports to a save_pretrained folder holding the trained policy's weights.
    (That a resumed run then matches an uninterrupted one sample for sample is the resume tests' job.)"""
    kwargs = {"target_kl": 0.01}
    first = Run("first", "ppo", "zero3", ema=True, max_steps=2, checkpoint_every=2, module_kwargs=kwargs)
    out = spawn(testbed, tmp_path, [first], nprocs=1)
    (checkpoint,) = (tmp_path / "first_ckpt").glob("*.ckpt")
    assert checkpoint.is_dir()
    resumed = dict(resume_from=str(checkpoint), ema=True, module_kwargs=kwargs)
    runs = [
        Run("loaded", "ppo", "zero3", max_steps=2, **resumed),  # nothing left to train: the loaded state
        Run("resumed", "ppo", "zero3", max_steps=4, checkpoint_every=4, **resumed),
    ]
    out.update(spawn(testbed, tmp_path, runs, nprocs=1))
    assert out["loaded"]["global_step"] == 2 and out["resumed"]["global_step"] == 4
    assert out["loaded"]["weights"] == out["first"]["weights"]  # exact: policy and the EMA reference
    assert out["loaded"]["kl_coef"] == out["first"]["kl_coef"] != 0.1  # the adaptive controller moved
    assert out["resumed"]["weights"]["policy"] != out["first"]["weights"]["policy"]

    (final,) = (tmp_path / "resumed_ckpt").glob("*step=4*.ckpt")
    assert final.is_dir()
    exported = export_checkpoint(final, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(exported)
    squares = sum(float(p.double().pow(2).sum()) for p in model.parameters())
    assert squares == pytest.approx(out["resumed"]["weights"]["policy"], rel=1e-7)


def test_every_stage_fits_with_zero_offload_and_matches_zero_without(testbed, tmp_path):
    """ZeRO-Offload steps the module's own AdamW on the CPU (``zero_force_ds_cpu_optimizer: false``, see
    ``lightning_rlhf.zero.accept_client_optimizer``); DeepSpeed refused it before. Same fp32 AdamW, so the
    offloaded run must match the one that keeps the optimizer on the device, step by step.
    """
    stages = {"sft": ["train/loss"], "reward": REWARD_KEYS, "dpo": DPO_KEYS, "ppo": PPO_KEYS}
    runs = []
    for stage in stages:
        runs += [Run(f"{stage}_zero2", stage, "zero2", max_steps=2)]
        runs += [Run(f"{stage}_zero2_offload", stage, "zero2", max_steps=2, offload_optimizer=True)]
    runs += [Run("dpo_zero3_offload", "dpo", "zero3", max_steps=2, offload_optimizer=True)]
    out = spawn(testbed, tmp_path, runs, nprocs=1)
    for stage, keys in stages.items():
        assert_same_steps(out[f"{stage}_zero2_offload"], out[f"{stage}_zero2"], keys)
    assert_same_steps(out["dpo_zero3_offload"], out["dpo_zero2"], DPO_KEYS)
