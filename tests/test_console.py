"""What reaches the terminal: the package's own lines on rank zero, data truncation with an example,
third-party noise filtered by the CLI and kept with --verbose (#16 items 3 and 8)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlhf.data.prompts import PromptDataModule
from lightning_rlhf.data.sft import SFTDataModule

REPO = Path(__file__).resolve().parents[1]
SAY = "import logging, lightning_rlhf; logging.getLogger('lightning_rlhf.data.base').info('kept 3 of 4 rows')"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "LIGHTNING_RLHF_VERBOSE")
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env}, timeout=120
    )


def test_package_info_lines_reach_stderr_without_logging_configured():
    proc = run_python(SAY)
    assert proc.returncode == 0, proc.stderr
    assert "lightning_rlhf: kept 3 of 4 rows" in proc.stderr


def test_other_ranks_print_nothing():
    proc = run_python(SAY, RANK="1", LOCAL_RANK="1")
    assert proc.returncode == 0, proc.stderr
    assert "kept 3 of 4 rows" not in proc.stderr


def test_an_application_that_configures_logging_gets_each_line_once_in_its_format():
    code = (
        "import logging; logging.basicConfig(format='APP %(name)s %(message)s', level=logging.INFO); " + SAY
    )
    proc = run_python(code)
    assert proc.stderr.count("kept 3 of 4 rows") == 1, proc.stderr
    assert "APP lightning_rlhf.data.base kept 3 of 4 rows" in proc.stderr


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_truncated_rows_warn_with_the_count_the_limits_and_what_the_first_became(
    tmp_path, tokenizer_dir, caplog
):
    rows = [
        {"prompt": " 3 words about hill:", "completion": " nona"},
        {"prompt": " 3 words about hill, not dotu:", "completion": " nona reko lavo bili"},
    ]
    dm = SFTDataModule(
        tokenizer_dir, write_jsonl(tmp_path / "sft.jsonl", rows), max_length=8, apply_chat_template=False
    )
    with caplog.at_level(logging.INFO, logger="lightning_rlhf"):
        dm.setup("fit")
    assert dm.stats["train"]["truncated"] == 1
    (warning,) = [r for r in caplog.records if "truncated" in r.getMessage() and r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert "1 of 2 kept rows were truncated (max_length=8)" in text and "row 1 (0-based) became" in text
    kept = dm.datasets["train"][1]["input_ids"]
    assert repr(dm.tokenizer.decode(kept, skip_special_tokens=False)) in text  # exactly what the model sees


def test_an_untruncated_prompt_file_says_nothing_more_than_its_summary(tmp_path, tokenizer_dir, caplog):
    rows = [{"prompt": " 3 words about hill:"}, {"prompt": " 2 words about wood:"}]
    dm = PromptDataModule(
        tokenizer_dir, write_jsonl(tmp_path / "p.jsonl", rows), batch_size=1, apply_chat_template=False
    )
    with caplog.at_level(logging.INFO, logger="lightning_rlhf"):
        dm.setup("fit")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "rows=2, kept=2" in caplog.records[0].getMessage()


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory):
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.task import TaskConfig

    out = tmp_path_factory.mktemp("console_testbed")
    sizes = SplitSizes(
        sft_train=64, sft_eval=16, pairs_train=16, pairs_eval=16, prompts_train=16, prompts_eval=16
    )
    write_testbed(out, TaskConfig(seed=0), sizes, model_size="nano")
    return out


def fit_sft(testbed: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "fit",
        "--config",
        str(REPO / "configs/sft/testbed.yaml"),
        "--model.model",
        str(testbed / "init_policy"),
        "--data.train_file",
        str(testbed / "sft_train.jsonl"),
        "--data.val_file",
        str(testbed / "sft_eval.jsonl"),
        "--data.max_length",
        "12",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.callbacks.init_args.dirpath",
        str(out / "policy"),
        *extra,
    ]
    code = f"from lightning_rlhf.cli import cli_main; cli_main({args!r})"
    return run_python(code, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_the_cli_shows_our_lines_and_filters_third_party_noise(testbed_dir, tmp_path):
    proc = fit_sft(testbed_dir, tmp_path / "quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stdout + proc.stderr
    assert "lightning_rlhf: " in shown and "sft_train.jsonl (train split): rows=64, kept=64" in shown
    assert "kept rows were truncated (max_length=12)" in shown
    assert f"lightning_rlhf: exported LlamaForCausalLM to {tmp_path / 'quiet' / 'policy'}" in shown
    for noise in (
        "💡 Tip",
        "Setting accelerator to CPU",
        "module(s) in eval mode",
        "LeafSpec",
        "Writing model shards",
    ):
        assert noise not in shown, noise

    verbose = fit_sft(testbed_dir, tmp_path / "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    for noise in ("💡 Tip", "Setting accelerator to CPU"):  # --verbose brings third-party lines back
        assert noise in verbose.stdout + verbose.stderr, noise
    assert "kept rows were truncated" in verbose.stdout + verbose.stderr


def test_a_bad_setting_is_one_line_not_a_traceback(capsys):
    from lightning_rlhf.cli import cli_main
    from lightning_rlhf.validation import ConfigError

    args = [
        "fit",
        "--model=lightning_rlhf.PPOModule",
        "--model.model=m",
        "--model.mini_batch_size=8",
        "--data=lightning_rlhf.PromptDataModule",
        "--data.train_file=x.jsonl",
        "--data.batch_size=12",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lightning-rlhf: error: ConfigError: the rollout batch (data batch_size=12) is not" in err
    assert "Traceback" not in err and "--verbose" in err
    with pytest.raises(ConfigError, match="not divisible"):  # --verbose: the exception itself
        cli_main([*args, "--verbose"])


def test_ppo_and_prompt_defaults_fit_together():
    """A PPO run with every size left at its default must not stop on the rollout / mini-batch check."""
    import inspect

    from lightning_rlhf import PPOModule, PromptDataModule

    rollout = inspect.signature(PromptDataModule).parameters["batch_size"].default
    ppo = PPOModule("m", reward_function=len).hparams  # the defaults, the base class's included
    mini, micro = ppo["mini_batch_size"], ppo["micro_batch_size"]
    assert rollout % mini == 0 and mini % micro == 0


def test_third_party_deprecations_are_filtered_and_the_users_own_kept():
    import warnings

    from lightning_rlhf.console import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        for module in ("transformers.modeling_utils", "peft.tuners.lora", "my_project.train"):
            warnings.warn_explicit("`x` is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("Found 66 module(s) in eval mode", UserWarning, "f.py", 2, module="my.code")
    assert [w.filename for w in caught] == ["f.py"] and len(caught) == 1  # only my_project's deprecation
    assert caught[0].lineno == 1
