"""`modeltrain`: the training command line (`fit` and `tune`).

Each subcommand has an `add_*_command(subparsers)` function, called by `build_parser`, that registers
its parser and sets `handler` (a function of the parsed args returning an exit status).
Deliberate errors (`TrainerError`) print one line on stderr and exit with status 2, without a traceback;
anything unexpected prints one line too and exits 1 (`-v` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, load_config
from trainer.distributed import BACKENDS, broadcast_flag, distributed_session, launched_by_torchrun
from trainer.errors import ConfigError, ExportError, TrainerError
from trainer.export import export_model
from trainer.fit import train_and_evaluate
from trainer.quantize import check_quantization, quantized_version_dir
from trainer.tuning import STRATEGIES, check_trials, tune_and_export

log = logging.getLogger("trainer")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every training command shares: CONFIG, --output, --epochs, --replace, --threads, progress."""
    parser.add_argument("config", type=Path, metavar="CONFIG", help="training config (YAML or JSON)")
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="model repository to write <name>/<version>/ into",
    )
    parser.add_argument(
        "--epochs", type=int, metavar="N", help="override optim.epochs (e.g. 2 for a smoke run)"
    )
    parser.add_argument("--replace", action="store_true", help="overwrite the version if it exists")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    parser.add_argument(
        "--quantize",
        metavar="int8",
        help="also export the int8 dynamic quantization as the model <name>-int8 (same version); its card "
        "records the test metrics, size and latency against the float model",
    )


def output_dirs(args: argparse.Namespace, config: TrainConfig) -> list[Path]:
    """The version folders a run writes: the model's, and its int8 sibling's with `--quantize`."""
    folders = [args.output / config.name / str(config.version)]
    if args.quantize is not None:
        folders.append(quantized_version_dir(args.output, config.name, config.version))
    return folders


def load_run_config(args: argparse.Namespace) -> TrainConfig:
    """Load the config named on the command line, apply `--epochs`, and refuse an existing version early.

    Raises:
        ConfigError: the config or `--quantize` is invalid.
        ExportError: a version exists and `--replace` was not given (checked before any training).
    """
    check_quantization(args.quantize)
    config = load_config(args.config)
    if args.epochs is not None:
        config = config.with_overrides({"optim.epochs": args.epochs})
    for target in output_dirs(args, config):
        if target.exists() and not args.replace:
            raise ExportError(f"{target} already exists; use --replace to overwrite it")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    return config


def add_fit_command(subparsers: Any) -> None:
    """Register `modeltrain fit CONFIG --output DIR`."""
    parser = subparsers.add_parser(
        "fit",
        help="train one config, score the test split, export ONNX + model card",
        description="Train CONFIG, score its test split once, and export DIR/<name>/<version>/.",
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="process-group backend under torchrun: auto (nccl with a GPU per process, else gloo), "
        "gloo or nccl; ignored in a single process",
    )
    parser.set_defaults(handler=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    """Handler of `modeltrain fit`, also as one of several torchrun processes.

    Under torchrun every process trains its shard (DDP); only rank 0 exports, and the others wait
    for it and exit with status 0 once its export succeeded.
    """
    config = load_run_config(args)  # a bad config or an existing version fails on every rank, early
    with distributed_session(args.backend) as context:
        if not context.is_main:
            logging.getLogger("trainer").setLevel(logging.WARNING)  # rank 0 tells the story
        result = train_and_evaluate(config, progress=not args.no_progress, distributed=context)
        if not context.is_main:
            if not broadcast_flag(context, False):  # wait for rank 0's export
                raise ExportError(f"rank {context.rank}: rank 0 did not export (its error is above)")
            return 0
        exported = False
        try:
            export_model(result, config, args.output, replace=args.replace, quantize=args.quantize)
            exported = True
        finally:
            broadcast_flag(context, exported)
    log.info(
        "best epoch %d of %d, validation %s %.4f",
        result.best_epoch,
        result.epochs_run,
        result.selection_metric,
        result.validation_metrics[result.selection_metric],
    )
    sys.stdout.writelines(f"{folder}\n" for folder in output_dirs(args, config))
    return 0


def add_tune_command(subparsers: Any) -> None:
    """Register `modeltrain tune CONFIG --strategy grid|random|bayes --trials N --output DIR`."""
    parser = subparsers.add_parser(
        "tune",
        help="search hyperparameters on the validation split, then retrain and export the best",
        description=(
            "Search the space in CONFIG's 'search:' section, scoring each trial on the validation split "
            "(hopeless trials are pruned), then train the best configuration again and export "
            "DIR/<name>/<version>/ with trials.csv beside the model."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--strategy", choices=STRATEGIES, required=True, help="grid, random, or bayes (TPE)")
    parser.add_argument(
        "--trials", type=int, required=True, help="number of trials (a grid stops when exhausted)"
    )
    parser.add_argument(
        "--seed", type=int, help="override the config's seed (seeds the sampler and every run)"
    )
    parser.set_defaults(handler=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    """Handler of `modeltrain tune`; everything is checked before the first trial trains.

    `--epochs` and `--seed` change the base config; a searched parameter (even `optim.epochs`) still
    takes each trial's value.
    """
    if launched_by_torchrun():  # every process would run the whole search and race to export
        raise ConfigError("modeltrain tune runs in one process; under torchrun use modeltrain fit")
    check_trials(args.trials)
    config = load_run_config(args)
    if args.seed is not None:
        config = config.with_overrides({"seed": args.seed})
    tuned = tune_and_export(
        config,
        args.output,
        strategy=args.strategy,
        n_trials=args.trials,
        replace=args.replace,
        progress=not args.no_progress,
        quantize=args.quantize,
    )
    sys.stdout.writelines(f"{folder}\n" for folder in output_dirs(args, tuned.config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `modeltrain` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="modeltrain", description="Train, tune and export modelserve models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_fit_command(subparsers)
    add_tune_command(subparsers)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Plain stdlib logging on stderr."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # Libraries stay at WARNING; only our own loggers follow -v / -q.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(level)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run `modeltrain`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args))
    except TrainerError as err:
        sys.stderr.write(f"modeltrain: error: {_one_line(str(err))}\n")
        return EXIT_USAGE
    except OSError as err:
        sys.stderr.write(f"modeltrain: error: {_one_line(str(err))}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("modeltrain: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug or a library failure, not bad input
        if args.verbose:
            raise
        sys.stderr.write(
            f"modeltrain: internal error: {type(err).__name__}: {_one_line(str(err))[:500]} "
            "(run with -v for the traceback)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
