"""`modelserve feedback FILE --url URL`: send the true labels of served predictions to a running server's
`POST /feedback`, in batches, with a progress bar; print how many were counted and why the others were not.

FILE holds items `{"id": "<prediction id>", "label": <true label>}`: NDJSON (one per line, blank lines
skipped) or JSON (`{"items": [...]}` or a list), the format from the extension (``.ndjson``/``.jsonl``,
``.json``) or ``--format``. Errors name the item by its position in the file (from 0, blank lines not
counted). Exit status 0 when every item was counted, 1 when some were not or the server failed, 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

FORMATS = {".ndjson": "ndjson", ".jsonl": "ndjson", ".json": "json"}
NDJSON_TYPE = "application/x-ndjson"


class CliError(Exception):
    """A problem to print (without a traceback) before exiting with status 1."""


def add_parser(commands: Any) -> Callable[[argparse.Namespace], int]:
    """Register ``feedback`` on the ``modelserve`` subcommands; returns its handler."""
    parser = commands.add_parser(
        "feedback",
        help="send true labels for served prediction ids (a JSON or NDJSON file) to a server",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("file", type=Path, help='items {"id", "label"}: .ndjson/.jsonl or .json')
    parser.add_argument("--url", required=True, help="server base URL")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())), default=None)
    parser.add_argument("--batch-size", type=int, default=1000, help="items per request (default 1000)")
    parser.add_argument("--api-key", default=None, help="bearer token for a server with MODELSERVE_API_KEY")
    parser.add_argument("--json", action="store_true", help="print the tally as JSON")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each answer")
    return run


def run(args: argparse.Namespace) -> int:
    """Handler of ``modelserve feedback``."""
    console = Console(stderr=True)
    if args.batch_size < 1:
        console.print(Text("modelserve feedback: --batch-size must be at least 1"))
        return 2
    counted, errors, total = 0, [], 0
    try:
        fmt = args.format or FORMATS.get(args.file.suffix.lower())
        if fmt is None:
            raise CliError(
                f"cannot tell the format of {args.file.name}; name it .ndjson/.json or pass --format"
            )
        if not args.file.is_file():
            raise CliError(f"no such file: {args.file}")
        batches = _ndjson_batches(args.file, args.batch_size) if fmt == "ndjson" else _json_batches(args)
        for batch_counted, batch_errors, sent in _send(args, batches, console):
            counted += batch_counted
            errors += [{"index": total + error["index"], "error": error["error"]} for error in batch_errors]
            total += sent
    except CliError as err:
        console.print(Text.assemble(("modelserve feedback: ", "red"), str(err)), soft_wrap=True)
        if total:
            console.print(Text(f"before that: {counted} of the first {total} items counted"))
        return 1
    if args.json:
        sys.stdout.write(
            orjson.dumps({"counted": counted, "errors": errors}, option=orjson.OPT_INDENT_2).decode()
        )
        sys.stdout.write("\n")
    else:
        out = Console(soft_wrap=True)
        for error in errors:
            out.print(Text(f"item {error['index']}: {error['error']}"))
        out.print(Text(f"counted {counted} of {total} items; {len(errors)} not counted"))
    return 1 if errors else 0


Batch = tuple[bytes, str, int]
"""A request body, its content type and its number of items."""


def _ndjson_batches(path: Path, size: int) -> Iterator[Batch]:
    lines: list[bytes] = []
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip(b"\r\n"))
            if len(lines) == size:
                yield b"\n".join(lines), NDJSON_TYPE, len(lines)
                lines = []
    if lines:
        yield b"\n".join(lines), NDJSON_TYPE, len(lines)


def _json_batches(args: argparse.Namespace) -> Iterator[Batch]:
    try:
        document = orjson.loads(args.file.read_bytes())
    except orjson.JSONDecodeError as err:
        raise CliError(f"{args.file.name} is not valid JSON: {err}") from err
    items = document.get("items") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise CliError(f'{args.file.name} must hold {{"items": [...]}} or a list of items')
    for start in range(0, len(items), args.batch_size):
        batch = items[start : start + args.batch_size]
        yield orjson.dumps({"items": batch}), "application/json", len(batch)


def _send(
    args: argparse.Namespace, batches: Iterator[Batch], console: Console
) -> Iterator[tuple[int, list[dict[str, Any]], int]]:
    """Post each batch; yields (counted, errors with in-batch positions, items sent)."""
    import httpx  # local: the server does not need it

    url = args.url.rstrip("/") + "/feedback"
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    progress = Progress(
        TextColumn("[bold]sending feedback"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress, httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0)) as client:
        task = progress.add_task("feedback", total=None)
        for body, content_type, items in batches:
            try:
                response = client.post(url, content=body, headers={**headers, "content-type": content_type})
            except httpx.HTTPError as err:
                raise CliError(f"the request to {url} failed: {err}") from err
            try:
                answer = response.json()
            except ValueError as err:
                raise CliError(f"the server answered {response.status_code} without JSON") from err
            if response.status_code != 200 or not isinstance(answer, dict) or "counted" not in answer:
                message = answer.get("error") if isinstance(answer, dict) else None
                raise CliError(f"the server answered {response.status_code}: {message or response.text}")
            progress.advance(task, items)
            yield int(answer["counted"]), list(answer["errors"]), items
