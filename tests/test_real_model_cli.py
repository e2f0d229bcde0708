"""A new user's path on a real-shaped chat model folder (#16): SFT -> RM -> DPO -> PPO -> export from another
directory -> plain-transformers scoring, all through the `lightning-rlhf` command, reading what it prints.

One subprocess runs the stages in order (as a user's shell would, one command each), with relative paths
from a project folder; the export runs from a different folder. About a minute on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lightning_rlhf.models import sequence_scores
from tests.chat_model import QUESTIONS, SYSTEM, write_chat_data, write_chat_model

TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]


def stage(name, model_args, data_args, steps, export):
    return [
        "fit",
        f"--model=lightning_rlhf.{name}",
        *model_args,
        *data_args,
        *TRAINER,
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir=runs/{export}",
        "--trainer.callbacks+=lightning_rlhf.HFExport",
        f"--trainer.callbacks.dirpath=out/{export}",
    ]


STAGES = [
    stage(
        "SFTModule",
        ["--model.model=chat_model", "--model.learning_rate=0.003"],
        ["--data=lightning_rlhf.SFTDataModule", "--data.train_file=data/sft.jsonl", "--data.batch_size=8"],
        8,
        "sft",
    ),
    stage(
        "RewardModule",
        ["--model.model=out/sft", "--model.learning_rate=0.003"],
        [
            "--data=lightning_rlhf.PreferenceDataModule",
            "--data.train_file=data/pairs.jsonl",
            "--data.batch_size=8",
        ],
        8,
        "rm",
    ),
    stage(
        "DPOModule",
        ["--model.model=out/sft", "--model.precompute_reference=true", "--model.reference_cache_dir=cache"],
        [
            "--data=lightning_rlhf.PreferenceDataModule",
            "--data.train_file=data/pairs.jsonl",
            "--data.batch_size=8",
        ],
        2,
        "dpo",
    ),
    stage(
        "PPOModule",
        [
            "--model.model=out/sft",
            "--model.reward_model=out/rm",
            "--model.mini_batch_size=4",
            "--model.micro_batch_size=4",
            "--model.max_new_tokens=6",
        ],
        [
            "--data=lightning_rlhf.PromptDataModule",
            "--data.train_file=data/prompts.jsonl",
            "--data.batch_size=8",
            "--data.max_prompt_length=12",  # cuts the system turn: the truncation warning must say so
        ],
        4,
        "ppo",
    ),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    write_chat_model(project / "chat_model")
    write_chat_data(project / "data")
    script = "import sys\nfrom lightning_rlhf.cli import cli_main\n"
    for i, args in enumerate(STAGES):
        script += f"print('=== stage {i}', file=sys.stderr, flush=True)\ncli_main({args!r})\n"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "LIGHTNING_RLHF_VERBOSE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=project, capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    shown = proc.stdout + proc.stderr
    return project, shown, env


def test_each_stage_prints_its_data_summary_and_export(run):
    project, shown, _ = run
    assert "data/sft.jsonl (train split): rows=32, kept=32" in shown
    assert "data/pairs.jsonl (train split): rows=32, kept=32" in shown
    assert "cached reference log-probs of 32 pairs" in shown
    for folder, kind in (
        ("sft", "LlamaForCausalLM"),
        ("rm", "LlamaForSequenceClassification"),
        ("ppo", "LlamaForCausalLM"),
    ):
        assert f"exported {kind} to out/{folder}" in shown
    # The exported RM gets a pad token other than EOS, and says which.
    assert "out/rm: pad token set to '<|endoftext|>' (was EOS)" in shown
    # max_prompt_length cut the system turn: the user is told, with the prompt as the model sees it.
    assert (
        "data/prompts.jsonl (train split): 32 of 32 kept rows were truncated (max_prompt_length=12)" in shown
    )
    assert "<|im_start|>assistant\\n'" in shown
    for noise in ("💡 Tip", "module(s) in eval mode", "LeafSpec", "Setting accelerator to CPU", "Epoch 0/-2"):
        assert noise not in shown, noise


def test_the_exported_reward_model_ranks_alike_in_plain_transformers(run):
    project, _, _ = run
    folder = project / "out" / "rm"
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for side in ("right", "left"):
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=side)
        assert tokenizer.pad_token_id != tokenizer.eos_token_id == plain.config.eos_token_id
        texts = []
        for question, good, bad in QUESTIONS:
            prompt = [SYSTEM, {"role": "user", "content": question}]
            for answer in (good, bad):
                chat = [*prompt, {"role": "assistant", "content": answer}]
                texts.append(tokenizer.apply_chat_template(chat, tokenize=False).rstrip("\n"))
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            theirs = plain(**batch).logits[:, 0]
            ours = sequence_scores(plain, batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        chosen, rejected = theirs[0::2], theirs[1::2]
        assert torch.equal(chosen > rejected, ours[0::2] > ours[1::2])  # the same ranking, pair by pair


def test_export_from_another_directory_loads_only_the_policy(run, tmp_path):
    project, _, env = run
    (checkpoint,) = (project / "runs" / "ppo").rglob("*.ckpt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_rlhf.cli",
            "export",
            "--checkpoint",
            str(checkpoint),
            "--out",
            "policy",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported to policy" in proc.stdout
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    trained = AutoModelForCausalLM.from_pretrained(project / "out" / "ppo")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[name], rtol=0, atol=0, msg=name)
