"""A CSV ``/evaluate`` upload: a header row, feature columns in order and a label column, read chunk by chunk.

One flat row of features per example, for a model with one input (an image input takes its pixels
flattened). The feature numbers are read as float64, and the core validator then takes them to the
input's dtype, so an integer or bool input is held to the same rules as in `/predict`. CSV cannot carry
a sequence model's ragged rows (400). The header row and blank lines are not rows.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from app.errors import InvalidInput
from app.evaluate.readers.common import (
    DEFAULT_CHUNK_ROWS,
    ByteStream,
    Chunk,
    Schema,
    line_batches,
    text_of,
)
from app.evaluate.readers.targets import TargetEncoder
from app.validation import reads_as_number

DEFAULT_LABEL_COLUMN = "label"


@dataclass
class _CsvLayout:
    names: list[str]
    label_index: int
    feature_columns: list[int]


def _csv_header(line: bytes, label_column: str) -> _CsvLayout:
    text = line.decode("utf-8-sig", "replace").rstrip("\r")
    names = [name.strip() for name in next(csv.reader([text]))] if text.strip() else []
    if not names:
        raise InvalidInput("the CSV has no header row (feature columns and a label column)")
    if label_column not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise InvalidInput(
            f"the CSV header has no label column {label_column!r} (columns: {shown}); "
            "name the label column with the label_column query parameter"
        )
    if len(names) < 2:
        raise InvalidInput("the CSV needs at least one feature column beside the label column")
    index = names.index(label_column)
    return _CsvLayout(names, index, [i for i in range(len(names)) if i != index])


async def csv_chunks(
    stream: ByteStream,
    schema: Schema,
    label_column: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> AsyncIterator[Chunk]:
    """Chunks of a CSV upload: a header row, feature columns in order, and a label column."""
    if schema.pads_sequences:
        raise InvalidInput(
            "CSV cannot carry variable-length sequences (one flat row of features per example); evaluate "
            "a sequence model with JSON or NDJSON (one list of steps per row), or NPZ ('inputs' "
            "[N, steps, channels] right-padded, with 'lengths' [N] or 'mask' [N, steps])"
        )
    if len(schema.inputs) != 1:
        raise InvalidInput(
            f"CSV evaluation needs a model with one input; this one has {len(schema.inputs)} "
            "(send NDJSON with an object per row instead)"
        )
    spec = schema.inputs[0]
    encoder = TargetEncoder(schema)
    layout: _CsvLayout | None = None
    pending: list[bytes] = []
    rows = 0

    def convert(lines: list[bytes]) -> Chunk:
        assert layout is not None
        first = rows - len(lines) + 1
        features, labels = _csv_parse(lines, layout, first)
        return Chunk({spec.name: features}, encoder.encode_text(labels, first), first)

    async for lines in line_batches(stream):
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if layout is None:
                if not line.strip():
                    continue
                layout = _csv_header(line, label_column or DEFAULT_LABEL_COLUMN)
                continue
            if not line.strip():
                continue
            pending.append(line)
            rows += 1
            if len(pending) >= chunk_rows:
                yield convert(pending)
                pending = []
    if layout is None:
        raise InvalidInput("the CSV is empty: no header row and no rows")
    if pending:
        yield convert(pending)
    if rows == 0:
        raise InvalidInput("the evaluation set is empty: the CSV has a header but no rows")


def _csv_parse(lines: list[bytes], layout: _CsvLayout, first_row: int) -> tuple[npt.NDArray[Any], list[str]]:
    n_columns = len(layout.names)
    if any(b'"' in line for line in lines):
        return _csv_parse_quoted(lines, layout, first_row)
    expected = n_columns - 1
    for i, line in enumerate(lines):
        if line.count(b",") != expected:
            raise _column_count(first_row + i, line.count(b",") + 1, n_columns)
    try:
        features = np.loadtxt(
            lines,
            delimiter=",",
            dtype=np.float64,
            usecols=layout.feature_columns,
            comments=None,
            ndmin=2,
            encoding=None,
        )
    except ValueError as err:
        raise _locate_non_numeric([line.split(b",") for line in lines], layout, first_row) from err
    li = layout.label_index
    if li == n_columns - 1:
        labels = [line.rpartition(b",")[2].decode("utf-8", "replace").strip() for line in lines]
    elif li == 0:
        labels = [line.partition(b",")[0].decode("utf-8", "replace").strip() for line in lines]
    else:
        labels = [line.split(b",")[li].decode("utf-8", "replace").strip() for line in lines]
    return features, labels


def _csv_parse_quoted(
    lines: list[bytes], layout: _CsvLayout, first_row: int
) -> tuple[npt.NDArray[Any], list[str]]:
    rows = list(csv.reader(line.decode("utf-8", "replace") for line in lines))
    n_columns = len(layout.names)
    for i, fields in enumerate(rows):
        if len(fields) != n_columns:
            raise _column_count(first_row + i, len(fields), n_columns)
    try:
        features = np.array([[row[j] for j in layout.feature_columns] for row in rows]).astype(np.float64)
    except ValueError as err:
        raise _locate_non_numeric(rows, layout, first_row) from err
    return features.reshape(len(rows), len(layout.feature_columns)), [
        row[layout.label_index].strip() for row in rows
    ]


def _column_count(row: int, got: int, expected: int) -> InvalidInput:
    return InvalidInput(f"row {row}: {got} columns, but the header has {expected}")


def _locate_non_numeric(rows: Sequence[Sequence[Any]], layout: _CsvLayout, first_row: int) -> InvalidInput:
    for i, fields in enumerate(rows):
        for j in layout.feature_columns:
            text = text_of(fields[j]).strip()
            if not reads_as_number(text):
                return InvalidInput(
                    f"row {first_row + i}: column {layout.names[j]!r}: {text!r} is not a number"
                )
    return InvalidInput(f"rows {first_row}-{first_row + len(rows) - 1}: a feature value is not a number")
