"""DeepSpeed ZeRO-2/3 on CPU ranks (tests/deepspeed_cpu.py): every stage matches the same run under DDP.

Each test spawns fresh ranks (DeepSpeed's process group and ZeRO hooks never touch the pytest process) and
fits one stage under DDP and under ZeRO, recording the logged metrics after every optimizer step. Models,
data, seeds and optimizer (torch AdamW, fp32) are the same, so the runs differ only by float summation
order: per-step metrics must agree to ``TOL``.
"""

from __future__ import annotations

import pytest

deepspeed = pytest.importorskip("deepspeed")

from deepspeed_runs import Run, spawn  # noqa: E402

from lightning_rlhf.testbed.files import SplitSizes, write_testbed  # noqa: E402
from lightning_rlhf.testbed.task import TaskConfig  # noqa: E402

TOL = 2e-4  # after 3 AdamW steps at lr 1e-3; step 1 agrees to ~1e-6


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    sizes = SplitSizes(
        sft_train=4, sft_eval=2, pairs_train=32, pairs_eval=4, prompts_train=32, prompts_eval=4
    )
    write_testbed(root, TaskConfig(seed=0), sizes, model_size="nano")
    return root


def assert_same_steps(a: dict, b: dict, keys: list[str], tol: float = TOL) -> None:
    assert len(a["steps"]) == len(b["steps"]) > 0
    for i, (x, y) in enumerate(zip(a["steps"], b["steps"], strict=True)):
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=tol, rel=tol), f"step {i + 1}, {key}"
    for name, value in a["weights"].items():
        assert value == pytest.approx(b["weights"][name], rel=1e-5), f"final {name} weights"


def test_ppo_zero3_one_rank(testbed, tmp_path):
    runs = [Run("ddp", "ppo", "ddp", max_steps=2)]
    out = spawn(testbed, tmp_path, runs, nprocs=1)
    print(out)
    assert_same_steps(out["z3"], out["ddp"], ["ppo/loss", "rollout/score"])
