"""The ``lightning-rlhf`` command: LightningCLI for every stage, plus the testbed helpers.

lightning-rlhf fit --config configs/sft/testbed.yaml      # any stage, module and data by class_path
lightning-rlhf testbed --out runs/testbed                  # write the embedded testbed's files
lightning-rlhf quickstart                                  # the whole testbed pipeline
lightning-rlhf quickstart --task programs                  # the code track: exact rewards, pass@k per tier
lightning-rlhf study                                       # the paper study: ablations, seeds, plots
lightning-rlhf evaluate --policies [a, b] --prompts p.jsonl # compare policies on your prompts
"""

from __future__ import annotations

import argparse
import sys

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_rlhf.data.loading import DataError
from lightning_rlhf.validation import ConfigError

_EXTRA_COMMANDS = """\
lightning-rlhf also has these commands:
  testbed      write the embedded testbed (data, tokenizer, initial model) to a folder (--task programs:
               the program-synthesis testbed with hidden tests)
  quickstart   run the testbed pipeline and print the gold reward of each stage (--task programs: SFT,
               DPO, DPO-Iter and PPO on exact test rewards, pass@k and 10@64 per tier)
  study        reproduce the paper's findings on the testbed: table, plots and JSON (--fast: a smoke run)
  export       write a checkpoint's trained model as a save_pretrained folder
  evaluate     sample k responses per prompt from policies; scores, win rate, pass@k (--help for flags)

--verbose (any command) shows the third-party warnings the command filters by default.
"""


_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class RLHFCLI(LightningCLI):
    """LightningCLI with the package's modules and datamodules selectable by class_path.

    The data's tokenizer is linked to the model: ``data.init_args.tokenizer`` is set from
    ``model.init_args.model`` (a hub name or ``save_pretrained`` folder holds both), so the two can never
    disagree. Custom datamodules used with this CLI take a ``tokenizer`` argument for the same reason.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer", apply_on="parse")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # The package's progress bar (rollouts counted, phases shown) unless the config brings its own bar
        # or turns the bar off; Lightning's plain bar then stays the fallback when rich is missing.
        from lightning.pytorch.callbacks import ProgressBar
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

        from lightning_rlhf.callbacks.progress import RLHFProgressBar

        given = [*(config.get("callbacks") or []), *callbacks]
        wanted = config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
        if wanted and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RLHFProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Checks that need both the model and the data (e.g. PPO's rollout batch vs mini_batch_size): each
        # object checked its own flags in __init__; fail here too, before any model or data is loaded.
        check = getattr(self.model, "check_datamodule", None)
        if check is not None and self.datamodule is not None:
            check(self.datamodule)


def testbed_main(argv: list[str]) -> None:
    from lightning_rlhf.testbed.files import SplitSizes, write_testbed
    from lightning_rlhf.testbed.task import TaskConfig

    parser = argparse.ArgumentParser(prog="lightning-rlhf testbed", description="Write the testbed's files.")
    parser.add_argument("--out", default="runs/testbed", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task and its data")
    parser.add_argument("--model-size", default="tiny", help="size of the initial policy (nano, tiny, small)")
    parser.add_argument(
        "--behaviour-shift",
        type=float,
        default=TaskConfig.behaviour_shift,
        help="distance of the preference data's behaviour distribution from the SFT data",
    )
    parser.add_argument(
        "--task",
        choices=("words", "programs"),
        default="words",
        help="words: the word task with a gold reward; programs: list-program synthesis with exact tests",
    )
    args = parser.parse_args(argv)
    if args.task == "programs":
        from lightning_rlhf.testbed.files import write_program_testbed
        from lightning_rlhf.testbed.programs import ProgramsConfig

        write_program_testbed(args.out, ProgramsConfig(seed=args.seed), model_size=args.model_size)
    else:
        config = TaskConfig(seed=args.seed, behaviour_shift=args.behaviour_shift)
        write_testbed(args.out, config, SplitSizes(), model_size=args.model_size)
    print(f"{args.task} testbed written to {args.out}")


def export_main(argv: list[str]) -> None:
    from lightning_rlhf.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="lightning-rlhf export", description="Write a checkpoint's model + tokenizer for transformers."
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by a lightning_rlhf module")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save (default: the model's own)")
    args = parser.parse_args(argv)
    print(f"exported to {export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer)}")


def build_cli(args: list[str] | None = None, *, run: bool = True) -> RLHFCLI:
    """The LightningCLI behind ``lightning-rlhf fit|validate|test``; ``run=False`` only parses and builds."""
    return RLHFCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # argparse's prefix matching took a typo like --trainer.max_step as --trainer.max_steps; a typo
        # must be an error, in the main parser and in each subcommand's.
        parser_kwargs={"allow_abbrev": False, **{c: {"allow_abbrev": False} for c in _SUBCOMMANDS}},
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-rlhf`` console script (``args`` defaults to ``sys.argv[1:]``).

    ``--verbose`` anywhere (or ``LIGHTNING_RLHF_VERBOSE=1``) keeps the third-party warnings the command
    otherwise filters (see ``lightning_rlhf.console``).
    """
    from lightning_rlhf.console import quiet_third_party, verbose_requested

    verbose, argv = verbose_requested(sys.argv[1:] if args is None else list(args))
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (given args, it warns about both)
    else:
        args = argv
    if not verbose:
        quiet_third_party()
    try:
        _run_command(argv, args)
    except (ConfigError, DataError, ValueError) as err:
        # A bad flag, file or row: the message names it and what to do, so a traceback only hides it.
        # jsonargparse re-raises a module's ConfigError from __init__ as "Does not validate against any
        # of the Union subtypes" with the whole config dumped; the package's own error is in its causes.
        found = package_error(err)
        if verbose or found is None:
            raise
        print(f"lightning-rlhf: error: {type(found).__name__}: {found}", file=sys.stderr)
        print("(run with --verbose for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def package_error(err: BaseException) -> ConfigError | DataError | None:
    """``err`` itself or the first ConfigError / DataError among its causes (None: not the package's)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (ConfigError, DataError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _run_command(argv: list[str], args: list[str] | None) -> None:
    if argv and argv[0] == "testbed":
        testbed_main(argv[1:])
    elif argv and argv[0] == "export":
        export_main(argv[1:])
    elif argv and argv[0] == "quickstart":
        from lightning_rlhf.quickstart import main

        main(argv[1:])
    elif argv and argv[0] == "evaluate":
        from lightning_rlhf.evaluate import main as evaluate_main

        evaluate_main(argv[1:])
    elif argv and argv[0] == "study":
        from lightning_rlhf.study.main import main as study_main

        study_main(argv[1:])
    else:
        if not argv or argv[0] in ("-h", "--help"):
            print(_EXTRA_COMMANDS)
        build_cli(args)


if __name__ == "__main__":
    cli_main()
