"""Fit a shipped YAML under configs/ for a few steps on tiny testbed models, every other setting kept.

:func:`swapped` changes only what a CPU test box lacks or cannot do, by the tables below:

* inputs: model and tokenizer paths (``MODEL_PATHS``) and data files (``DATA_FILES``: hub names become local
  stand-ins of the same format and splits, written by :func:`write_inputs`); a path the working folder has
  (the testbed configs' ``runs/testbed/...``) is kept, and a model or data key or a dataset the tables do
  not know fails by name: nothing is downloaded;
* hardware and length: ``TRAINER`` (CPU, one device, ``STEPS`` steps), a DeepSpeed strategy becomes the
  test-only CPU one with the file's own stage and offload settings, and an every-N-batches
  ``val_check_interval`` sized for the real dataset becomes ``STEPS``.

Precision (``bf16-mixed`` included) and every model, data and callback setting stay as shipped. The
stand-in policy ends its responses early (:func:`ends_early`), so a config's 512 new tokens cost seconds.

Run as a script, it fits a list of configs one after another in this process (:func:`fit_all`), recording
each outcome; the DeepSpeed ones run that way in a subprocess, so DeepSpeed never touches the pytest process.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import yaml

# configs/quickstart/run.sh in miniature: test_configs.py's chain test fits these in order, each export
# the next stage's model; test_config_runs.py fits every other YAML.
CHAIN = (
    "sft/testbed.yaml",
    "reward/testbed.yaml",
    "dpo/testbed.yaml",
    "iterative_dpo/testbed.yaml",
    "ppo/testbed.yaml",
    "ppo/paper.yaml",
    "grpo/testbed.yaml",
    "rloo/testbed.yaml",
)
STEPS = 2
TESTBED = "runs/testbed"  # where every working folder finds the shared inputs (a copy of them)
TRAINER = {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "limit_val_batches": 2}
CPU_DEEPSPEED = "deepspeed_cpu.CPUDeepSpeedStrategy"

# Model arguments (at any depth; any other key ending in _model or tokenizer must be added) -> the testbed
# folder that stands in for each.
MODEL_PATHS = {
    "model": f"{TESTBED}/sft_policy",
    "reference_model": f"{TESTBED}/sft_policy",
    "reward_model": f"{TESTBED}/reward_model",
    "critic_model": f"{TESTBED}/reward_model",
    "tokenizer": f"{TESTBED}/sft_policy",
}
DATA_KEYS = ("train_file", "val_file")
# Data a config names that a test box lacks -> a local stand-in of the same format and splits.
DATA_FILES = {
    "Anthropic/hh-rlhf": f"{TESTBED}/hh-rlhf",
    "HuggingFaceH4/ultrachat_200k": f"{TESTBED}/ultrachat_200k",
    "data/apps_train.jsonl": f"{TESTBED}/apps_train.jsonl",
    "runs/quickstart_programs/prompts_train.jsonl": f"{TESTBED}/program_prompts.jsonl",
}


class UnknownInput(KeyError):
    """A config names a model or data input the tables above do not cover."""


def swapped(config: dict, where: str, workdir: Path) -> dict:
    """``config`` (a parsed YAML) with the test-box changes of the module docstring, nothing else."""
    config = copy.deepcopy(config)
    _swap_inputs(config, "", where, workdir)
    trainer = config.setdefault("trainer", {})
    if "strategy" in trainer:
        trainer["strategy"] = cpu_strategy(trainer["strategy"])
    trainer.update(TRAINER)
    if isinstance(trainer.get("val_check_interval"), int):
        # Every N batches, N sized for the real dataset (500); Lightning refuses an N longer than the epoch.
        trainer["val_check_interval"] = STEPS
    return config


def _is_input(key: str) -> bool:
    return key in MODEL_PATHS or key.endswith(("_model", "tokenizer")) or key in DATA_KEYS


def _swap_inputs(node: dict | list, dotted: str, where: str, workdir: Path) -> None:
    """Replace each model path and data file in ``node`` (at any depth) that the working folder lacks."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = f"{dotted}.{key}" if isinstance(node, dict) else f"{dotted}[{key}]"
        if isinstance(value, (dict, list)):
            _swap_inputs(value, name.lstrip("."), where, workdir)
        elif isinstance(key, str) and isinstance(value, str) and _is_input(key):
            if (workdir / value).exists():
                continue
            standin = DATA_FILES.get(value) if key in DATA_KEYS else MODEL_PATHS.get(key)
            if standin is None:
                table = "DATA_FILES" if key in DATA_KEYS else "MODEL_PATHS"
                raise UnknownInput(
                    f"{where}: {name.lstrip('.')} = {value!r} is not in the working folder and has no "
                    f"stand-in; add one to {table} in tests/config_runs.py"
                )
            node[key] = standin


