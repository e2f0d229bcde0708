"""The testbed's gold reward as a reward function that PPO, DPO-Iter or an evaluation can call."""

from __future__ import annotations

from lightning_rlhf.testbed.files import load_task


class GoldReward:
    """``f(prompts, responses) -> gold rewards`` of a testbed folder (as named in YAML by class_path).

    Use it as PPO's ``reward_function`` to train on the true reward, or as ``gold_function`` to watch the
    true reward while training on a learned one (reward hacking shows as the two diverging).
    """

    def __init__(self, task_dir: str) -> None:
        """
        Args:
            task_dir: A folder written by ``lightning-rlhf testbed`` (its task.json defines the reward).
        """
        self.task_dir = task_dir
        self._task = None

    @property
    def task(self):
        # Read on first use, not at construction: configs naming a GoldReward must parse (and
        # --print_config work) before the testbed folder exists.
        if self._task is None:
            self._task = load_task(self.task_dir)
        return self._task

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.task.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]
