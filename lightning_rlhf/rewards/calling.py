"""Calling a user's reward function with the columns of its rows, and checking what it returns.

A reward function is ``f(prompts, responses, **columns) -> scores``: one float per response, higher is
better. ``columns`` holds the dataset's other columns for those rows (see ``PromptDataModule(columns=...)``),
one value per response. A function receives only the columns its signature names — all of them when it
takes ``**kwargs`` — so a plain ``f(prompts, responses)`` keeps working on data with extra columns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

RewardFunction = Callable[..., Sequence[float] | Tensor]
"""``f(prompts, responses, **columns) -> scores``: one float per response, higher is better."""


def _accepted(fn: Callable) -> tuple[bool, list[str], list[str]]:
    """(takes ``**kwargs``, the parameters a column can fill, those of them without a default).

    The first two positional parameters take ``prompts`` and ``responses``; every later parameter that can
    be passed by keyword is a column name.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: give it the plain call
        return False, [], []
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    keyword = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and all(p is not q for q in positional)
    ]
    required = [p.name for p in keyword if p.default is p.empty]
    return var_kw, [p.name for p in keyword], required


def select_columns(fn: Callable, columns: Mapping[str, list] | None, what: str) -> dict[str, list]:
    """The columns to pass to ``fn``: all with ``**kwargs``, else the ones its signature names.

    Raises ``ValueError`` naming the column when ``fn`` requires one that the data does not carry.
    """
    columns = dict(columns or {})
    var_kw, names, required = _accepted(fn)
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(
            f"{what} needs the column {missing[0]!r}, but the prompt data carries "
            f"{sorted(columns) or 'no other column'}; add {missing[0]!r} to the prompt file (and to "
            "PromptDataModule's columns, if that is set)"
        )
    return columns if var_kw else {name: columns[name] for name in names if name in columns}


def call_reward_function(
    fn: RewardFunction,
    prompts: list[str],
    responses: list[str],
    columns: Mapping[str, list] | None,
    what: str,
) -> Tensor:
    """Call ``fn(prompts, responses, **columns)`` and check it returns one finite number per response."""
    passed = select_columns(fn, columns, what)
    for name, values in passed.items():
        if len(values) != len(responses):
            raise ValueError(
                f"column {name!r} has {len(values)} values for {len(responses)} responses; a column carries "
                "one value per response"
            )
    out = fn(prompts, responses, **passed)
    try:
        scores = (
            torch.as_tensor(out if isinstance(out, Tensor) else list(out), dtype=torch.float32)
            .flatten()
            .cpu()
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must return one number per response (a list of floats or a tensor); got "
            f"{type(out).__name__}: {err}"
        ) from None
    if scores.numel() != len(responses):
        raise ValueError(f"{what} returned {scores.numel()} scores for {len(responses)} responses")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(
            f"{what} returned the non-finite score {float(scores[bad])} for response {bad}: "
            f"{responses[bad]!r:.80}"
        )
    return scores


def repeat_columns(columns: Mapping[str, list] | None, k: int) -> dict[str, list]:
    """Each row's column values repeated ``k`` times in a row, matching prompts sampled ``k`` times each."""
    return {name: [v for v in values for _ in range(k)] for name, values in (columns or {}).items()}


def reward_source_metrics(reward_function: object, gold_function: object) -> dict[str, float]:
    """What the reward objects report of their last call, as ``rollout/<key>`` (gold: ``rollout/gold_<key>``).

    A reward object may define ``metrics() -> dict[str, float]`` (e.g. ``CodeExecutionReward``'s
    ``pass_rate``, ``timeout_rate``); plain functions report nothing.
    """
    out: dict[str, float] = {}
    for fn, prefix in ((reward_function, "rollout/"), (gold_function, "rollout/gold_")):
        metrics = getattr(fn, "metrics", None)
        if fn is not None and callable(metrics):
            out.update({f"{prefix}{k}": float(v) for k, v in dict(metrics()).items()})
    return out
