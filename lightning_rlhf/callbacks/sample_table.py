"""Keep a few sampled responses of PPO rollouts: a JSON-lines file, and a table in W&B or TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rlhf.rollout.types import Rollout
from lightning_rlhf.validation import check

TABLE_KEY = "samples"


class SampleTable(Callback):
    """Every ``every_n_steps`` training steps (rollouts), keep the first ``num_samples`` rows of the rollout.

    Numbers say *that* the reward goes up; the samples say *how* (the words a policy hacks its reward with).
    Each kept row is appended as one JSON line to ``<trainer.log_dir or default_root_dir>/samples.jsonl``::

        {"step": 10, "global_step": 40, "index": 0, "prompt": "...", "response": "...", "score": 0.5,
         "gold": 0.25}

    ``step`` is the training step (the rollout's index, also the x axis of PPOModule's logged metrics),
    ``global_step`` the optimizer steps before it, ``score`` the unshaped reward (``rollout.raw_scores``)
    and ``gold`` the gold function's score (only when the module has a ``gold_function``). The same rows go
    to every logger that has ``log_table`` (``WandbLogger``: a table under the key ``samples``) and, as a
    markdown table, to a ``TensorBoardLogger``'s text tab. Only global rank 0 writes (its share of the
    rollout).
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 8) -> None:
        """
        Args:
            every_n_steps: Keep samples of every n-th training step (rollout), starting with the first.
            num_samples: Rows kept from each such rollout (its first rows).
        """
        check("SampleTable", "every_n_steps", every_n_steps, ge=1, integer=True)
        check("SampleTable", "num_samples", num_samples, ge=1, integer=True)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def should_log(self, step: int) -> bool:
        """Whether to keep samples of training step ``step`` (0-based); override to customise."""
        return step % self.every_n_steps == 0

    def on_rollout_end(self, trainer: Trainer | None, pl_module: LightningModule, rollout: Rollout) -> None:
        """The rollout hook (see :mod:`lightning_rlhf.rollout.hooks`); reads the rollout, changes nothing."""
        if trainer is None or not trainer.is_global_zero:
            return
        step = trainer.fit_loop.total_batch_idx
        if not self.should_log(step):
            return
        rows = self.rows(rollout, step=step, global_step=trainer.global_step)
        if not rows:
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        columns = [c for c in ("step", "prompt", "response", "score", "gold") if c in rows[0]]
        data = [[row[c] for c in columns] for row in rows]
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_table", None)):
                logger.log_table(key=TABLE_KEY, columns=columns, data=data, step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(TABLE_KEY, markdown_table(columns, data), global_step=step)

    def rows(self, rollout: Rollout, *, step: int, global_step: int) -> list[dict[str, Any]]:
        """The first ``num_samples`` rows of the rollout as JSON-ready dicts."""
        n = min(self.num_samples, len(rollout))
        scores = rollout.raw_scores[:n].tolist()
        gold = rollout.gold_scores[:n].tolist() if rollout.gold_scores is not None else None
        rows = []
        for i in range(n):
            row = {
                "step": step,
                "global_step": global_step,
                "index": i,
                "prompt": rollout.prompts[i] if i < len(rollout.prompts) else "",
                "response": rollout.responses[i] if i < len(rollout.responses) else "",
                "score": float(scores[i]),
            }
            if gold is not None:
                row["gold"] = float(gold[i])
            rows.append(row)
        return rows


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    """A markdown table; cell text keeps its characters but not the ones that would break the table."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)
