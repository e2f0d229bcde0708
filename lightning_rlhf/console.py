"""What a run shows on the terminal: the package's own lines on rank zero, third-party noise filtered.

The package reports what it did to the user's data and files (rows kept / dropped / truncated, reference
log-probs cached or reused, models exported) through ``logging``. Python's default shows nothing below
WARNING, so those lines would never reach a user who has not configured logging. ``show_package_logs`` does
what Lightning does for its own logger: the ``lightning_rlhf`` logger gets a handler at INFO that prints on
rank zero while the application has configured no logging (the root logger has no handler). An application
that configures logging keeps full control: records propagate to its handlers and ours prints nothing.

``quiet_third_party`` is for the command line: warnings from other libraries that tell our users nothing
they can act on are filtered. ``--verbose`` (or ``LIGHTNING_RLHF_VERBOSE=1``) keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

PACKAGE_LOGGER = "lightning_rlhf"
VERBOSE_ENV = "LIGHTNING_RLHF_VERBOSE"

# Message regexes of third-party warnings the CLI filters. Each is either advice about another product, or a
# condition this package creates on purpose and explains in its own docs.
NOISY_WARNINGS: tuple[str, ...] = (
    r".*(tensorboardX|litlogger|LitLogger).*",  # Lightning's advertisements for optional loggers
    r".*module\(s\) in eval mode.*",  # frozen reference, reward and critic models are in eval mode on purpose
    r".*`validation_step` but have no `val_dataloader`.*",
    r".*`val_dataloader` but have no `validation_step`.*",  # DPO-Iter given a datamodule with val prompts
    r".*Total length of .* across ranks is zero.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*LeafSpec.*",  # torch pytree deprecations raised inside Lightning and transformers
)
# Deprecations that one library raises about another's API (e.g. PEFT calling transformers'
# ``is_gradient_checkpointing``): warnings located inside these packages are theirs to fix, not the user's.
THIRD_PARTY_MODULES = (
    r"(transformers|peft|lightning|pytorch_lightning|torch|deepspeed|datasets|accelerate)(\.|$)"
)

# (logger, message regex) of third-party log lines the CLI drops: Lightning's product tips, and DeepSpeed's
# note on a machine without an accelerator (the trainer's own "GPU available: False" line says it).
NOISY_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip:"),
    ("lightning.fabric.utilities.rank_zero", r"💡 Tip:"),
    ("DeepSpeed", r"Setting accelerator to CPU"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _UnconfiguredRankZero(logging.Filter):
    """Pass records on rank zero while the application has configured no logging of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        # Records still propagate: once the application adds a root handler (basicConfig after importing
        # this package, pytest's capture) they go there and this handler steps aside, so nothing prints twice.
        return not logging.getLogger().handlers and getattr(rank_zero_only, "rank", 0) == 0


def show_package_logs() -> None:
    """Give the package's logger a stderr handler at INFO on rank zero, unless logging is configured."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if any(getattr(h, "_lightning_rlhf", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lightning_rlhf: %(message)s"))
    handler.addFilter(_UnconfiguredRankZero())
    handler._lightning_rlhf = True  # type: ignore[attr-defined]  # added once, even if imported twice
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


@contextlib.contextmanager
def package_logs_at(level: int) -> Iterator[None]:
    """Within the block the package logs at ``level`` and above (the demos print their own summaries)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def verbose_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--verbose`` or ``LIGHTNING_RLHF_VERBOSE`` asks for all output; ``argv`` without the flag."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or "--verbose" in argv, [a for a in argv if a != "--verbose"]


def quiet_third_party() -> None:
    """Filter third-party warnings and progress bars that say nothing to a lightning_rlhf user."""
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
    # transformers' load reports (e.g. ``score.weight | MISSING`` while a reward model is built from a
    # causal LM: this package initialises that head itself) and shard-writing bars.
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    for name, pattern in NOISY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))
