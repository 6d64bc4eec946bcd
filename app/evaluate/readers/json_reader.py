"""A JSON ``/evaluate`` body: ``{"model", "inputs", "labels", ...}``, parsed whole (the body limit bounds it).

``inputs`` holds one item per row (the input's value, or an object by input name for a model with
several inputs), or an object of such lists by input name. A sequence model takes one list of steps per
row (a step a list of channels, or a number for one channel), as `/predict` does. Labels are class names
(strings) or class indices (integers), or numbers for a regressor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import InvalidInput
from app.evaluate.readers.common import (
    DEFAULT_CHUNK_ROWS,
    Chunk,
    EvaluationOptions,
    Schema,
    check_lengths,
)
from app.evaluate.readers.inputs import InputColumns
from app.evaluate.readers.targets import TargetEncoder
from app.http.params import parse_version
from app.model_card import SEQUENCE_INPUT


@dataclass(frozen=True)
class JsonEvaluation:
    """A parsed JSON ``/evaluate`` body."""

    model: str
    version: int | None
    inputs: Any
    labels: list[Any]
    options: EvaluationOptions


_JSON_KEYS = {"model", "version", "inputs", "labels", "zero_division", "top_k", "pos_label"}


def parse_json_body(body: bytes) -> JsonEvaluation:
    """Parse ``{"model", "inputs", "labels", "version"?, "zero_division"?, "top_k"?, "pos_label"?}``."""
    if not body.strip():
        raise InvalidInput('the body is empty; send {"model": ..., "inputs": [...], "labels": [...]}')
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"the body is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise InvalidInput('the body must be a JSON object {"model": ..., "inputs": [...], "labels": [...]}')
    unknown = sorted(set(obj) - _JSON_KEYS)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {sorted(_JSON_KEYS)}")
    for key in ("model", "inputs", "labels"):
        if key not in obj:
            raise InvalidInput(f"the body has no {key!r} field")
    if not isinstance(obj["model"], str) or not obj["model"]:
        raise InvalidInput("'model' must be a model name (a non-empty string)")
    if not isinstance(obj["labels"], list):
        raise InvalidInput("'labels' must be a list with one label per row")
    if not isinstance(obj["inputs"], list | dict):
        raise InvalidInput(
            "'inputs' must be a list with one item per row (or an object of such lists by input name)"
        )
    return JsonEvaluation(
        model=obj["model"],
        version=parse_version(obj.get("version")),
        inputs=obj["inputs"],
        labels=obj["labels"],
        options=EvaluationOptions.parse(obj.get("zero_division"), obj.get("top_k"), obj.get("pos_label")),
    )


async def json_chunks(
    request: JsonEvaluation, schema: Schema, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> AsyncIterator[Chunk]:
    """Chunks of a JSON body (already parsed, so this only slices it into rows)."""
    for chunk in _json_chunks(request, schema, chunk_rows):
        yield chunk


def _json_chunks(request: JsonEvaluation, schema: Schema, chunk_rows: int) -> Iterator[Chunk]:
    input_columns, encoder = InputColumns(schema), TargetEncoder(schema)
    inputs, labels = request.inputs, request.labels
    if isinstance(inputs, dict):
        names = [SEQUENCE_INPUT] if input_columns.takes_ragged(inputs) else input_columns.names
        missing = [name for name in names if name not in inputs]
        extra = sorted(set(inputs) - set(names))
        if missing or extra:
            raise InvalidInput(
                f"'inputs' must name the model's inputs {names}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        lengths = {name: len(value) if isinstance(value, list) else -1 for name, value in inputs.items()}
        if any(length < 0 for length in lengths.values()):
            raise InvalidInput("each input in 'inputs' must be a list with one item per row")
        if len(set(lengths.values())) > 1:
            raise InvalidInput(f"the inputs have different numbers of rows: {lengths}")
        n_inputs = next(iter(lengths.values()))
    else:
        n_inputs = len(inputs)
    check_lengths(n_inputs, len(labels), "inputs")
    for start in range(0, n_inputs, chunk_rows):
        stop = min(start + chunk_rows, n_inputs)
        values = (
            input_columns.from_columns(inputs, start, stop)
            if isinstance(inputs, dict)
            else input_columns.from_rows(inputs[start:stop], start + 1)
        )
        yield Chunk(values, encoder.encode_values(labels[start:stop], start + 1), start + 1)
