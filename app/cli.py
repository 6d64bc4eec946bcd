"""`modelserve`: the command line. `modelserve serve` runs the service with uvicorn.

Every `Settings` field is a flag of `serve` (`--max-batch-rows 32`); flags are handed to the worker
processes through their `MODELSERVE_*` variables, so each worker builds the same settings.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from app.evaluate import cli as evaluate_cli
from app.quality import cli as feedback_cli
from app.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
Command = Callable[[argparse.Namespace], int]


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any], bool]:
    """(argparse type, is_bool) of a settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return str, True
    if annotation in (int, float):
        return annotation, False
    return str, False


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        if name == "prometheus_multiproc_dir":
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").strip() + f" (env MODELSERVE_{name.upper()})"
        kind, is_bool = _flag_type(field.annotation)
        if is_bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # local: `modelserve evaluate` need not import the server stack

    from app.observability import logging_config

    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"MODELSERVE_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    try:
        settings = Settings()
    except ValidationError as err:
        print(f"modelserve: invalid settings:\n{err}")  # noqa: T201
        return 2
    if settings.feedback_secret is None:
        # One secret for every worker, so that each reads the prediction ids of the others.
        os.environ["MODELSERVE_FEEDBACK_SECRET"] = secrets.token_urlsafe(32)
    own_multiproc_dir = None
    if settings.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Each worker writes its metrics here and /metrics merges them; the folder must start empty.
        own_multiproc_dir = tempfile.mkdtemp(prefix="modelserve-metrics-")
        os.environ[MULTIPROC_ENV] = own_multiproc_dir
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=logging_config(settings.log_level),
            log_level=settings.log_level,
            access_log=False,  # the app writes its own access line, with the request id
            server_header=False,
        )
    finally:
        if own_multiproc_dir is not None:
            shutil.rmtree(own_multiproc_dir, ignore_errors=True)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The `modelserve` parser and the function behind each subcommand."""
    parser = argparse.ArgumentParser(
        prog="modelserve", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Command] = {}

    serve = commands.add_parser("serve", help="serve the model repository over HTTP")
    _add_settings_flags(serve)
    handlers["serve"] = _serve
    handlers["evaluate"] = evaluate_cli.add_parser(commands)
    handlers["feedback"] = feedback_cli.add_parser(commands)
    # Other subcommands register here, one line each: `handlers["x"] = module.add_parser(commands)`.
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modelserve` script."""
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
