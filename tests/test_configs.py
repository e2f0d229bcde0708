"""Every YAML under configs/ parses (test_config_runs.py fits each one); the lightning-rlhf command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from config_runs import CHAIN
from lightning import LightningDataModule, LightningModule

from lightning_rlhf.cli import RLHFCLI, build_cli, cli_main
from lightning_rlhf.testbed.files import SplitSizes, write_testbed
from lightning_rlhf.testbed.task import TaskConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ has no YAML files"


class ParseOnlyCLI(RLHFCLI):
    """Parses and type-checks a config (class paths, argument names and types) without building anything."""

    def instantiate_classes(self) -> None:
        pass


# configs/deepspeed/ holds strategy-only files, used after a stage config: check them on top of one.
STRATEGY_BASE = REPO / "configs" / "ppo" / "llama2-7b-hh.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses_and_builds(path, tmp_path, monkeypatch):
    """Every YAML parses; CPU ones are built too (GPU ones need CUDA and DeepSpeed to build a Trainer)."""
    monkeypatch.chdir(tmp_path)  # default_root_dir and logs land in tmp_path
    fragment = path.parent.name == "deepspeed"
    args = ["--config", str(STRATEGY_BASE)] if fragment else []
    parsed = ParseOnlyCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[*args, "--config", str(path)],
        run=False,
    )
    config = parsed.config
    if fragment:
        strategy = config.trainer.strategy
        assert strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
        assert strategy.init_args.stage == int(path.stem[4])  # zero2 / zero3 / zero3-offload
        return
    assert config.model.class_path.startswith("lightning_rlhf.")
    if config.trainer.accelerator == "cpu":
        cli = build_cli(["--config", str(path)], run=False)
        assert isinstance(cli.model, LightningModule)
        assert isinstance(cli.datamodule, LightningDataModule)


def test_testbed_configs_match_the_quickstart_settings():
    """configs/*/testbed.yaml are the CLI form of `lightning-rlhf quickstart`: the numbers must not drift."""
    import yaml

    from lightning_rlhf.quickstart import StageSettings

    settings = StageSettings()
    for stage, epochs, lr in (
        ("sft", settings.sft_epochs, settings.sft_lr),
        ("reward", settings.reward_epochs, settings.reward_lr),
        ("dpo", settings.dpo_epochs, settings.dpo_lr),
    ):
        config = yaml.safe_load((REPO / "configs" / stage / "testbed.yaml").read_text())
        assert config["trainer"]["max_epochs"] == epochs, stage
        assert config["model"]["init_args"]["learning_rate"] == lr, stage
        assert config["data"]["init_args"].get("batch_size") == settings.batch_size, stage
    dpo = yaml.safe_load((REPO / "configs/dpo/testbed.yaml").read_text())
    assert dpo["model"]["init_args"]["loss"]["init_args"]["beta"] == settings.dpo_beta
    iterative = yaml.safe_load((REPO / "configs/iterative_dpo/testbed.yaml").read_text())
    assert iterative["trainer"]["max_epochs"] == settings.iterative_dpo_epochs
    assert iterative["model"]["init_args"]["learning_rate"] == settings.iterative_dpo_lr
    paper = yaml.safe_load((REPO / "configs/ppo/paper.yaml").read_text())
    ppo = paper["model"]["init_args"]
    assert paper["trainer"]["max_epochs"] == settings.ppo_epochs
    assert paper["data"]["init_args"]["batch_size"] == settings.ppo_rollout_batch
    assert (ppo["learning_rate"], ppo["critic_learning_rate"], ppo["kl_coef"]) == (
        settings.ppo_lr,
        settings.ppo_critic_lr,
        settings.ppo_kl_coef,
    )
    assert ppo["mini_batch_size"] == settings.ppo_rollout_batch // 4
    ema = next(c for c in paper["trainer"]["callbacks"] if c["class_path"].endswith("EMAReferenceUpdate"))
    assert ema["init_args"]["decay"] == settings.ppo_ema_decay


def test_cli_chain_of_testbed_configs(tmp_path, monkeypatch):
    """configs/quickstart/run.sh in miniature: each stage's export is the next stage's model."""
    monkeypatch.chdir(tmp_path)
    cli_main(["testbed", "--out", "runs/testbed", "--model-size", "nano"])
    for stage in CHAIN:  # the configs test_config_runs.py leaves to this test
        cli_main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / stage),
                "--trainer.max_steps",
                "4",
                "--trainer.limit_val_batches",
                "1",
            ]
        )
    for folder in (
        "sft_policy",
        "reward_model",
        "dpo_policy",
        "dpo_iter_policy",
        "ppo_policy",
        "ppo_paper_policy",
        "grpo_policy",
        "rloo_policy",
    ):
        assert (tmp_path / "runs/testbed" / folder / "model.safetensors").is_file(), folder
    assert (REPO / "configs/quickstart/run.sh").read_text().count("lightning-rlhf fit --config") >= 4


def test_fit_from_testbed_config(tmp_path, monkeypatch):
    """As documented: write the testbed, then `lightning-rlhf fit --config configs/sft/testbed.yaml`."""
    monkeypatch.chdir(tmp_path)
    sizes = SplitSizes(
        sft_train=64, sft_eval=16, pairs_train=4, pairs_eval=4, prompts_train=4, prompts_eval=4
    )
    write_testbed("runs/testbed", TaskConfig(seed=0), sizes, model_size="nano")
    cli_main(["fit", "--config", str(REPO / "configs/sft/testbed.yaml"), "--trainer.max_epochs", "1"])
    checkpoints = list((tmp_path / "runs/sft").rglob("*.ckpt"))
    assert checkpoints, "fit wrote no checkpoint"
    assert list((tmp_path / "runs/sft").rglob("config.yaml"))


def test_console_script_help_lists_every_command():
    """The installed ``lightning-rlhf`` script, looked up beside this interpreter: README runs the suite as
    ``.venv/bin/python -m pytest`` without activating the venv, so the script is not on PATH there (the test
    used to fall back to ``python -m lightning_rlhf.cli`` and never ran the script)."""
    beside = shutil.which("lightning-rlhf", path=str(Path(sys.executable).parent))
    exe = beside or shutil.which("lightning-rlhf")
    assert exe is not None, "the lightning-rlhf console script is not installed (pip install -e .)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    words = set(result.stdout.replace(",", " ").replace("{", " ").replace("}", " ").split())
    for word in ("testbed", "quickstart", "study", "export", "fit", "validate", "test"):
        assert word in words, word


def test_print_config_shows_documented_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(
            [
                "fit",
                "--model",
                "lightning_rlhf.SFTModule",
                "--model.model",
                "m",
                "--data",
                "lightning_rlhf.SFTDataModule",
                "--data.train_file",
                "x.jsonl",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_rlhf.SFTModule" in printed and "learning_rate: 1.0e-05" in printed
    assert "tokenizer:" not in printed  # derived from model.init_args.model, not a setting of its own


def test_data_tokenizer_is_linked_to_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", "lightning_rlhf.SFTModule", "--model.model", "some/folder"]
    cli = build_cli(
        [*args, "--data", "lightning_rlhf.SFTDataModule", "--data.train_file", "x.jsonl"], run=False
    )
    assert cli.datamodule.tokenizer_name == "some/folder"


def test_export_from_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    """fit writes a checkpoint; `lightning-rlhf export` turns it into a folder transformers alone loads."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    sizes = SplitSizes(sft_train=32, sft_eval=8, pairs_train=4, pairs_eval=4, prompts_train=4, prompts_eval=4)
    write_testbed("runs/testbed", TaskConfig(seed=0), sizes, model_size="nano")
    cli = build_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs/sft/testbed.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks+=lightning_rlhf.HFExport",
        ]
    )
    (checkpoint,) = (tmp_path / "runs/sft").rglob("*.ckpt")
    cli_main(["export", "--checkpoint", str(checkpoint), "--out", "exported"])
    exported = AutoModelForCausalLM.from_pretrained("exported")
    at_end = AutoModelForCausalLM.from_pretrained("runs/sft/hf_model")  # written by the HFExport callback
    for (name, a), b in zip(
        exported.state_dict().items(), cli.model.policy.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
        torch.testing.assert_close(at_end.state_dict()[name], b, msg=name)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cli_main(["export", "--checkpoint", "missing.ckpt", "--out", "x"])


def test_every_public_argument_has_a_one_line_doc():
    """LightningCLI's --help shows each __init__ argument with the doc that jsonargparse parses from it."""
    import inspect

    from jsonargparse._optionals import parse_docs

    import lightning_rlhf
    from lightning_rlhf.testbed.reward import GoldReward

    classes = [getattr(lightning_rlhf, name) for name in lightning_rlhf.__all__] + [GoldReward]
    undocumented = []
    for cls in classes:
        if not inspect.isclass(cls) or inspect.isabstract(cls) or not issubclass(cls, object):
            continue
        signature = inspect.signature(cls.__init__)
        params = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        # jsonargparse reads the class docstring and the __init__ docstring, as --help does.
        docs = {**parse_docs(cls, None, None), **parse_docs(cls.__init__, None, None)} if params else {}
        undocumented += [f"{cls.__name__}.{p}" for p in params if not docs.get(p)]
    assert undocumented == []


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("sft_plain_trainer.py", ["--model-size", "nano", "--max-steps", "8"]),
        ("ppo_plain_trainer.py", ["--model-size", "nano", "--max-steps", "8"]),
    ],
)
def test_examples_run(script, args, tmp_path):
    """The example scripts a user copies from still run (shortened where they take an option for it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), "--out", str(tmp_path / "run"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gold_reward" in result.stdout


@pytest.mark.parametrize("subcommand", [[], ["fit"]])
def test_a_misspelt_flag_is_an_error_not_a_prefix_match(subcommand, capsys):
    """argparse would read --trainer.max_step as --trainer.max_steps; a typo must stop the run instead."""
    args = [
        *subcommand,
        "--model",
        "lightning_rlhf.SFTModule",
        "--model.model",
        "m",
        "--data",
        "lightning_rlhf.SFTDataModule",
        "--data.train_file",
        "x.jsonl",
        "--trainer.max_step",
        "3",
    ]
    with pytest.raises(SystemExit):
        build_cli(args, run=bool(subcommand))
    assert "unrecognized arguments: --trainer.max_step 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.init_args.clip_range", "0"], "ConfigError: PPOModule: clip_range must be > 0 (got 0.0)"),
        (["--model.init_args.value_normalization", "true"], "value_normalization"),
    ],
)
def test_a_module_config_error_reaches_the_terminal_as_one_line(
    flags, message, capsys, tmp_path, monkeypatch
):
    """A ConfigError raised in a module's __init__ while LightningCLI builds it arrives wrapped by
    jsonargparse ("Does not validate against any of the Union subtypes" and the whole config); the command
    prints the package's own message and exits 2, no traceback, no config dump."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / "configs/grpo/testbed.yaml"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Union subtypes" not in err and "Namespace(" not in err
    assert "(run with --verbose for the traceback)" in err


def test_package_error_finds_the_cause_and_leaves_others_alone():
    from lightning_rlhf.cli import package_error
    from lightning_rlhf.validation import ConfigError

    inner = ConfigError("X: y must be > 0")
    try:
        try:
            raise inner
        except ConfigError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err
    except ValueError as outer:
        assert package_error(outer) is inner
    assert package_error(ValueError("a bug")) is None
