"""`lightning-rlhf export` from any working directory: relative paths are written absolute (#16 item 6)."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_rlhf import SFTDataModule, SFTModule
from lightning_rlhf.cli import cli_main
from lightning_rlhf.modules.base import absolute_local_paths
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig


def test_only_existing_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "sft_policy").mkdir(parents=True)
    (tmp_path / "tests.json").write_text("{}")
    hparams = {
        "model": "out/sft_policy",
        "hub": "meta-llama/Llama-2-7b-hf",  # no such local folder: a hub name, left alone
        "absolute": "/etc",
        "nested": {"class_path": "x.Y", "init_args": {"tests_file": "tests.json", "tag": "raise"}},
        "files": ["tests.json", "missing.json"],
        "number": 3,
        "template": "{% for m in messages %}\n{% endfor %}",
    }
    assert absolute_local_paths(hparams) == {
        **hparams,
        "model": str(tmp_path / "out" / "sft_policy"),
        "nested": {
            "class_path": "x.Y",
            "init_args": {"tests_file": str(tmp_path / "tests.json"), "tag": "raise"},
        },
        "files": [str(tmp_path / "tests.json"), "missing.json"],
    }


@pytest.fixture
def sft_checkpoint(tmp_path, monkeypatch):
    """An SFT fit run from ``tmp_path/project`` with every path relative, as a user's config has them."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    sizes = SplitSizes(sft_train=32, sft_eval=8, pairs_train=8, pairs_eval=8, prompts_train=8, prompts_eval=8)
    write_testbed("runs/testbed", TaskConfig(seed=0), sizes, model_size="nano")
    L.seed_everything(0, verbose=False)
    module = SFTModule("runs/testbed/init_policy", learning_rate=1e-2)
    data = SFTDataModule("runs/testbed/init_policy", "runs/testbed/sft_train.jsonl", batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="runs/sft",
    )
    trainer.fit(module, data)
    (checkpoint,) = (project / "runs" / "sft").rglob("*.ckpt")
    return checkpoint, module


def test_export_from_another_directory_writes_the_trained_weights(sft_checkpoint, tmp_path, monkeypatch):
    checkpoint, module = sft_checkpoint
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["model"] == str(tmp_path / "project" / "runs/testbed/init_policy")
    assert module.hparams.model == "runs/testbed/init_policy"  # the live module keeps what the user gave
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli_main(["export", "--checkpoint", str(checkpoint), "--out", "exported"])
    exported = AutoModelForCausalLM.from_pretrained(elsewhere / "exported")
    trained = module.policy.state_dict()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert (elsewhere / "exported" / "tokenizer.json").is_file()


def test_a_checkpoint_whose_weights_do_not_fit_is_named(sft_checkpoint, tmp_path):
    checkpoint, _ = sft_checkpoint
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if "lm_head" not in k}
    torch.save(saved, tmp_path / "cut.ckpt")
    from lightning_rlhf.export import export_checkpoint

    with pytest.raises(
        ValueError, match=r"cut.ckpt: its 'policy' weights do not fit .*missing \['lm_head.weight'\]"
    ):
        export_checkpoint(tmp_path / "cut.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
