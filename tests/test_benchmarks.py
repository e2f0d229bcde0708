"""The benchmark harness (benchmarks/run.py) in its tiny --smoke shape, so it cannot rot; no timings checked.

The step-1 parity with TRL (same loss and log-probs on the same first batch) runs when trl is importable
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
        "## Generation overhead",
        "## Scaling",
        "## Optimisations, before and after",
        "## Profiles",
    ):
        assert section in text, section
    # The report can be rewritten from the raw measurements alone.
    again = tmp_path / "again.md"
    run.main(["--from-json", str(tmp_path / "raw.json"), "--out", str(again)])
    assert again.read_text() == text


def test_the_before_code_of_an_ablation_does_not_leak_into_later_runs(fixtures, tmp_path):
    import lightning_rlhf.modules.dpo as dpo_module

    shipped = dpo_module.response_logps
    meta = str(fixtures / "smoke" / "fixtures" / "fixtures.json")
    workers.run(["ours_dpo", "--full-logits", "--meta", meta, "--work", str(tmp_path)])
    assert dpo_module.response_logps is shipped


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
