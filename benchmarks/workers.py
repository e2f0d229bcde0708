"""One measurement per process: ``python benchmarks/workers.py TASK --meta fixtures.json [options]``.

Each task trains (or generates) on the shared fixtures and prints one ``RESULT {json}`` line: per optimizer
step wall times and real (non-pad) token counts, the step-1 loss, and the process's peak RSS. Running every
side in its own process keeps peak RSS honest (no allocator memory left over from the other side) and lets
the TRL 1.12 PPO side run in its own virtual environment (see ``trl_ppo_worker.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Profile:
    """``with _Profile(on) as p: ...`` then ``p.table``: torch.profiler's top operators by self CPU time."""

    def __init__(self, on: bool) -> None:
        self.on, self.table = on, None

    def __enter__(self):
        if self.on:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.on:
            self.prof.__exit__(*exc)
            self.table = self.prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40
            )


class _MemoryProfile:
    """``with _MemoryProfile(on) as m: ...`` then ``m.result``: what the process's peak RSS is made of.

    A thread samples RSS and glibc's ``mallinfo2`` every 2 ms; at the highest RSS it keeps: bytes malloc
    has handed out and not had back (tensors, Python's large objects), bytes free inside malloc's heap
    (fragmentation: freed but not returned to the OS), and the rest (code and data of the imported
    libraries, Python's own small-object arenas). Sampling costs CPU, so throughput runs leave it off.
    """

    def __init__(self, on: bool) -> None:
        self.on, self.result = on, None

    def __enter__(self):
        if not self.on:
            return self
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (name, ctypes.c_size_t)
                for name in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )  # fmt: skip
            ]

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = MallInfo2
        except (OSError, AttributeError):  # not glibc >= 2.33: no breakdown
            self.on = False
            return self
        self.stop = threading.Event()
        start_rss = _rss_mb()
        best = {"rss_mb": 0.0, "rss_at_start_mb": start_rss}

        def sample() -> None:
            while not self.stop.wait(0.002):
                rss = _rss_mb()
                if rss > best["rss_mb"]:
                    info = libc.mallinfo2()
                    in_use = (info.uordblks + info.hblkhd) / 2**20
                    free = info.fordblks / 2**20
                    best.update(
                        rss_mb=rss, malloc_in_use_mb=in_use, heap_free_mb=free, rest_mb=rss - in_use - free
                    )

        self.best = best
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.on:
            self.stop.set()
            self.thread.join()
            self.result = self.best


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------- ours (Lightning)


class _StepClock:
    """Lightning callback: wall time and real tokens of every optimizer step (accumulation-aware)."""

    def __init__(self, accumulation: int, token_key: str = "attention_mask") -> None:
        import lightning as L

        outer = self

        class Clock(L.Callback):
            def on_train_start(self, trainer, pl_module):
                outer.last, outer.last_cpu = time.perf_counter(), time.process_time()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.tokens += int(batch[token_key].sum())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if (batch_idx + 1) % accumulation == 0:
                    now, cpu = time.perf_counter(), time.process_time()
                    outer.steps.append(
                        {
                            "seconds": now - outer.last,
                            "cpu_seconds": cpu - outer.last_cpu,
                            "tokens": outer.tokens,
                        }
                    )
                    outer.last, outer.last_cpu, outer.tokens = now, cpu, 0
                if outer.first_loss is None and outputs is not None:
                    loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                    outer.first_losses.append(float(loss))  # Lightning divides it by the accumulation
                    if (batch_idx + 1) % accumulation == 0:
                        outer.first_loss = sum(outer.first_losses)

        self.callback = Clock()
        self.steps: list[dict] = []
        self.tokens = 0
        self.last = 0.0
        self.first_loss: float | None = None
        self.first_losses: list[float] = []


def _trainer(
    root: Path,
    accumulation: int,
    callbacks: list,
    *,
    max_steps: int = -1,
    precision="32-true",
    clip: bool = True,
):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulation,
        gradient_clip_val=1.0 if clip else None,  # TRL clips at max_grad_norm=1.0 by default
        precision=precision,
        default_root_dir=str(root),
        callbacks=callbacks,
    )


