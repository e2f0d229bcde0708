"""Stage fits run on 1 or 2 spawned CPU ranks under DDP or ZeRO-2/3, recording what the tests compare.

Every run of one spawn shares the process group: a test can fit the same stage under DDP, ZeRO-2 and
ZeRO-3 in one go and compare them step by step (imports and the rendezvous happen once).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fork_server
import torch.multiprocessing as mp
from gloo import join_or_kill


@dataclass(frozen=True)
class Run:
    """One fit: which stage, under which strategy, with which extras."""

    tag: str
    stage: str  # "sft" | "reward" | "dpo" | "ppo" | "dpo_iter"
    strategy: str  # "ddp" | "zero2" | "zero3"
    max_steps: int = 3
    ema: bool = False
    advantage_normalization: bool = False
    precompute_reference: bool = False
    zero3_generation: str = "gather"
    checkpoint_every: int | None = None
    hf_export: bool = False
    resume_from: str | None = None
    head_recompute: bool = False  # LM head chunked and recomputed in backward at any size
    module_kwargs: dict = field(default_factory=dict)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    precision: str = "32-true"
    engine_check: bool = False  # vLLM: after fit, each rank compares its engine with its policy


def spawn(testbed: Path, out_dir: Path, runs: list[Run], nprocs: int, timeout_s: float = 600) -> dict:
    """Run ``runs`` in order on ``nprocs`` ranks (forked from the preloaded server, tests/fork_server.py);
    returns ``{tag: record}`` written by rank 0."""
    port = fork_server.free_port()
    payload = [asdict(r) for r in runs]
    processes = mp.start_processes(
        _worker,
        args=(nprocs, port, str(testbed), str(out_dir), payload),
        nprocs=nprocs,
        join=False,
        start_method=fork_server.start_method(),
    )
    join_or_kill(processes, timeout_s)
    return {r.tag: json.loads((out_dir / f"{r.tag}.json").read_text()) for r in runs}


def _worker(rank: int, world_size: int, port: int, testbed: str, out_dir: str, runs: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    for spec in runs:
        _fit(Run(**spec), rank, world_size, Path(testbed), Path(out_dir))
    # Every record is written. A rank once aborted *after* its last fit, in native teardown at interpreter
    # exit ("terminate called without an active exception", SIGABRT; DeepSpeed's CPU shared-memory comm op
    # was loaded), failing a test whose runs had all finished. Leave without running native destructors; a
    # failing run still raises above, so this only skips the teardown.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _strategy(name: str, offload_optimizer: bool = False):
    from deepspeed_cpu import CPUDeepSpeedStrategy, zero_config
    from lightning.pytorch.strategies import DDPStrategy

    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    config = zero_config(int(name[-1]))
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return CPUDeepSpeedStrategy(config=config)


def _fit(run: Run, rank: int, world_size: int, testbed: Path, out_dir: Path) -> None:
    import lightning as L
    import torch

    from lightning_rlhf import AdvantageNormalization, EMAReferenceUpdate, HFExport
    from lightning_rlhf.zero import gathered

    L.seed_everything(0, verbose=False)
    module, data = _stage(run, testbed)
    steps: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.split("/")[0] in _KEYS}
            )

    callbacks = [Record()]
    if run.advantage_normalization:
        callbacks.insert(0, AdvantageNormalization())
    if run.ema:
        callbacks.insert(0, EMAReferenceUpdate(decay=0.25))
    if run.hf_export:
        callbacks.append(HFExport(str(out_dir / f"{run.tag}_hf")))
    if run.checkpoint_every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=out_dir / f"{run.tag}_ckpt", every_n_train_steps=run.checkpoint_every, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=_strategy(run.strategy, run.offload_optimizer),
        max_steps=run.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(run.checkpoint_every),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out_dir / run.tag,
        deterministic=True,
        callbacks=callbacks,
        precision=run.precision,
    )
    import lightning_rlhf.models as models

    cache_reference = {}
    if run.precompute_reference:
        _record_cache_reference(module, cache_reference)
    threshold = models.HEAD_RECOMPUTE_ELEMENTS
    models.HEAD_RECOMPUTE_ELEMENTS = 0 if run.head_recompute else threshold
    try:
        trainer.fit(module, data, ckpt_path=run.resume_from)
    finally:
        models.HEAD_RECOMPUTE_ELEMENTS = threshold
    weights = {}
    for name in ("policy", "reference", "reward_model"):
        model = getattr(module, name, None)
        if isinstance(model, torch.nn.Module):
            with gathered(model):  # whole tensors on every rank under ZeRO-3
                weights[name] = sum(float(p.double().pow(2).sum()) for p in model.parameters())
    if run.engine_check:
        _check_engine(module, trainer, testbed, out_dir / f"{run.tag}_engine_rank{rank}.json")
    if rank == 0:
        record = {"steps": steps, "weights": weights, "global_step": trainer.global_step}
        record["cache_reference"] = cache_reference
        if hasattr(module, "kl_controller"):
            record["kl_coef"] = float(module.kl_controller.value)
        (out_dir / f"{run.tag}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()


def _check_engine(module, trainer, testbed: Path, out: Path) -> None:
    """Greedy continuations of a few held-out prompts by this rank's vLLM engine against its policy's own
    (HF generate and a training forward, whole weights under ZeRO-3): before the sync (the engine is one
    update phase behind the policy) and after it. Collective under ZeRO-3 (every rank calls it)."""
    import torch
    from greedy import engine_greedy, hf_greedy

    from lightning_rlhf.quickstart import read_prompts
    from lightning_rlhf.zero import whole_model_for_generation

    prompts = read_prompts(testbed / "prompts_eval.jsonl")[:4]
    policy = module.policy
    policy.eval()
    with whole_model_for_generation(trainer, policy):
        want_ids, want_mask, want = hf_greedy(policy, module.tokenizer, prompts, max_new_tokens=6)

    def from_engine():
        return engine_greedy(module.engine, module.tokenizer, prompts, max_new_tokens=6)

    def gap(got) -> dict:
        got_ids, got_mask, got_logprobs = got
        same = got_ids.shape == want_ids.shape and bool(
            torch.equal(got_ids, want_ids) and torch.equal(got_mask, want_mask)
        )
        diff = float((got_logprobs - want).abs().max()) if same else float("inf")
        return {"same_tokens": same, "logprob_gap": diff}

    stale = gap(from_engine())
    module.engine.sync_weights(policy)  # collective under ZeRO-3
    synced = gap(from_engine())
    out.write_text(json.dumps({"stale": stale, "synced": synced}))


def _record_cache_reference(module, record: dict) -> None:
    """Note what DPO's one-off cache reference held on this rank: its dtype, and elements held / in all."""
    import contextlib

    from lightning_rlhf.models import parameter_dtype
    from lightning_rlhf.zero import local_shards

    original = module.cache_reference

    @contextlib.contextmanager
    def recording():
        with original() as reference:
            model = getattr(reference, "model", reference)
            record["dtype"] = str(parameter_dtype(model))
            record["held"] = sum(t.numel() for _, t in local_shards(model))
            record["total"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            yield reference

    module.cache_reference = recording


_KEYS = {"train", "ppo", "rollout", "rewards", "logps", "time", "iteration"}


def _stage(run: Run, testbed: Path):
    from lightning_rlhf import (
        DPOModule,
        IterativeDPOModule,
        PPOModule,
        PreferenceDataModule,
        PromptDataModule,
        RewardModule,
        SFTDataModule,
        SFTModule,
    )
    from lightning_rlhf.testbed.reward import GoldReward

    policy = str(testbed / "init_policy")
    if run.stage == "sft":
        data = SFTDataModule(policy, str(testbed / "sft_train.jsonl"), batch_size=2, max_length=48)
        return SFTModule(policy, learning_rate=1e-3, **run.module_kwargs), data
    if run.stage == "ppo":
        kwargs = dict(
            mini_batch_size=4,
            micro_batch_size=2,
            max_new_tokens=6,
            learning_rate=1e-3,
            critic_learning_rate=1e-3,
            zero3_generation=run.zero3_generation,
        )
        module = PPOModule(
            model=policy, reward_function=GoldReward(str(testbed)), **{**kwargs, **run.module_kwargs}
        )
        return module, PromptDataModule(policy, str(testbed / "prompts_train.jsonl"), batch_size=8)
    if run.stage == "dpo_iter":
        module = IterativeDPOModule(
            policy,
            reward_function=GoldReward(str(testbed)),
            num_samples=4,
            max_new_tokens=6,
            mini_batch_size=4,
            micro_batch_size=2,
            learning_rate=1e-3,
            zero3_generation=run.zero3_generation,
            **run.module_kwargs,
        )
        return module, PromptDataModule(policy, str(testbed / "prompts_train.jsonl"), batch_size=4)
    pairs = PreferenceDataModule(
        policy, str(testbed / "pairs_train.jsonl"), None, batch_size=4, max_length=48
    )
    if run.stage == "reward":
        return RewardModule(policy, learning_rate=1e-3, **run.module_kwargs), pairs
    module = DPOModule(
        policy,
        learning_rate=1e-3,
        precompute_reference=run.precompute_reference,
        reference_cache_dir=str(testbed / f"ref_cache_{run.tag}"),
        diagnostic_batches=0,
        **run.module_kwargs,
    )
    return module, pairs
