"""The machinery of the crash-and-resume tests: run a training job in a real subprocess, kill it with
SIGKILL after a given step (no cleanup, no final checkpoint: a real crash), resume it from its last
checkpoint, and read what each run recorded.

A job is a Python source string run with ``python -c JOB ROOT KILL_AT RESUME [EXTRA...]``; it builds its
trainer with :data:`CALLBACKS` (pasted in front of it) so every job records the same things:
``ROOT/steps.jsonl`` gets one line per training step (global step, the batch's row indices, every logged
metric) and ``ROOT/final.pt`` whatever the job saves at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CALLBACKS = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    root, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resume = None if resume == "-" else resume
    torch.set_num_threads(1)

    def append(name, line):
        with open(os.path.join(root, name), "a") as f:
            f.write(json.dumps(line) + "\\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(trainer, val):
        return {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                if k.startswith("val/") == val and not k.startswith("time/")}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            index = batch.get("index") if isinstance(batch, dict) else None
            append("steps.jsonl", {"step": trainer.global_step, "metrics": metrics(trainer, val=False),
                                   "index": None if index is None else index.tolist()})

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                append("val.jsonl", {"step": trainer.global_step, "metrics": metrics(trainer, val=True)})

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def trainer_for(max_steps, every=1, **kwargs):
        checkpoint = ModelCheckpoint(os.path.join(root, "ckpt"), filename="{step}",
                                     every_n_train_steps=every, save_top_k=-1)
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         deterministic=True, callbacks=[Record(), KillAt(), checkpoint], **kwargs)
    """
)


def run_job(job: str, root: Path, *extra: str, kill_at: int = -1, resume: Path | None = None) -> int:
    """Run ``job`` in a fresh interpreter; returns 0, or -SIGKILL when it killed itself at ``kill_at``."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = [str(root), str(kill_at), str(resume) if resume else "-", *extra]
    proc = subprocess.run(
        [sys.executable, "-c", CALLBACKS + textwrap.dedent(job), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"training subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.returncode


def crash_and_resume(job: str, tmp_path: Path, *extra: str, kill_at: int) -> tuple[Path, Path, Path, int]:
    """The uninterrupted run, the run killed at global step ``kill_at``, and its resume from the last
    checkpoint the crashed run wrote (returned last: that checkpoint's global step).

    ModelCheckpoint runs after every other callback, so the kill at step k came before step k was saved.
    """
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    assert run_job(job, full, *extra) == 0
    assert run_job(job, crashed, *extra, kill_at=kill_at) == -signal.SIGKILL
    assert not (crashed / "final.pt").exists()
    saved = sorted((crashed / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    last_step = int(saved[-1].stem.split("=")[1])
    assert 0 < last_step < kill_at
    assert run_job(job, resumed, *extra, resume=saved[-1]) == 0
    return full, crashed, resumed, last_step


def steps(root: Path, name: str = "steps.jsonl") -> list[dict]:
    path = root / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_same_history(full: Path, crashed: Path, resumed: Path, resumed_from: int) -> None:
    """The crashed run's steps up to its last checkpoint plus the resumed run's steps equal the uninterrupted
    run's steps: the same rows in the same order (none twice, none skipped) and the same logged metrics."""
    stitched = [s for s in steps(crashed) if s["step"] <= resumed_from] + steps(resumed)
    expected = steps(full)
    assert [s["step"] for s in stitched] == [s["step"] for s in expected]
    assert [s["index"] for s in stitched] == [s["index"] for s in expected]
    assert_same_metrics(stitched, expected)
    # Validation runs: a resumed run may repeat the one at its checkpoint step; it must give the same values.
    full_val = steps(full, "val.jsonl")
    validations = [s for s in steps(crashed, "val.jsonl") if s["step"] <= resumed_from]
    validations += [s for s in steps(resumed, "val.jsonl") if s["step"] > resumed_from]
    assert_same_metrics(validations, full_val)
    for again in (s for s in steps(resumed, "val.jsonl") if s["step"] == resumed_from):
        assert_same_metrics([again], [s for s in full_val if s["step"] == resumed_from])


def assert_same_metrics(got_lines: list[dict], want_lines: list[dict]) -> None:
    assert [s["step"] for s in got_lines] == [s["step"] for s in want_lines]
    for got, want in zip(got_lines, want_lines, strict=True):
        assert got["metrics"].keys() == want["metrics"].keys(), got["step"]
        for name, value in want["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], name)


def assert_same_tensors(full: dict, resumed: dict, what: str = "") -> None:
    """Recursively equal: tensors to float tolerance, everything else exactly."""
    if isinstance(full, dict):
        assert full.keys() == resumed.keys(), what
        for key in full:
            assert_same_tensors(full[key], resumed[key], f"{what}.{key}")
    elif isinstance(full, list | tuple):
        assert len(full) == len(resumed), what
        for i, (a, b) in enumerate(zip(full, resumed, strict=True)):
            assert_same_tensors(a, b, f"{what}[{i}]")
    elif isinstance(full, torch.Tensor):
        torch.testing.assert_close(resumed, full, atol=1e-6, rtol=1e-5, msg=what)
    elif isinstance(full, float):
        assert resumed == pytest.approx(full, rel=1e-6, abs=1e-9), what
    else:
        assert resumed == full, what