def _full_logits_response_logps():
    """The pre-optimisation ``response_logps``: LM head over every position ([B, T, V] logits), and each
    prompt through the model twice (with its chosen and with its rejected response)."""
    from lightning_rlhf.models import next_token_logprobs
    from lightning_rlhf.ops import sequence_logprobs

    def response_logps(model, batch, *, average, shared_prompts=False):  # noqa: ARG001 - the "before" code
        token_logps = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        mask = batch["response_mask"][:, 1:]
        per_token = sequence_logprobs(token_logps, mask, average=True)
        return (per_token if average else sequence_logprobs(token_logps, mask)), per_token

    return response_logps


def ours_pairs(meta: dict, args, *, task: str) -> dict:
    import lightning_rlhf.models as models
    import lightning_rlhf.modules.dpo as dpo_module
    import lightning_rlhf.modules.reference_cache as cache_module

    shipped, shipped_shared = dpo_module.response_logps, models.shared_prompt_response_logps
    if args.full_logits:
        dpo_module.response_logps = cache_module.response_logps = _full_logits_response_logps()
    if args.no_shared_prompts:
        models.shared_prompt_response_logps = lambda *a, **k: None  # every prompt runs twice, as before
    try:
        return _fit_pairs(meta, args, task)
    finally:  # in-process runs (tests) must not leak the "before" code into later runs
        dpo_module.response_logps = cache_module.response_logps = shipped
        models.shared_prompt_response_logps = shipped_shared


