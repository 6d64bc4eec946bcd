"""`modelserve evaluate FILE --model NAME [--url URL]`: score a labelled file and print the report.

With ``--url`` the file is streamed to a running server's ``POST /evaluate`` (an httpx streaming upload
with a progress bar; the server never holds the file). Without it the model is loaded from the model
repository with the serving code itself (sha256 check included) and the file is scored here with
onnxruntime, through the same readers and counts as the server, so both give the same report.

The format comes from the file's extension (``.csv``, ``.ndjson``/``.jsonl``, ``.npz``, ``.json``) or
``--format``. ``--plot FILE.png`` draws the confusion matrix (needs matplotlib: ``pip install
'modelserve[plot]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from app.errors import ModelNotFound, ModelServeError
from app.evaluate.readers import (
    ByteStream,
    Chunk,
    EvaluationOptions,
    Schema,
    StreamFormat,
    json_chunks,
    parse_json_body,
    stream_chunks,
)
from app.evaluate.runner import direct_infer, evaluate, flat_scores

FORMATS = {
    ".csv": "csv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".npz": "npz",
    ".json": "json",
}
CONTENT_TYPES = {
    "csv": "text/csv",
    "ndjson": "application/x-ndjson",
    "npz": "application/x-npz",
    "json": "application/json",
}
READ_BYTES = 1 << 20
LOCAL_CHUNK_ROWS = 4096


class CliError(Exception):
    """A problem to print (without a traceback) before exiting with status 1."""


def add_parser(commands: Any) -> Callable[[argparse.Namespace], int]:
    """Register ``evaluate`` on the ``modelserve`` subcommands; returns its handler."""
    parser = commands.add_parser(
        "evaluate",
        help="score a labelled CSV / NDJSON / NPZ / JSON file against a model and print the report",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("file", type=Path, help="labelled data: .csv, .ndjson/.jsonl, .npz or .json")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the highest)")
    parser.add_argument("--url", default=None, help="server base URL; without it the file is scored locally")
    parser.add_argument("--label-column", default=None, help="CSV: the label column (default: label)")
    parser.add_argument(
        "--format", choices=sorted(CONTENT_TYPES), default=None, help="override the extension"
    )
    parser.add_argument("--zero-division", default=None, help='0, 1 or "nan" (default 0)')
    parser.add_argument("--top-k", type=int, default=None, help="k of top-k accuracy")
    parser.add_argument("--pos-label", default=None, help="positive class for ROC AUC (two-class models)")
    parser.add_argument("--api-key", default=None, help="bearer token for a server with MODELSERVE_API_KEY")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="local scoring: the model repository (default: MODELSERVE_MODEL_REPOSITORY or models/)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write the confusion matrix as an image")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the server")
    return run


def run(args: argparse.Namespace) -> int:
    """Handler of ``modelserve evaluate``."""
    console = Console(stderr=True)
    try:
        fmt = _format(args.file, args.format)
        if not args.file.is_file():
            raise CliError(f"no such file: {args.file}")
        report = _remote(args, fmt, console) if args.url else _local(args, fmt, console)
        if args.plot is not None:
            plot_confusion_matrix(report, args.plot)
            console.print(Text(f"confusion matrix written to {args.plot}"))
    except (CliError, ModelServeError) as err:
        message = err.message if isinstance(err, ModelServeError) else str(err)
        console.print(Text.assemble(("modelserve evaluate: ", "red"), message), soft_wrap=True)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_report(report, Console())
    return 0


def _format(path: Path, override: str | None) -> str:
    if override:
        return override
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CliError(
            f"cannot tell the format of {path.name}; name it .csv/.ndjson/.npz/.json or pass --format"
        )
    return fmt


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _json_document(path: Path, args: argparse.Namespace) -> bytes:
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise CliError(f"{path.name} is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise CliError(f'{path.name} must hold an object {{"inputs": [...], "labels": [...]}}')
    document["model"] = args.model
    for key, value in (
        ("version", args.version),
        ("zero_division", args.zero_division),
        ("top_k", args.top_k),
        ("pos_label", args.pos_label),
    ):
        if value is not None:
            document[key] = value
    return orjson.dumps(document)


# ------------------------------------------------------------------------------------------ remote


def _remote(args: argparse.Namespace, fmt: str, console: Console) -> dict[str, Any]:
    import httpx  # local: only the remote mode needs it

    headers = {"content-type": CONTENT_TYPES[fmt]}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    params: dict[str, Any] = {}
    url = args.url.rstrip("/") + "/evaluate"
    size = args.file.stat().st_size
    with _progress(console) as progress:
        task = progress.add_task(f"uploading {args.file.name}", total=size)

        def pieces() -> Iterator[bytes]:
            with args.file.open("rb") as handle:
                while block := handle.read(READ_BYTES):
                    progress.advance(task, len(block))
                    yield block

        if fmt == "json":
            content: bytes | Iterator[bytes] = _json_document(args.file, args)
            progress.update(task, completed=size)
        else:
            params = {
                key: value
                for key, value in (
                    ("model", args.model),
                    ("version", args.version),
                    ("label_column", args.label_column),
                    ("zero_division", args.zero_division),
                    ("top_k", args.top_k),
                    ("pos_label", args.pos_label),
                )
                if value is not None
            }
            content = pieces()
        try:
            response = httpx.post(
                url,
                content=content,
                params=params,
                headers=headers,
                timeout=httpx.Timeout(args.timeout, connect=10.0),
            )
        except httpx.HTTPError as err:
            raise CliError(f"the request to {url} failed: {err}") from err
    try:
        body = response.json()
    except ValueError as err:
        raise CliError(f"the server answered {response.status_code} without JSON") from err
    if response.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        raise CliError(f"the server answered {response.status_code}: {message or response.text}")
    if not isinstance(body, dict):
        raise CliError("the server answered with something that is not a report")
    return body


# ------------------------------------------------------------------------------------------ local


def _load_local_model(args: argparse.Namespace) -> Any:
    from app.repository import ModelLoadError, load_model, scan_repository
    from app.session import resolve_providers
    from app.settings import Settings

    overrides = {"model_repository": args.model_repository} if args.model_repository else {}
    settings = Settings(**overrides)
    sources = [s for s in scan_repository(settings.model_repository) if s.name == args.model]
    if not sources:
        raise ModelNotFound(f"model {args.model!r} is not in the repository {settings.model_repository}")
    if args.version is not None:
        sources = [s for s in sources if s.version == args.version]
        if not sources:
            raise ModelNotFound(f"model {args.model!r} has no version {args.version}")
    try:
        return load_model(sources[-1], settings, resolve_providers(settings.providers))
    except ModelLoadError as err:
        raise CliError(f"cannot load {args.model}/{sources[-1].version}: {err.reason}") from err


def _local(args: argparse.Namespace, fmt: str, console: Console) -> dict[str, Any]:
    model = _load_local_model(args)
    schema = Schema.of(model)

    async def score(progress: Progress, task: Any) -> dict[str, Any]:
        async def file_stream() -> ByteStream:
            with args.file.open("rb") as handle:
                while block := handle.read(READ_BYTES):
                    progress.advance(task, len(block))
                    yield block

        chunks: AsyncIterator[Chunk]
        options = EvaluationOptions.parse(args.zero_division, args.top_k, args.pos_label)
        if fmt == "json":
            request = parse_json_body(_json_document(args.file, args))
            options = request.options
            chunks = json_chunks(request, schema, LOCAL_CHUNK_ROWS)
            progress.update(task, completed=args.file.stat().st_size)
        else:
            chunks = stream_chunks(
                cast(StreamFormat, fmt),  # one of the --format choices
                file_stream(),
                schema,
                label_column=args.label_column,
                chunk_rows=LOCAL_CHUNK_ROWS,
            )
        return await evaluate(model, chunks, direct_infer(model.run), options, piece_rows=LOCAL_CHUNK_ROWS)

    with _progress(console) as progress:
        task = progress.add_task(f"scoring {args.file.name}", total=args.file.stat().st_size)
        return asyncio.run(score(progress, task))


# ------------------------------------------------------------------------------------------ output


def _number(value: Any, digits: int = 6) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: Any) -> str:
    return "" if value is None else f"{value:+.6f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """The report as tables: scores beside the card's test metrics, averages, classes, confusion matrix."""
    title = f"{report.get('model')} v{report.get('version')} — {report.get('n')} rows"
    training = report.get("training", {})
    difference = report.get("difference", {})
    summary = Table(title=title, title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_column("card (test)", justify="right")
    summary.add_column("difference", justify="right")
    ours = flat_scores(report)
    aliases = {"log_loss": "loss"} if report.get("task") == "classification" else {}
    for name, value in ours.items():
        card_key = name if name in training else aliases.get(name)
        if card_key not in training:
            card_key = None
        label = name
        if name == "top_k_accuracy":
            label = f"top_{report['top_k_accuracy']['k']}_accuracy"
        elif name == "roc_auc":
            label = f"roc_auc (positive: {report['roc_auc']['pos_label']})"
        summary.add_row(
            label,
            _number(value),
            _number(training.get(card_key)) if card_key else "",
            _signed(difference.get(card_key)) if card_key else "",
        )
    console.print(summary)
    if report.get("task") != "classification":
        return
    per_class = Table(title="per class", title_justify="left")
    for column in ("label", "precision", "recall", "f1", "support"):
        per_class.add_column(column, justify="left" if column == "label" else "right")
    for row in report["per_class"]:
        per_class.add_row(
            str(row["label"]),
            _number(row["precision"]),
            _number(row["recall"]),
            _number(row["f1"]),
            str(row["support"]),
        )
    console.print(per_class)
    matrix = report["confusion_matrix"]
    labels = matrix["labels"]
    if len(labels) <= 30:
        table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
        table.add_column("")
        for label in labels:
            table.add_column(str(label), justify="right")
        for label, counts in zip(labels, matrix["matrix"], strict=True):
            table.add_row(str(label), *(str(c) for c in counts))
        console.print(table)


def plot_confusion_matrix(report: dict[str, Any], path: Path) -> None:
    """Draw the report's confusion matrix (row-normalised colours, counts written in) to ``path``."""
    if "confusion_matrix" not in report:
        raise CliError("--plot draws a confusion matrix: it needs a classification model")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CliError("--plot needs matplotlib: pip install 'modelserve[plot]'") from err
    import numpy as np

    labels = [str(label) for label in report["confusion_matrix"]["labels"]]
    counts = np.asarray(report["confusion_matrix"]["matrix"], dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(
        f"{report.get('model')} v{report.get('version')}: accuracy {report.get('accuracy', 0):.4f}"
    )
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                axes.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    color="white" if share[i, j] > 0.5 else "black",
                    fontsize=8,
                )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise CliError(f"cannot write {path}: {err}") from err
    finally:
        plt.close(figure)


__all__ = ["add_parser", "plot_confusion_matrix", "print_report", "run"]
