"""One helper for checking configuration values, so every bad value fails the same way, early.

Each module, datamodule, callback and loss checks its ``__init__`` arguments with :func:`check` /
:func:`check_choice` / :func:`check_divides`; the error names the owner, the flag, the allowed range and the
value given, e.g. ``PPOModule: clip_range must be > 0 (got -0.2)``. LightningCLI reports it at parse time
(it instantiates the classes right after parsing), so a bad YAML fails before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is outside its allowed range (the message names the flag and the range)."""


def check(
    owner: str,
    name: str,
    value: object,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a (finite) number in the given bounds.

    ``optional`` accepts None (a feature switched off); ``integer`` demands an int (not a bool).
    """
    if value is None and optional:
        return
    low, high = (gt, "(") if gt is not None else (ge, "["), (lt, ")") if lt is not None else (le, "]")
    if low[0] is not None and high[0] is not None:
        bounds = f"in {low[1]}{low[0]}, {high[0]}{high[1]}"  # interval notation: (0, 1] excludes 0
    else:
        ops = ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        bounds = " and ".join(f"{op} {b}" for op, b in ops if b is not None) or "a finite number"
    wanted = ("an integer " if integer else "") + bounds
    wanted += " or null (off)" if optional else ""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = is_number and (isinstance(value, int) or not integer) and math.isfinite(value)
    if ok:
        ok = (
            (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        )
    if not ok:
        raise ConfigError(f"{owner}: {name} must be {wanted} (got {value!r})")


def check_each(owner: str, values: Mapping[str, object], **bounds: Any) -> None:
    """:func:`check` on every ``name: value`` of ``values`` with the same bounds."""
    for name, value in values.items():
        check(owner, name, value, **bounds)


def check_callable(owner: str, name: str, value: object, optional: bool = True) -> None:
    """A user function such as a reward function: a callable object, never a string to evaluate or import."""
    if value is None and optional:
        return
    if not callable(value):
        raise ConfigError(
            f"{owner}: {name} must be a callable f(prompts, responses) -> scores (got {type(value).__name__} "
            f"{value!r:.60}); in YAML give its import path (my_package.rewards.score) or a class_path with "
            "init_args"
        )


def check_choice(owner: str, name: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner}: {name} must be one of {', '.join(map(repr, allowed))} (got {value!r})")


def check_divides(owner: str, small: tuple[str, int], big: tuple[str, int], hint: str = "") -> None:
    """``small`` (name, value) must divide ``big`` (name, value) evenly, e.g. micro- into mini-batches."""
    (small_name, small_value), (big_name, big_value) = small, big
    if small_value > big_value or big_value % small_value:
        raise ConfigError(
            f"{owner}: {small_name} ({small_value}) must divide {big_name} ({big_value}) evenly, so it must "
            f"also be <= {big_name}" + (f"; {hint}" if hint else "")
        )
