"""A progress bar that counts what on-policy stages do: rollouts against the planned number, and phases.

Lightning's bar counts training batches. For PPO and DPO-Iter one batch is one rollout (sample, score,
update) that makes several optimizer steps, so against ``max_steps`` the bar's total was the number of
*steps* (a run ending at "2/4"), and for a minute per rollout it showed nothing. With ``max_steps`` and no
``max_epochs`` it also read "Epoch 0/-2". ``RLHFProgressBar`` fixes the three:

* the total is the rollouts still planned: the epoch's batches, capped by ``max_steps`` divided by the
  module's ``optimizer_steps_per_batch()`` (PPO: ``ppo_epochs`` x mini-batches; early stops make fewer, so
  a run may take more rollouts than planned, never fewer);
* modules announce phases with :func:`report_phase` ("sampling", "updating (2,310 tok/s)", then the last
  rollout's "2,310 tok/s, update 3.4 s"), shown after the epoch in the bar's description;
* the epoch reads "Epoch 3" when the number of epochs is open.

``lightning-rlhf fit`` adds it unless the config names a progress bar of its own or turns the bar off.
"""

from __future__ import annotations

import math

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

PHASE_HOOK = "on_phase"


def report_phase(trainer: Trainer | None, pl_module: LightningModule, text: str) -> None:
    """Tell callbacks with an ``on_phase(trainer, pl_module, text)`` hook what the module is doing now."""
    for callback in getattr(trainer, "callbacks", None) or []:
        hook = getattr(callback, PHASE_HOOK, None)
        if callable(hook):
            hook(trainer, pl_module, text)


def planned_batches(trainer: Trainer, pl_module: LightningModule) -> int | float:
    """Training batches this epoch will run: the epoch's batches, capped by the ``max_steps`` left."""
    batches = trainer.num_training_batches
    steps_per_batch = getattr(pl_module, "optimizer_steps_per_batch", None)
    per_batch = steps_per_batch() if callable(steps_per_batch) else 1
    if trainer.max_steps is not None and trainer.max_steps > 0:
        left = max(trainer.max_steps - trainer.global_step, 0)
        return min(batches, math.ceil(left / max(per_batch, 1)))
    return batches


class RLHFProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting rollouts and showing each rollout's phase (see module doc)."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        """
        Args:
            refresh_rate: Redraw every this many batches (0 disables the bar).
            leave: Keep each epoch's finished bar on the screen.
        """
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._phase = ""

    @property
    @override
    def total_train_batches(self) -> int | float:
        return planned_batches(self.trainer, self.trainer.lightning_module)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        if self._phase:
            description += f" · {self._phase}"
        return description

    def on_phase(self, trainer: Trainer, pl_module: LightningModule, text: str) -> None:
        self._phase = text
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)
            self.refresh()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._phase = ""
        super().on_train_end(trainer, pl_module)
