"""The rollout hook: how callbacks read or change a rollout between collection and the PPO update.

Any Lightning callback may define::

    def on_rollout_end(self, trainer, pl_module, rollout): ...

It is called (in the order of ``trainer.callbacks``) after the rollout's advantages are computed and before
the first update on it; changes to ``rollout`` tensors (e.g. whitening ``rollout.advantages``) are what the
update uses. A LightningModule may define the same method (without ``pl_module``); it runs after callbacks.
"""

from __future__ import annotations

from lightning import LightningModule, Trainer

from lightning_rlhf.rollout.types import Rollout

ROLLOUT_HOOK = "on_rollout_end"


def call_rollout_hooks(trainer: Trainer | None, pl_module: LightningModule, rollout: Rollout) -> None:
    for callback in getattr(trainer, "callbacks", None) or []:
        hook = getattr(callback, ROLLOUT_HOOK, None)
        if callable(hook):
            hook(trainer, pl_module, rollout)
    module_hook = getattr(pl_module, ROLLOUT_HOOK, None)
    if callable(module_hook):
        module_hook(rollout)
