"""Readers: labelled evaluation data → `Chunk`s of model inputs and encoded targets.

Four formats, one shape of output, one module each: a JSON body (`json_reader`, parsed whole: it is
bounded by the body limit); NDJSON, CSV and NPZ uploads (`ndjson_reader`, `csv_reader`, `npz_reader`)
read from the request stream chunk by chunk, so memory stays bounded by the chunk size however many rows
arrive. Labels become targets in `targets`; `inputs` lays the parsed rows out by model input.

Readers only parse: the inputs of a chunk are checked and converted by the core validator
(`app.validation`, the same rules as `/predict`) when the runner takes the chunk.

Every problem is an `InvalidInput` that says what is wrong and at which row (1-based, counting data rows
only: a CSV header and blank lines are not rows): labels not among the model's classes, inputs and
labels of different lengths, an empty set, class names mixed with class indices, a CSV row with the
wrong number of columns, a missing label column, a value that is not a number.
"""

from collections.abc import AsyncIterator
from typing import Literal

from app.evaluate.readers.common import DEFAULT_CHUNK_ROWS, ByteStream, Chunk, EvaluationOptions, Schema
from app.evaluate.readers.csv_reader import csv_chunks
from app.evaluate.readers.json_reader import JsonEvaluation, json_chunks, parse_json_body
from app.evaluate.readers.ndjson_reader import ndjson_chunks
from app.evaluate.readers.npz_reader import npz_chunks

StreamFormat = Literal["csv", "ndjson", "npz"]
"""The formats read from a byte stream (a JSON body is parsed whole)."""


def stream_chunks(
    fmt: StreamFormat,
    stream: ByteStream,
    schema: Schema,
    *,
    label_column: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_npz_bytes: int | None = None,
) -> AsyncIterator[Chunk]:
    """The chunks of a streamed upload in format ``fmt`` (``label_column``: CSV only; ``max_npz_bytes``:
    the largest NPZ archive taken, None for no limit)."""
    if fmt == "csv":
        return csv_chunks(stream, schema, label_column, chunk_rows)
    if fmt == "ndjson":
        return ndjson_chunks(stream, schema, chunk_rows)
    return npz_chunks(stream, schema, chunk_rows, max_bytes=max_npz_bytes)


__all__ = [
    "ByteStream",
    "Chunk",
    "EvaluationOptions",
    "JsonEvaluation",
    "Schema",
    "StreamFormat",
    "csv_chunks",
    "json_chunks",
    "ndjson_chunks",
    "npz_chunks",
    "parse_json_body",
    "stream_chunks",
]
