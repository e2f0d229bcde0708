"""The GPU check script runs end to end on CPU (smoke mode), so it cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "deepspeed_check.py"


def test_deepspeed_check_smoke_on_cpu(tmp_path):
    # A subprocess: DeepSpeed initialises a process group and sets MASTER_PORT/RANK variables that must not
    # leak into the test session (later DDP tests would find the port taken).
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--size", "nano", "--steps", "1", "--batch", "4", "--rollout", "8"]
    args += ["--new-tokens", "4", "--stages", "dpo,ppo", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, (result["failures"], proc.stderr[-3000:])
    variants = {(r["stage"], r["variant"]) for r in result["records"]}
    assert ("ppo", "zero3_synced") in variants and ("dpo", "zero3") in variants
    assert all(len(r["losses"]) >= 1 for r in result["records"])
    assert "| ppo | zero3 |" in out.with_suffix(".md").read_text()
