"""The benchmark harness (benchmarks/run.py) in its tiny --smoke shape, so it cannot rot; no timings checked.

The step-1 parity with TRL (same loss and log-probs on the same first batch; for GRPO the same loss,
gradient norm and reward on the same replayed completions) runs when trl is importable
(``pip install -e ".[benchmarks]"``) and is skipped otherwise.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run, workers  # noqa: E402
from benchmarks.common import CONFIGS, write_fixtures  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_fixtures(CONFIGS["smoke"], root / "smoke" / "fixtures")
    return root


def test_smoke_run_writes_every_section_of_the_report(fixtures, tmp_path):
    out = tmp_path / "RESULTS.md"
    run.main(
        [
            "--smoke",
            "--in-process",
            "--no-trl",
            "--work",
            str(fixtures),
            "--out",
            str(out),
            "--json",
            str(tmp_path / "raw.json"),
        ]
    )
    text = out.read_text()
    for section in (
        "## Machine and versions",
        "## Training throughput",
        "## Ratios against the targets",
        "## PPO: per-phase seconds",
        "## GRPO: ours vs TRL 1.16",
        "### Per-phase seconds per step",
        "## Generation overhead",
        "## Scaling",
        "## Optimisations, before and after",
        "## What the DPO peak RSS is made of",
        "## Profiles",
    ):
        assert section in text, section
    # The report can be rewritten from the raw measurements alone.
    again = tmp_path / "again.md"
    run.main(["--from-json", str(tmp_path / "raw.json"), "--out", str(again)])
    assert again.read_text() == text


def test_the_before_code_of_an_ablation_does_not_leak_into_later_runs(fixtures, tmp_path):
    import lightning_rlhf.models as models
    import lightning_rlhf.modules.dpo as dpo_module
    import lightning_rlhf.modules.ppo as ppo
    import lightning_rlhf.rollout.collect as collect
    import lightning_rlhf.rollout.types as types

    def swappable() -> tuple:
        return (
            dpo_module.response_logps,
            types.select_rows,
            collect.select_rows,
            collect.generate_responses,
            ppo.length_order,
            ppo.adamw,
            models.HEAD_RECOMPUTE_ELEMENTS,
        )

    shipped = swappable()
    meta = str(fixtures / "smoke" / "fixtures" / "fixtures.json")
    workers.run(["ours_dpo", "--full-logits", "--meta", meta, "--work", str(tmp_path)])
    flags = ["--no-trim", "--looped-adamw", "--head-recompute"]
    workers.run(["ours_ppo", *flags, "--meta", meta, "--work", str(tmp_path / "ppo")])
    workers.run(["ours_grpo", "--check", "--meta", meta, "--work", str(tmp_path / "grpo")])  # replays
    assert swappable() == shipped


@pytest.mark.skipif(not HAS_TRL, reason="trl not installed (pip install -e '.[benchmarks]')")
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_same_loss_and_logps_as_trl_at_step_1(fixtures, tmp_path, stage):
    meta = str(fixtures / "smoke" / "fixtures" / "fixtures.json")
    common = ["--meta", meta, "--work", str(tmp_path)]
    ours = workers.run([f"ours_{stage}_check", *common])
    theirs = workers.run([f"trl_{stage}_check", *common])
    keys = [k for k in ours if k not in ("peak_rss_mb", "torch_threads")]
    assert "loss" in keys
    for key in keys:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.skipif(not HAS_TRL, reason="trl not installed (pip install -e '.[benchmarks]')")
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant_length_sum"])
def test_grpo_same_loss_gradient_norm_and_reward_as_trl_at_step_1(fixtures, tmp_path, aggregation):
    """PPOModule(advantage=GRPO) and TRL's GRPOTrainer (loss_type dapo / grpo / dr_grpo) on the same
    replayed completions from the same weights: one step gives the same loss and gradient norm."""
    meta = str(fixtures / "smoke" / "fixtures" / "fixtures.json")
    common = ["--check", "--aggregation", aggregation, "--meta", meta, "--work", str(tmp_path)]
    ours = workers.run(["ours_grpo", *common])
    theirs = workers.run(["trl_grpo", *common])
    assert ours["reward_step1"] == theirs["reward_step1"]
    assert ours["loss_step1"] == pytest.approx(theirs["loss_step1"], abs=1e-6)
    assert ours["grad_norm_step1"] == pytest.approx(theirs["grad_norm_step1"], rel=1e-5)
    assert ours["grad_norm_step1"] > 0  # the replayed rewards differ within a group: a real gradient


def test_gpu_mfu_script_runs_its_path_on_cpu_with_a_profile(tmp_path):
    from benchmarks import gpu_dpo_mfu

    out = tmp_path / "gpu.json"
    result = gpu_dpo_mfu.main(
        ["--device", "cpu", "--tiny", "--profile", "--profile-steps", "1", "--out", str(out)]
    )
    assert result == __import__("json").loads(out.read_text())
    assert result["dpo_tokens_per_second"] > 0 and result["generation_tokens_per_second"] > 0
    assert "aten::" in result["dpo_profile_table"] and result["dpo_device_busy_fraction"] is None