def cpu_strategy(strategy):
    """A DeepSpeed strategy (by registry name or class_path) as the CPU test strategy, same init args."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    if isinstance(strategy, str):
        entry = StrategyRegistry[strategy] if strategy in StrategyRegistry else None  # .get() builds one
        if entry is None or not issubclass(entry["strategy"], DeepSpeedStrategy):
            return strategy
        return {"class_path": CPU_DEEPSPEED, "init_args": dict(entry["init_params"])}
    if isinstance(strategy, dict) and strategy.get("class_path", "").endswith("DeepSpeedStrategy"):
        return {**strategy, "class_path": CPU_DEEPSPEED}
    return strategy


def uses_deepspeed(configs: list[dict]) -> bool:
    strategies = [c.get("trainer", {}).get("strategy") for c in configs]
    return any(isinstance(s, dict) and s.get("class_path") == CPU_DEEPSPEED for s in strategies)


def write_swapped(sources: list[Path], workdir: Path, where: str) -> tuple[list[Path], bool]:
    """Swapped copies of ``sources`` (later files win, as with repeated --config) in ``workdir``."""
    files, configs = [], []
    for i, source in enumerate(sources):
        config = swapped(yaml.safe_load(source.read_text()), where, workdir)
        configs.append(config)
        files.append(workdir / f"config_{i}_{source.name}")
        files[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    return files, uses_deepspeed(configs)


# ------------------------------------------------------------------------------------------ the inputs
def write_inputs(root: Path) -> None:
    """The testbed (nano models) plus a reward model and the stand-ins of ``DATA_FILES``, in ``root``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.models import build_reward_model
    from lightning_rlhf.testbed.task import TaskConfig

    # 64 rows: the largest batch of the configs run here (PPO's rollout batch of 64 prompts).
    sizes = SplitSizes(
        sft_train=64, sft_eval=8, pairs_train=64, pairs_eval=8, prompts_train=64, prompts_eval=4
    )
    write_testbed(root, TaskConfig(seed=0), sizes, model_size="nano")
    tokenizer = AutoTokenizer.from_pretrained(root / "init_policy")
    policy = AutoModelForCausalLM.from_pretrained(root / "init_policy")
    ends_early(policy, tokenizer.eos_token_id)
    policy.save_pretrained(root / "sft_policy")
    tokenizer.save_pretrained(root / "sft_policy")
    build_reward_model("nano", tokenizer).save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")
    _write_hh(root, root / "hh-rlhf")
    _write_ultrachat(root, root / "ultrachat_200k")
    _write_apps(root / "apps_train.jsonl")
    _write_program_prompts(root / "program_prompts.jsonl")


def ends_early(model, eos_token_id: int, p_eos: float = 0.25) -> None:
    """Make a testbed Llama say EOS with probability ~``p_eos`` at every step, whatever it was given.

    The real-scale configs allow 256-512 new tokens for 64 prompts, all of which an untrained model fills:
    minutes of decoding on 2 cores for nothing the test looks at. So coordinate 0 of the residual stream is
    held at 1 (the embeddings set it, no layer writes to it), which RMSNorm turns into ~sqrt(hidden) at the
    head, and only EOS reads it. Responses then end after ~1 / p_eos tokens; the config's max_new_tokens
    still bounds them.
    """
    import math

    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        vocab, hidden = head.shape  # the other logits are ~0: EOS against vocab - 1 near-equal ones
        head[eos_token_id, 0] = math.log(p_eos / (1 - p_eos) * (vocab - 1)) / math.sqrt(hidden)


