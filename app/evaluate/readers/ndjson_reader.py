"""An NDJSON ``/evaluate`` upload: one ``{"input": ..., "label": ...}`` per line, read chunk by chunk.

``input`` is what one item of a JSON body's ``inputs`` is (see `json_reader`); blank lines are not rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.errors import InvalidInput
from app.evaluate.readers.common import (
    DEFAULT_CHUNK_ROWS,
    ByteStream,
    Chunk,
    Schema,
    line_batches,
)
from app.evaluate.readers.inputs import InputColumns
from app.evaluate.readers.targets import TargetEncoder


async def ndjson_chunks(
    stream: ByteStream, schema: Schema, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> AsyncIterator[Chunk]:
    """Chunks of an NDJSON upload: one ``{"input": ..., "label": ...}`` per line."""
    input_columns, encoder = InputColumns(schema), TargetEncoder(schema)
    items: list[Any] = []
    labels: list[Any] = []
    row = 0
    line_no = 0
    first_row = 1
    async for lines in line_batches(stream):
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            row += 1
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise InvalidInput(f"row {row} (line {line_no}): not valid JSON: {err}") from err
            if not isinstance(obj, dict) or "input" not in obj or "label" not in obj:
                raise InvalidInput(
                    f'row {row} (line {line_no}): expected an object {{"input": ..., "label": ...}}'
                )
            items.append(obj["input"])
            labels.append(obj["label"])
            if len(items) >= chunk_rows:
                yield Chunk(
                    input_columns.from_rows(items, first_row),
                    encoder.encode_values(labels, first_row),
                    first_row,
                )
                first_row = row + 1
                items, labels = [], []
    if items:
        yield Chunk(
            input_columns.from_rows(items, first_row), encoder.encode_values(labels, first_row), first_row
        )
    if row == 0:
        raise InvalidInput(
            'the evaluation set is empty: no rows (send one {"input": ..., "label": ...} per line)'
        )
