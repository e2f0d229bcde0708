"""SampleTable: which rollouts, which rows and fields, and what reaches the JSONL file and the loggers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rlhf.callbacks import SampleTable
from lightning_rlhf.callbacks.sample_table import markdown_table
from lightning_rlhf.rollout.types import Rollout


def rollout(gold: bool) -> Rollout:
    """3 rows; scores 0.5, -1.25, 2.0; gold 1, 0, -1 when given. Response 1 has a pipe and a newline."""
    n, r = 3, 2
    zeros = torch.zeros(n, r)
    return Rollout(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        response_ids=torch.zeros(n, r, dtype=torch.long),
        response_mask=torch.ones(n, r, dtype=torch.long),
        logprobs=zeros,
        ref_logprobs=zeros,
        values=zeros,
        scores=torch.zeros(n),
        raw_scores=torch.tensor([0.5, -1.25, 2.0]),
        ended=torch.ones(n, dtype=torch.bool),
        kl=zeros,
        rewards=zeros,
        advantages=zeros,
        returns=zeros,
        prompts=["p0", "p1", "p2"],
        responses=["r0", "a | b\nc", "r2"],
        gold_scores=torch.tensor([1.0, 0.0, -1.0]) if gold else None,
    )


class TableLogger:
    """Stands in for WandbLogger: anything with log_table gets the rows."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_table(self, **kwargs) -> None:
        self.calls.append(kwargs)


class RecordingTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger whose SummaryWriter is a recorder.

    Its __init__ skips TensorBoardLogger's, which refuses to run without tensorboard installed; SampleTable
    only needs the type and ``experiment.add_text``.
    """

    def __init__(self) -> None:
        self.texts: list[tuple] = []

    @property
    def experiment(self):
        return SimpleNamespace(add_text=lambda *args, **kwargs: self.texts.append((args, kwargs)))


def fake_trainer(root: Path, batch_idx: int, global_step: int, rank: int = 0, loggers=(), log_dir=None):
    return SimpleNamespace(
        is_global_zero=rank == 0,
        fit_loop=SimpleNamespace(total_batch_idx=batch_idx),
        global_step=global_step,
        log_dir=log_dir,
        default_root_dir=str(root),
        loggers=list(loggers),
    )


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_n_steps_and_rows_written(tmp_path):
    """every_n_steps=2 over training steps 0..4 keeps steps 0, 2, 4; num_samples=2 keeps rows 0 and 1.
    Without gold scores the rows have no "gold" field; global_step is what the trainer says (3 per step)."""
    table = SampleTable(every_n_steps=2, num_samples=2)
    for step in range(5):
        table.on_rollout_end(fake_trainer(tmp_path, step, 3 * step), None, rollout(gold=False))
    rows = read_rows(tmp_path / "samples.jsonl")
    assert [(r["step"], r["global_step"], r["index"]) for r in rows] == [
        (0, 0, 0),
        (0, 0, 1),
        (2, 6, 0),
        (2, 6, 1),
        (4, 12, 0),
        (4, 12, 1),
    ]
    assert rows[1] == {
        "step": 0,
        "global_step": 0,
        "index": 1,
        "prompt": "p1",
        "response": "a | b\nc",
        "score": -1.25,
    }


def test_loggers_get_the_table_and_only_rank_zero_writes(tmp_path):
    """num_samples=8 > 3 rows keeps all 3. log_table gets columns with gold; TensorBoard a markdown table
    (pipes escaped, newline shown as ⏎) at the training step; the JSONL goes to trainer.log_dir."""
    wandb_like, tensorboard = TableLogger(), RecordingTensorBoard()
    table = SampleTable(every_n_steps=1, num_samples=8)
    log_dir = tmp_path / "logs"
    trainer = fake_trainer(tmp_path, 7, 28, loggers=[wandb_like, tensorboard], log_dir=str(log_dir))
    table.on_rollout_end(trainer, None, rollout(gold=True))

    columns = ["step", "prompt", "response", "score", "gold"]
    data = [[7, "p0", "r0", 0.5, 1.0], [7, "p1", "a | b\nc", -1.25, 0.0], [7, "p2", "r2", 2.0, -1.0]]
    assert wandb_like.calls == [{"key": "samples", "columns": columns, "data": data, "step": 7}]
    markdown = (
        "| step | prompt | response | score | gold |\n"
        "|---|---|---|---|---|\n"
        "| 7 | p0 | r0 | 0.5 | 1 |\n"
        "| 7 | p1 | a \\| b ⏎ c | -1.25 | 0 |\n"
        "| 7 | p2 | r2 | 2 | -1 |"
    )
    assert markdown_table(columns, data) == markdown
    assert tensorboard.texts == [(("samples", markdown), {"global_step": 7})]
    rows = read_rows(log_dir / "samples.jsonl")
    assert [r["gold"] for r in rows] == [1.0, 0.0, -1.0]
    assert not (tmp_path / "samples.jsonl").exists()

    other_rank = TableLogger()
    trainer = fake_trainer(tmp_path / "rank1", 0, 0, rank=1, loggers=[other_rank])
    table.on_rollout_end(trainer, None, rollout(gold=True))
    assert other_rank.calls == [] and not (tmp_path / "rank1").exists()


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        SampleTable(every_n_steps=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        SampleTable(num_samples=0)