def _fit_pairs(meta: dict, args, task: str) -> dict:
    from lightning_rlhf import DPOModule, PreferenceDataModule, RewardModule

    cfg = meta["config"]
    data = PreferenceDataModule(
        meta["tokenizer"],
        meta["pairs"],
        batch_size=cfg["micro_pairs"],
        max_length=cfg["max_length"],
        group_by_length=not args.no_grouping,
        seed=cfg["seed"],
    )
    if task == "dpo":
        module = DPOModule(
            meta["policy"],
            precompute_reference=args.cached,
            reference_cache_dir=str(Path(args.work) / "refcache"),
            learning_rate=1e-6,
            diagnostic_batches=0,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    else:
        module = RewardModule(
            meta["reward_model"], learning_rate=1e-5, gradient_checkpointing=args.gradient_checkpointing
        )
    accumulation = cfg["batch_pairs"] // cfg["micro_pairs"]
    clock = _StepClock(accumulation)
    trainer = _trainer(Path(args.work), accumulation, [clock.callback], precision=args.precision)
    start = time.perf_counter()
    with _Profile(args.profile) as prof, _MemoryProfile(args.memory_profile) as memory:
        trainer.fit(module, datamodule=data)
    total = time.perf_counter() - start
    precompute = 0.0
    if args.cached:
        # Precompute happens in on_fit_start, before on_train_start: the part of the wall not in the steps.
        precompute = total - sum(s["seconds"] for s in clock.steps)
    return {
        "steps": clock.steps,
        "loss_step1": clock.first_loss,
        "fit_seconds": total,
        "setup_seconds": precompute,
        "profile": prof.table,
        "memory": memory.result,
    }


def ours_check(meta: dict, args, *, task: str) -> dict:
    """Loss and log-probs of the first ``batch_pairs`` pairs (file order) at the initial weights."""
    from lightning_rlhf import DPOModule, PreferenceDataModule, RewardModule

    cfg = meta["config"]
    data = PreferenceDataModule(
        meta["tokenizer"], meta["pairs"], batch_size=cfg["batch_pairs"], max_length=cfg["max_length"]
    )
    data.setup("fit")
    batch = next(iter(data.reference_dataloader("train")))
    with torch.no_grad():
        if task == "dpo":
            module = DPOModule(meta["policy"], diagnostic_batches=0)
            module.configure_model()
            _, metrics = module.compute_loss(batch, "train")
            return {k: float(metrics[k]) for k in ("loss", "logps/chosen", "logps/rejected")}
        module = RewardModule(meta["reward_model"])
        module.configure_model()
        chosen, rejected = module.score_pairs(batch)
        out = module.loss(chosen, rejected)
        return {
            "loss": float(out.loss),
            "reward/chosen": float(chosen.mean()),
            "reward/rejected": float(rejected.mean()),
        }


# --------------------------------------------------------------------------------------------- TRL 1.16


def trl_run_args(args, seed: int, name: str) -> dict:
    """``TrainingArguments`` every TRL side shares: CPU in ``--precision``, no saving or reporting, a log
    every step (the step-1 loss), gradient-norm clipping at 1.0 like ours."""
    return dict(
        output_dir=str(Path(args.work) / name),
        bf16=args.precision.startswith("bf16"),
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _trl_common(meta: dict, args) -> dict:
    cfg = meta["config"]
    return dict(
        **trl_run_args(args, cfg["seed"], "trl_out"),
        per_device_train_batch_size=cfg["micro_pairs"],
        gradient_accumulation_steps=cfg["batch_pairs"] // cfg["micro_pairs"],
        num_train_epochs=1,
        max_length=cfg["max_length"],
    )


def _trl_trainer(meta: dict, args, *, task: str):
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"])
    dataset = load_dataset("json", data_files=meta["pairs"], split="train")
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(meta["policy"], dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(meta["policy"], dtype=torch.float32)
        config = DPOConfig(
            **_trl_common(meta, args), learning_rate=1e-6, beta=0.1, precompute_ref_log_probs=args.cached
        )
        return DPOTrainer(
            model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer
        )
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(
        meta["reward_model"], num_labels=1, dtype=torch.float32
    )
    config = RewardConfig(**_trl_common(meta, args), learning_rate=1e-5)
    return RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def hf_step_clock(steps: list[dict], logged: list[dict], extra=dict):
    """A ``TrainerCallback`` that appends one row per optimizer step to ``steps`` (wall and CPU seconds, and
    what ``extra()`` returns then, e.g. counters it resets) and every dict the trainer logs to ``logged``."""
    from transformers import TrainerCallback

    clock = {"last": 0.0, "cpu": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["last"], clock["cpu"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            now, cpu = time.perf_counter(), time.process_time()
            steps.append({"seconds": now - clock["last"], "cpu_seconds": cpu - clock["cpu"], **extra()})
            clock["last"], clock["cpu"] = now, cpu

        def on_log(self, _args, state, control, logs=None, **k):
            if logs:
                logged.append(dict(logs))

    return Clock()


def first_logged(logs: list[dict], key: str) -> float | None:
    return next((float(row[key]) for row in logs if key in row), None)


def trl_pairs(meta: dict, args, *, task: str) -> dict:
    start = time.perf_counter()
    trainer = _trl_trainer(meta, args, task=task)
    setup = time.perf_counter() - start
    counter = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(rows):
        batch = collate(rows)
        counter["tokens"] += int(batch["attention_mask"].sum())
        return batch

    def tokens_since_last_step() -> dict:
        tokens, counter["tokens"] = counter["tokens"], 0
        return {"tokens": tokens}

    trainer.data_collator = counting_collator
    result = trl_train(trainer, args, tokens_since_last_step)
    result["setup_seconds"] = setup + (result["fit_seconds"] - sum(s["seconds"] for s in result["steps"]))
    return result


def trl_train(trainer, args, extra=dict) -> dict:
    """``trainer.train()`` timed step by step (:func:`hf_step_clock`), under the profilers that ``args``
    asks for; the first logged loss and gradient norm."""
    steps: list[dict] = []
    logged: list[dict] = []
    trainer.add_callback(hf_step_clock(steps, logged, extra))
    start = time.perf_counter()
    with _Profile(args.profile) as prof, _MemoryProfile(args.memory_profile) as memory:
        trainer.train()
    return {
        "steps": steps,
        "loss_step1": first_logged(logged, "loss"),
        "grad_norm_step1": first_logged(logged, "grad_norm"),
        "fit_seconds": time.perf_counter() - start,
        "profile": prof.table,
        "memory": memory.result,
    }


def trl_check(meta: dict, args, *, task: str) -> dict:
    cfg = meta["config"]
    trainer = _trl_trainer(meta, args, task=task)
    rows = [trainer.train_dataset[i] for i in range(cfg["batch_pairs"])]
    batch = trainer.data_collator(rows)
    trainer.model.eval()  # "eval" metrics bucket; no dropout in either case
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["eval"]
    if task == "dpo":
        return {
            "loss": float(loss),
            "logps/chosen": metrics["logps/chosen"][-1],
            "logps/rejected": metrics["logps/rejected"][-1],
        }
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    return {
        "loss": float(loss),
        "reward/chosen": float(chosen.mean()),
        "reward/rejected": float(rejected.mean()),
    }


# --------------------------------------------------------------------------------------------- PPO (ours)


def ours_ppo(meta: dict, args) -> dict:
    from lightning_rlhf import PPOModule, PromptDataModule

    cfg = meta["config"]
    data = PromptDataModule(
        meta["tokenizer"],
        meta["prompts"],
        batch_size=cfg["ppo_prompts"],
        max_prompt_length=cfg["ppo_prompt_length"],
        seed=cfg["seed"],
    )
    module = PPOModule(
        meta["policy"],
        reward_model=meta["reward_model"],
        max_new_tokens=cfg["ppo_new_tokens"],
        ppo_epochs=1,
        mini_batch_size=cfg["ppo_prompts"],
        micro_batch_size=cfg["ppo_micro"],
        generation_batch_size=cfg["ppo_prompts"],
        learning_rate=1e-6,
        critic_learning_rate=1e-6,
        kl_coef=0.05,
        check_first_step=False,
        gradient_checkpointing=args.gradient_checkpointing,
        old_logprobs=args.old_logprobs,
    )
    return fit_rollouts(module, data, args, steps=cfg["ppo_steps"])


def fit_rollouts(module, data, args, *, steps: int, callbacks: tuple = ()) -> dict:
    """Fit a PPOModule for ``steps`` rollouts, one row per rollout: its phases (``module._timings``), wall
    and CPU seconds of the training step (``seconds``) and end to end from the previous one's end
    (``period_seconds``: loader and loop included), prompt and response tokens; and the loss of the first
    optimizer step (the sum of the weighted micro-batch losses that went into ``manual_backward``: the
    objective that was differentiated)."""
    import lightning as L

    phases: list[dict] = []
    collect, response_tokens = module.collect, []

    def counting_collect(batch):  # the rollout's real response tokens, for the FLOP count of the report
        rollout = collect(batch)
        response_tokens.append(int(rollout.response_mask.sum()))
        return rollout

    module.collect = counting_collect
    backward, first_step = module.manual_backward, []

    def recording_backward(loss, *a, **k):
        if module.global_step == 0:
            first_step.append(float(loss))
        return backward(loss, *a, **k)

    module.manual_backward = recording_backward

    class Phases(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            row = dict(pl_module._timings)
            row["seconds"] = now - self.start
            cpu = time.process_time()
            row["cpu_seconds"] = cpu - self.cpu
            # End to end, from the previous step's end (loader, loop and hooks included), as TRL's clock.
            row["period_seconds"], row["period_cpu_seconds"] = now - self.last, cpu - self.last_cpu
            self.last, self.last_cpu = now, cpu
            row["tokens"] = int(batch["attention_mask"].sum()) + 0
            row["rows"] = int(batch["attention_mask"].shape[0])
            row["padded_prompt_length"] = int(batch["attention_mask"].shape[1])
            row["response_tokens"] = response_tokens[-1]
            phases.append(row)

    trainer = _trainer(
        Path(args.work), 1, [Phases(), *callbacks], max_steps=steps, precision=args.precision, clip=False
    )  # PPOModule clips itself (max_grad_norm=1.0, as TRL)
    start = time.perf_counter()
    with _Profile(args.profile) as prof:
        trainer.fit(module, datamodule=data)
    return {
        "steps": phases,
        "fit_seconds": time.perf_counter() - start,
        "profile": prof.table,
        "loss_step1": sum(first_step) if first_step else None,
    }


# --------------------------------------------------------------------------------------------- generation


def generation_overhead(meta: dict, args) -> dict:
    """PPO rollout generation (``sample_and_score``'s generate) vs a bare ``model.generate`` loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlhf.rollout.generation import SamplingConfig, generate_responses, left_pad_prompts

    cfg = meta["config"]
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(meta["policy"], dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in open(meta["prompts"])][: cfg["ppo_prompts"]]
    ids, mask = left_pad_prompts(tokenizer, prompts, torch.device("cpu"))
    sampling = SamplingConfig(max_new_tokens=cfg["ppo_new_tokens"], temperature=1.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def ours():
        response, _ = generate_responses(model, ids, mask, sampling, eos_token_id=eos, pad_token_id=pad)
        return response.numel()

    def bare():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg["ppo_new_tokens"],
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=None,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return out[:, ids.shape[1] :].numel()

    times: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu_times: dict[str, list[float]] = {"ours": [], "bare": []}
    for i in range(args.repeats * 2 + 1):  # alternate; the first (warm-up) call is discarded
        for name, fn in (("ours", ours), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("ours", ours)):
            torch.manual_seed(i)
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            if i:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu)
    return {"times": times, "cpu_times": cpu_times}


# --------------------------------------------------------------------------------------------- scaling


def scaling(meta: dict, args) -> dict:
    """Seconds per DPO optimizer step (policy fwd+bwd + live reference fwd) against length and batch size."""
    from lightning_rlhf import DPOModule

    cfg = meta["config"]
    module = DPOModule(meta["policy"], diagnostic_batches=0)
    module.configure_model()
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-6)
    vocab = meta["vocab_size"]
    rows = []
    lengths = [cfg["max_length"] // 4, cfg["max_length"] // 2, cfg["max_length"]]
    shapes = [(1, length) for length in lengths] + [(2, lengths[1]), (4, lengths[1])]
    for pairs, length in shapes:
        if True:
            ids = torch.randint(10, vocab, (2 * pairs, length))
            mask = torch.ones_like(ids)
            response = mask.clone()
            response[:, : length // 3] = 0
            batch = {
                "input_ids": ids,
                "attention_mask": mask,
                "response_mask": response,
                "index": torch.arange(pairs),
            }
            seconds = []
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                out, _ = module.compute_loss(batch, "train")
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if i:
                    seconds.append(time.perf_counter() - start)
            rows.append({"pairs": pairs, "length": length, "seconds": seconds, "tokens": int(mask.sum())})
    return {"rows": rows}


# --------------------------------------------------------------------------------------------- peak


def matmul_peak(meta: dict, args) -> dict:
    """float32 GFLOP/s of a large square matmul on this process's threads: the roofline of the report."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return {"matmul_gflops": 2 * 2048**3 / best / 1e9}


# --------------------------------------------------------------------------------------------- main

TASKS = (
    "ours_dpo",
    "trl_dpo",
    "ours_rm",
    "trl_rm",
    "ours_dpo_check",
    "trl_dpo_check",
    "ours_rm_check",
    "trl_rm_check",
    "ours_ppo",
    "ours_grpo",
    "trl_grpo",
    "generation",
    "scaling",
    "matmul_peak",
)


def run(argv: list[str] | None = None) -> dict:
    """Parse a worker command line and return its result (``main`` prints it as the RESULT line)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--meta", required=True, help="fixtures.json written by common.write_fixtures")
    parser.add_argument("--work", required=True, help="scratch folder of this run")
    parser.add_argument("--cached", action="store_true", help="DPO: precomputed reference log-probs")
    parser.add_argument("--no-grouping", action="store_true", help="ours: no length-grouped batches")
    parser.add_argument("--full-logits", action="store_true", help="ours: LM head on every position (before)")
    parser.add_argument(
        "--no-shared-prompts", action="store_true", help="ours: each prompt runs twice (before)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--old-logprobs", default="forward", choices=("forward", "sampling"), help="PPO")
    parser.add_argument(
        "--no-trim", action="store_true", help="PPO: rollout-wide padding, rows in order (before)"
    )
    parser.add_argument("--looped-adamw", action="store_true", help="AdamW's per-parameter loop (before)")
    parser.add_argument(
        "--head-recompute", action="store_true", help="chunk and recompute the LM head at any size"
    )
    parser.add_argument("--memory-profile", action="store_true", help="what the peak RSS is made of")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="record torch.profiler's top operators")
    parser.add_argument("--check", action="store_true", help="GRPO: one step on replayed completions")
    parser.add_argument(
        "--aggregation",
        default="token_mean",
        choices=("token_mean", "sequence_mean", "constant_length_sum"),
        help="GRPO: our loss_aggregation (TRL: the loss_type of the same objective)",
    )
    parser.add_argument(
        "--beta", type=float, default=None, help="GRPO: KL coefficient (default: the shape's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = json.loads(Path(args.meta).read_text())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    with _before_code(args):
        return _run_task(args, meta)


@contextlib.contextmanager
def _before_code(args):
    """Swap in the code as it was before an optimisation (or force an option), restored afterwards.

    Imports nothing without a flag: a TRL worker must not pay for importing lightning_rlhf (peak RSS).
    """
    if not (args.no_trim or args.looped_adamw or args.head_recompute):
        yield
        return
    import lightning_rlhf.models as models
    import lightning_rlhf.modules.base as base
    import lightning_rlhf.modules.ppo as ppo
    import lightning_rlhf.rollout.collect as collect
    import lightning_rlhf.rollout.types as types

    saved = [
        (module, name, getattr(module, name))
        for module, name in (
            (types, "select_rows"),
            (collect, "select_rows"),
            (types, "length_order"),
            (collect, "length_order"),
            (ppo, "length_order"),
            (base, "adamw"),
            (ppo, "adamw"),
            (models, "HEAD_RECOMPUTE_ELEMENTS"),
        )
    ]
    if args.no_trim:

        def untrimmed(prompt_ids, prompt_mask, response_ids, response_mask, index):
            ids = torch.cat([prompt_ids[index], response_ids[index]], 1)
            return ids, torch.cat([prompt_mask[index], response_mask[index]], 1), response_ids.shape[1]

        def in_order(prompt_mask, response_mask):
            return torch.arange(prompt_mask.shape[0], device=prompt_mask.device)

        types.select_rows = collect.select_rows = untrimmed
        types.length_order = collect.length_order = ppo.length_order = in_order
    if args.looped_adamw:

        def looped(groups, lr=None, *, fused=True):  # the kernel before the fused one, whatever is allowed
            return torch.optim.AdamW(groups, foreach=False, **({} if lr is None else {"lr": lr}))

        base.adamw = ppo.adamw = looped
    if args.head_recompute:
        models.HEAD_RECOMPUTE_ELEMENTS = 0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _run_task(args, meta: dict) -> dict:
    task = args.task
    if task.endswith("_check"):
        side, what, _ = task.split("_")
        result = (ours_check if side == "ours" else trl_check)(meta, args, task=what)
    elif task in ("ours_dpo", "ours_rm"):
        result = ours_pairs(meta, args, task=task.split("_")[1])
    elif task in ("trl_dpo", "trl_rm"):
        result = trl_pairs(meta, args, task=task.split("_")[1])
    elif task == "ours_ppo":
        result = ours_ppo(meta, args)
    elif task in ("ours_grpo", "trl_grpo"):
        from benchmarks import grpo

        result = (grpo.ours_grpo if task == "ours_grpo" else grpo.trl_grpo)(meta, args)
    elif task == "generation":
        result = generation_overhead(meta, args)
    elif task == "matmul_peak":
        result = matmul_peak(meta, args)
    else:
        result = scaling(meta, args)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    return result


def main(argv: list[str] | None = None) -> None:
    print("RESULT " + json.dumps(run(argv)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