def _testbed_rows(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


def _save_splits(folder: Path, splits: dict[str, list[dict]]) -> None:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(folder)


def _write_hh(root: Path, folder: Path) -> None:
    """Anthropic/hh-rlhf's form from the testbed's pairs: chosen / rejected transcripts only (the prompt is
    implicit: up to the last "\n\nAssistant:"), splits train and test.

    """

    def transcript(pair: dict) -> dict:
        turn = f"\n\nHuman: {pair['prompt']}\n\nAssistant:"
        return {"chosen": turn + pair["chosen"], "rejected": turn + pair["rejected"]}

    train = [transcript(p) for p in _testbed_rows(root, "pairs_train.jsonl")]
    test = [transcript(p) for p in _testbed_rows(root, "pairs_eval.jsonl")]
    _save_splits(folder, {"train": train, "test": test})


def _write_ultrachat(root: Path, folder: Path) -> None:
    """HuggingFaceH4/ultrachat_200k's form from the testbed's SFT rows: prompt, prompt_id and messages
    columns, splits train_sft and test_sft."""

    def chat(i: int, row: dict) -> dict:
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        return {"prompt": row["prompt"], "prompt_id": str(i), "messages": messages}

    splits = {"train_sft": "sft_train.jsonl", "test_sft": "sft_eval.jsonl"}
    _save_splits(
        folder, {k: [chat(i, r) for i, r in enumerate(_testbed_rows(root, v))] for k, v in splits.items()}
    )


def _write_apps(path: Path) -> None:
    """APPS' form: problem_id, question and its tests as an ``input_output`` JSON string."""
    rows = []
    for i in range(64):
        tests = {"inputs": [f"{i}\n"], "outputs": [f"{i * i}\n"]}
        rows.append(
            {"problem_id": i, "question": "Read n and print n squared.", "input_output": json.dumps(tests)}
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_program_prompts(path: Path) -> None:
    """Program testbed prompt rows (prompt, tests, public_tests, tier), as the quickstart writes them."""
    import random

    from lightning_rlhf.testbed.programs import ProgramTask

    rng, task = random.Random(0), ProgramTask()
    rows = []
    for i in range(64):
        problem = task.sample(("intro", "interview", "competition")[i % 3], rng)
        rows.append(
            {
                "prompt": problem.prompt,
                "tests": json.dumps(problem.tests),
                "public_tests": json.dumps(problem.public_tests),
                "tier": problem.tier,
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def workdir_for(inputs: Path, workdir: Path) -> Path:
    """A working folder holding a copy of the shared inputs at ``runs/testbed`` (runs write next to it)."""
    shutil.copytree(inputs, workdir / TESTBED, symlinks=True)
    return workdir


# ------------------------------------------------------------------------------------------ fitting
def fit(files: list[Path]) -> int:
    """``lightning-rlhf fit --config A [--config B]`` in the current folder; returns the global step.

    On one torch thread: the nano models' ops gain nothing from two, and on a shared 2-core box the threads'
    contention made the fits 3-5x slower.
    """
    import torch

    from lightning_rlhf.cli import build_cli

    args = ["fit"]
    for file in files:
        args += ["--config", str(file)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_cli(args).trainer.global_step
    finally:
        torch.set_num_threads(threads)


def fit_all(jobs: list[dict]) -> None:
    """Fit each ``{"workdir", "files", "record"}`` in order; write ``{"global_step"}`` or ``{"error"}``."""
    for job in jobs:
        os.chdir(job["workdir"])
        start = time.perf_counter()
        try:
            record = {"global_step": fit([Path(f) for f in job["files"]])}
        except BaseException:  # noqa: B036  (a CLI error is a SystemExit; record it and go on)
            record = {"error": traceback.format_exc()}
        record["seconds"] = round(time.perf_counter() - start, 1)
        Path(job["record"]).write_text(json.dumps(record))


_FIT_ALL_JOB = """
import json, os, sys
import deepspeed_cpu  # sets DS_ACCELERATOR=cpu before anything imports deepspeed
from config_runs import fit_all
fit_all(json.loads(open(sys.argv[1]).read()))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as tests/deepspeed_runs.py: skip native teardown, which once aborted after the last fit
"""


def fit_all_in_subprocess(jobs: list[dict], out_dir: Path, timeout_s: float, processes: int = 2) -> None:
    """:func:`fit_all` in processes of their own, each rank 0 of 1 (DeepSpeed's process group stays out of
    pytest), forked from the preloaded server (tests/fork_server.py; a fresh interpreter paid ~8 s of
    imports).

    The jobs are dealt round-robin to ``processes`` processes that run side by side: each is single-threaded
    (see fit()), so one alone leaves the second core idle when pytest runs on one worker (measured on 2
    cores: the 24 fits took 103 s in one process, 48 s in two). Their logs are joined into ``fit_all.log``.
    """
    from fork_server import free_port
    from resume_helpers import start_job_process

    running = []
    for i in range(processes):
        part = jobs[i::processes]
        if not part:
            continue
        (out_dir / f"jobs{i}.json").write_text(json.dumps(part))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", NODE_RANK="0", OMP_NUM_THREADS="1")
        log = out_dir / f"fit_all{i}.log"
        running.append(start_job_process(_FIT_ALL_JOB, [str(out_dir / f"jobs{i}.json")], env, log))
    deadline = time.monotonic() + timeout_s
    for process in running:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    logs = [(out_dir / f"fit_all{i}.log").read_text() for i in range(len(running))]
    (out_dir / "fit_all.log").write_text("".join(logs))
