"""The GPU check script runs end to end on CPU (smoke mode), so it cannot rot between GPU sessions."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "deepspeed_check.py"


def test_deepspeed_check_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("deepspeed_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--size", "nano", "--steps", "1", "--batch", "4", "--rollout", "8"]
    code = script.main([*args, "--new-tokens", "4", "--stages", "dpo,ppo", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result["failures"]
    variants = {(r["stage"], r["variant"]) for r in result["records"]}
    assert ("ppo", "zero3_synced") in variants and ("dpo", "zero3") in variants
    assert all(len(r["losses"]) >= 1 for r in result["records"])
    assert "| ppo | zero3 |" in out.with_suffix(".md").read_text()
