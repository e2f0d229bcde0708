"""GRPO side by side: ``PPOModule(advantage=GRPO)`` against TRL 1.16's ``GRPOTrainer``, one process a run.

Both sides read the word testbed that ``common.write_grpo_fixtures`` writes (the same initial policy folder,
tokenizer and prompts file) and are scored by the same reward object, the testbed's gold reward of the
decoded text. They are set up to optimise the same objective with the same work per step:

============================  =======================================  ====================================
                              ours: ``PPOModule``                      TRL: ``GRPOConfig``
============================  =======================================  ====================================
group size                    ``num_generations``                      ``num_generations``
prompts x group per step      data ``batch_size`` x group              micro-batch x accumulation steps
one optimizer step a rollout  ``mini_batch_size`` = the rollout        ``steps_per_generation`` = accum.
micro-batch (sequences)       ``micro_batch_size``                     ``per_device_train_batch_size``
epochs over a rollout         ``ppo_epochs=1``                         ``num_iterations=1``
advantage                     ``GRPO(scale_rewards=True)``             ``scale_rewards="group"``
KL to the reference           ``kl_penalty="loss"`` (k3), ``kl_coef``  ``beta`` (k3 in the loss)
loss aggregation              ``loss_aggregation``                     ``loss_type`` (``AGGREGATIONS``)
clip, lr, grad-norm clip      ``clip_range=0.2``, 1e-6, 1.0            ``epsilon=0.2``, 1e-6, 1.0
sampling                      temperature 1, no top-k / top-p          the same
============================  =======================================  ====================================

``token_mean`` is TRL's default ``dapo`` (token losses over the tokens of the whole accumulated batch),
``sequence_mean`` is ``grpo`` (each response's token mean, averaged) and ``constant_length_sum`` is
``dr_grpo`` (each response's token sum over ``max_completion_length``, averaged). TRL's ``bnpo`` normalises
per micro-batch and has no counterpart.

One difference stays by design: with one update per rollout TRL takes the old log-probs as the update's own
(detached: ratio 1 by construction) and runs no forward for them; ours runs a policy forward per rollout as
shipped (``old_logprobs="forward"``) or reads them from the sampling logits (``"sampling"``); both rows are
measured.

The step-1 check (``--check``) replaces generation on both sides by the fixed completions of
``completions.json`` (the j-th response to a prompt is its j-th completion there) and trains one step on
``check_prompts.jsonl`` (one step's worth of distinct prompts, so both samplers draw the same set). It reports
the loss of that step, the gradient norm before clipping and the mean reward: the same weights, tokens and
rewards must give the same numbers on both sides.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.workers import _MemoryProfile, fit_rollouts, trl_run_args, trl_train

ROOT = Path(__file__).resolve().parent.parent

#: Our ``loss_aggregation`` -> TRL's ``loss_type`` with the same objective.
AGGREGATIONS = {"token_mean": "dapo", "sequence_mean": "grpo", "constant_length_sum": "dr_grpo"}


class GoldText:
    """The testbed's gold reward of ``(prompt, completion)`` texts; one object serves both sides.

    ``lightning_rlhf/testbed/task.py`` is loaded from its file: importing it as ``lightning_rlhf.testbed``
    would run the package's ``__init__``, which imports Lightning, into the TRL worker (peak RSS). Records
    every score it gives (``scores``), so both sides' rewards can be compared.
    """

    __name__ = "gold"  # TRL names a reward function's metrics after it

    def __init__(self, task_dir: str) -> None:
        spec = importlib.util.spec_from_file_location(
            "_testbed_task", ROOT / "lightning_rlhf" / "testbed" / "task.py"
        )
        task = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
        if not hasattr(task, "WordTask"):
            spec.loader.exec_module(task)  # registered first: dataclasses look their module up
        config = json.loads((Path(task_dir) / "task.json").read_text())["config"]
        self.task = task.WordTask(task.TaskConfig(**config))
        self.scores: list[float] = []

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        out = [self.task.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
        self.scores += out
        return out


class Replay:
    """The fixed completions of ``completions.json``: the j-th time a prompt's ids are asked for in one
    call, its j-th completion. Stands in for sampling on both sides in the step-1 check."""

    def __init__(self, path: str) -> None:
        rows = json.loads(Path(path).read_text())
        self.table = {tuple(row["prompt_ids"]): row["completions"] for row in rows}

    def __call__(self, prompt_rows: list[list[int]]) -> list[list[int]]:
        seen: dict[tuple, int] = {}
        out = []
        for ids in prompt_rows:
            key = tuple(ids)
            if key not in self.table:
                raise KeyError(
                    f"prompt ids {list(key)} are not in the replayed completions: this side tokenized a "
                    "prompt unlike completions.json's prompt_ids, or drew one outside check_prompts"
                )
            out.append(self.table[key][seen.get(key, 0)])
            seen[key] = seen.get(key, 0) + 1
        return out


def _settings(meta: dict, args) -> dict:
    shape = meta["config"]["grpo"]
    beta = shape["beta"] if args.beta is None else args.beta
    steps = 1 if args.check else shape["steps"]
    prompts = meta["grpo"]["check_prompts" if args.check else "prompts"]
    return {**shape, "beta": beta, "steps": steps, "prompts_file": prompts}


# --------------------------------------------------------------------------------------------- ours


def ours_grpo(meta: dict, args) -> dict:
    from lightning_rlhf import GRPO, PPOModule, PromptDataModule
    from lightning_rlhf.rollout import collect

    s, files = _settings(meta, args), meta["grpo"]
    reward = GoldText(files["task_dir"])
    group = s["prompts"] * s["generations"]
    data = PromptDataModule(
        files["policy"],
        s["prompts_file"],
        batch_size=s["prompts"],
        seed=meta["config"]["seed"],
        apply_chat_template=False,
    )
    module = PPOModule(
        files["policy"],
        reward_function=reward,
        advantage=GRPO(scale_rewards=True),
        num_generations=s["generations"],
        max_new_tokens=s["new_tokens"],
        temperature=1.0,
        ppo_epochs=1,
        mini_batch_size=group,
        micro_batch_size=s["micro"],
        generation_batch_size=group,
        clip_range=0.2,
        kl_coef=s["beta"],
        kl_penalty="loss",
        loss_aggregation=args.aggregation,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        old_logprobs=args.old_logprobs,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    norms: list[float] = []
    clip = module.clip_gradients

    def recording_clip(optimizer, *a, **k):  # the gradient norm before clipping, as TRL logs it
        if not norms:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return clip(optimizer, *a, **k)

    module.clip_gradients = recording_clip
    shipped = collect.generate_responses
    if args.check:
        replay = Replay(files["completions"])

        def replayed(model, prompt_ids, prompt_mask, sampling, *, eos_token_id, pad_token_id, **_):
            rows = replay([ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask, strict=True)])
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            return ids, mask

        collect.generate_responses = replayed
    try:
        with _MemoryProfile(args.memory_profile) as memory:
            result = fit_rollouts(module, data, args, steps=s["steps"])
    finally:  # in-process runs (tests) must not keep the replay
        collect.generate_responses = shipped
    result.update(grad_norm_step1=norms[0] if norms else None, memory=memory.result)
    result.update(_rewards(reward, group))
    return result


def _rewards(reward: GoldText, group: int) -> dict:
    first = reward.scores[:group]
    return {"reward_step1": sum(first) / len(first) if first else None}


# --------------------------------------------------------------------------------------------- TRL 1.16


def trl_grpo(meta: dict, args) -> dict:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    s, files = _settings(meta, args), meta["grpo"]
    group = s["prompts"] * s["generations"]
    reward = GoldText(files["task_dir"])
    config = GRPOConfig(
        **trl_run_args(args, meta["config"]["seed"], "trl_grpo"),
        num_generations=s["generations"],
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=group // s["micro"],  # steps_per_generation defaults to it
        max_completion_length=s["new_tokens"],
        max_steps=s["steps"],
        num_iterations=1,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        epsilon=0.2,
        beta=s["beta"],
        scale_rewards="group",
        loss_type=AGGREGATIONS[args.aggregation],
        learning_rate=1e-6,
        disable_dropout=True,
    )
    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(files["policy"], dtype=torch.float32),
        reward_funcs=[reward],
        args=config,
        train_dataset=load_dataset("json", data_files=s["prompts_file"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(files["policy"]),
    )
    setup = time.perf_counter() - start
    phase = {"generation": 0.0, "scoring": 0.0, "inference": 0.0, "tokens": 0, "response_tokens": 0}

    def timed(fn, name):
        def wrapper(*a, **k):
            begin = time.perf_counter()
            out = fn(*a, **k)
            if name != "inference" or not torch.is_grad_enabled():  # no-grad log-probs: the reference's
                phase[name] += time.perf_counter() - begin
            if name == "generation":  # (prompt_ids, completion_ids, ...)
                phase["tokens"] += sum(len(ids) for ids in out[0])
                phase["response_tokens"] += sum(len(ids) for ids in out[1])
            return out

        return wrapper

    trainer._generate = timed(trainer._generate, "generation")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "scoring")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, "inference"
    )
    if args.check:
        replay = Replay(files["completions"])
        trainer._generate_single_turn = lambda prompt_ids, *a, **k: (replay(prompt_ids), None)

    def phases_since_last_step() -> dict:
        row = dict(phase)
        phase.update(generation=0.0, scoring=0.0, inference=0.0, tokens=0, response_tokens=0)
        return row

    result = trl_train(trainer, args, phases_since_last_step)
    for row in result["steps"]:
        row["update"] = row["seconds"] - row["generation"] - row["scoring"] - row["inference"]
    result.update(setup_seconds=setup, trl_version=__import__("trl").__version__)
    result.update(_rewards(reward, group))
    return result
