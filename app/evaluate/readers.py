"""Readers: labelled evaluation data → `Chunk`s of model inputs and encoded targets.

Four formats, one shape of output. A JSON body (``{"model", "inputs", "labels", ...}``) is parsed whole
(it is bounded by the body limit); NDJSON, CSV and NPZ uploads are read from the request stream chunk by
chunk, so memory stays bounded by the chunk size however many rows arrive (NPZ is a zip archive, which
needs random access: it is spooled to a temporary file that keeps only its first few MB in memory, and
each array is then read a chunk of rows at a time).

Every problem is an `InvalidInput` that says what is wrong and at which row (1-based, counting data rows
only: a CSV header and blank lines are not rows): labels not among the model's classes, inputs and
labels of different lengths, an empty set, class names mixed with class indices, a CSV row with the
wrong number of columns, a missing label column, a value that is not a number.

A sequence model (`sequence` + `mask` inputs) takes ragged rows as `/predict` does: in JSON and NDJSON one
list of steps per row (a step a list of channels, or a number for one channel), padded and masked by the
core's `pad_sequences`; in NPZ ``inputs`` right-padded [N, steps, channels] with ``lengths`` [N] or
``mask`` [N, steps]. CSV, one flat row per example, cannot carry them (400).

Labels are class names or class indices. JSON says which by type (string or integer). In CSV and NPZ
string labels a value that names a class is a class name, else an integer is a class index; a set must
use one kind throughout.
"""

from __future__ import annotations

import asyncio
import csv
import math
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from app.errors import InvalidInput, PayloadTooLarge
from app.model_card import MASK_INPUT, SEQUENCE_INPUT, TensorSpec
from app.repository import pad_sequences
from app.scoring import ZeroDivision, parse_zero_division
from app.threads import BulkExecutor

DEFAULT_CHUNK_ROWS = 4096
"""Rows per chunk: what one chunk of an upload costs in memory, and the unit sent to the model."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest NDJSON / CSV line accepted (413 beyond it)."""
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
"""Bytes of an NPZ upload kept in memory before the spool moves to a temporary file."""
DEFAULT_LABEL_COLUMN = "label"
PARSE_THREADS = BulkExecutor(max_workers=2, name="evaluate-parse")
"""Where CSV numbers are parsed: low-priority threads (numpy's text parser runs there without the GIL)."""

ByteStream = AsyncIterator[bytes]
RowCount = int | Callable[[], int]
"""Rows per chunk: a number, or a function asked before each chunk (the route shrinks chunks while
interactive requests are being served)."""
LabelKind = Literal["class name", "class index"]


# ------------------------------------------------------------------------------------------ data types


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows: inputs by model input name, targets (class indices or float64 values)."""

    inputs: dict[str, npt.NDArray[Any]]
    targets: npt.NDArray[Any]
    first_row: int
    """1-based number of the chunk's first row in the whole set."""

    @property
    def rows(self) -> int:
        """Rows in the chunk."""
        return int(self.targets.shape[0])

    def where(self) -> str:
        """``rows a-b``: where in the set this chunk is, for error messages."""
        return f"rows {self.first_row}-{self.first_row + self.rows - 1}"


@dataclass(frozen=True)
class Schema:
    """What the readers need to know about the model: its task, class labels and inputs."""

    task: str
    labels: tuple[str, ...] | None
    inputs: tuple[TensorSpec, ...]
    pads_sequences: bool = False
    """A sequence model (`sequence` + `mask` inputs): rows are ragged sequences, padded by the core."""

    @classmethod
    def of(cls, model: Any) -> Schema:
        """From a `LoadedModel` (anything with ``task``, ``labels`` and ``inputs``)."""
        labels = getattr(model, "labels", None)
        return cls(
            task=str(model.task),
            labels=tuple(labels) if labels else None,
            inputs=tuple(model.inputs),
            pads_sequences=bool(getattr(model, "pads_sequences", False)),
        )

    @property
    def sequence_channels(self) -> int:
        """Values per step of a sequence model's `sequence` input (-1: any)."""
        spec = next(spec for spec in self.inputs if spec.name == SEQUENCE_INPUT)
        return spec.shape[2]

    @property
    def classification(self) -> bool:
        """True for a classifier."""
        return self.task == "classification"


@dataclass(frozen=True)
class EvaluationOptions:
    """Request options: ``zero_division`` (0, 1, "nan"), ``top_k``, ``pos_label`` (binary ROC AUC)."""

    zero_division: ZeroDivision = 0
    top_k: int | None = None
    pos_label: str | int | None = None

    @classmethod
    def parse(
        cls, zero_division: object = None, top_k: object = None, pos_label: object = None
    ) -> EvaluationOptions:
        """Validate raw values from a JSON body or the query string."""
        k: int | None = None
        if top_k is not None:
            if isinstance(top_k, str) and top_k.strip().isdigit():
                top_k = int(top_k)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise InvalidInput(f"top_k must be a positive integer, got {top_k!r}")
            k = top_k
        if pos_label is not None and (isinstance(pos_label, bool) or not isinstance(pos_label, str | int)):
            raise InvalidInput(f"pos_label must be a class name or a class index, got {pos_label!r}")
        return cls(zero_division=parse_zero_division(zero_division), top_k=k, pos_label=pos_label)


@dataclass(frozen=True)
class JsonEvaluation:
    """A parsed JSON ``/evaluate`` body."""

    model: str
    version: int | None
    inputs: Any
    labels: list[Any]
    options: EvaluationOptions


def parse_version(value: object) -> int | None:
    """A model version from a body or query (positive integer or its digits), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"version must be a positive integer, got {value!r}")
    return value


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


# ------------------------------------------------------------------------------------------ targets


class TargetEncoder:
    """Labels → int64 class indices (classification) or float64 values (regression), with row numbers.

    Keeps state across chunks: the kind of label (class names or class indices) the set started with.
    """

    def __init__(self, schema: Schema) -> None:
        """Prepare for the model's task and labels."""
        self.classification = schema.classification
        self.labels: tuple[str, ...] = schema.labels or ()
        self._index = {name: i for i, name in enumerate(self.labels)}
        self._kind: LabelKind | None = None
        self._kind_row = 0

    # -- shared

    def _classes_preview(self) -> str:
        shown = ", ".join(repr(label) for label in self.labels[:10])
        return shown + (", ..." if len(self.labels) > 10 else "")

    def _not_a_class(self, row: int, value: object) -> InvalidInput:
        return InvalidInput(
            f"row {row}: label {value!r} is not among the model's classes "
            f"({self._classes_preview()}; or a class index 0..{len(self.labels) - 1})"
        )

    def _claim(self, kind: LabelKind, row: int, value: object) -> None:
        if self._kind is None:
            self._kind, self._kind_row = kind, row
        elif self._kind != kind:
            raise InvalidInput(
                f"row {row}: label {value!r} is a {kind} but row {self._kind_row} gave a {self._kind}: "
                "mixed label types; use class names or class indices throughout"
            )

    def _index_range(self, values: npt.NDArray[np.int64], first_row: int, raw: Sequence[Any]) -> None:
        bad = np.flatnonzero((values < 0) | (values >= len(self.labels)))
        if bad.size:
            i = int(bad[0])
            raise self._not_a_class(first_row + i, raw[i])

    # -- JSON values (type says the kind)

    def encode_values(self, values: Sequence[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels from JSON: strings are class names, integers class indices; numbers for regression."""
        if not self.classification:
            return self._numbers(values, first_row)
        n = len(values)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        types = {type(v) for v in values}
        if types == {str}:
            self._claim("class name", first_row, values[0])
            found = [self._index.get(v, -1) for v in values]
            out = np.asarray(found, dtype=np.int64)
            bad = np.flatnonzero(out < 0)
            if bad.size:
                raise self._not_a_class(first_row + int(bad[0]), values[int(bad[0])])
            return out
        if types == {int}:
            self._claim("class index", first_row, values[0])
            n_classes = len(self.labels)
            for i, value in enumerate(values):
                if not 0 <= value < n_classes:
                    raise self._not_a_class(first_row + i, value)
            return np.asarray(values, dtype=np.int64)
        # mixed or unsupported types: report the first offending row
        for i, value in enumerate(values):
            row = first_row + i
            if isinstance(value, str):
                self._claim("class name", row, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                self._claim("class index", row, value)
            else:
                raise InvalidInput(
                    f"row {row}: label {value!r} must be a class name (string) or a class index (integer)"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    # -- text (CSV cells, NPZ string arrays): a class name wins, else an integer is an index

    def encode_text(self, values: Sequence[str] | npt.NDArray[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels given as text (CSV, NPZ string arrays)."""
        if not self.classification:
            return self._numbers_from_text(values, first_row)
        arr = np.asarray(values)
        if arr.shape[0] == 0:
            return np.empty(0, dtype=np.int64)
        uniques, inverse = np.unique(arr, return_inverse=True)
        index = np.empty(uniques.shape[0], dtype=np.int64)
        kinds = np.empty(uniques.shape[0], dtype=np.int8)  # 0 name, 1 index, 2 invalid
        for u, raw in enumerate(uniques.tolist()):
            text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()
            if text in self._index:
                index[u], kinds[u] = self._index[text], 0
            elif _is_int(text) and 0 <= int(text) < len(self.labels):
                index[u], kinds[u] = int(text), 1
            else:
                index[u], kinds[u] = -1, 2
        row_kinds = kinds[inverse]
        bad = np.flatnonzero(row_kinds == 2)
        if bad.size:
            i = int(bad[0])
            raise self._not_a_class(first_row + i, _text(arr[i]))
        names: tuple[LabelKind, LabelKind] = ("class name", "class index")
        self._claim(names[int(row_kinds[0])], first_row, _text(arr[0]))
        other = np.flatnonzero(row_kinds != row_kinds[0])
        if other.size:
            i = int(other[0])
            self._claim(names[int(row_kinds[i])], first_row + i, _text(arr[i]))
        return index[inverse]

    # -- typed arrays (NPZ)

    def encode_array(self, values: npt.NDArray[Any], first_row: int) -> npt.NDArray[Any]:
        """Labels from an NPZ array: integers are indices, strings are names (or index text)."""
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise InvalidInput(f"'labels' must have one label per row, got shape {list(values.shape)}")
        if values.dtype.kind in "US":
            return self.encode_text(values, first_row)
        if not self.classification:
            return self._numbers(values, first_row)
        if values.dtype.kind == "f":
            i = _first_non_integral(values)
            if i is not None:
                raise InvalidInput(
                    f"row {first_row + i}: label {values[i].item()!r} is not a class index (an integer)"
                )
            values = values.astype(np.int64)
        if values.dtype.kind not in "iu":
            raise InvalidInput(f"'labels' must hold class names or class indices, got dtype {values.dtype}")
        out = values.astype(np.int64)
        self._claim("class index", first_row, int(out[0]) if out.size else 0)
        self._index_range(out, first_row, out.tolist())
        return out

    # -- regression

    def _numbers(self, values: Sequence[Any] | npt.NDArray[Any], first_row: int) -> npt.NDArray[np.float64]:
        if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
            out = values.astype(np.float64)
        else:
            out = np.empty(len(values), dtype=np.float64)
            for i, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise InvalidInput(f"row {first_row + i}: label {value!r} is not a number")
                out[i] = value
        return _finite_targets(out, first_row)

    def _numbers_from_text(
        self, values: Sequence[str] | npt.NDArray[Any], first_row: int
    ) -> npt.NDArray[np.float64]:
        try:
            out = np.asarray(values).astype(np.float64)
        except ValueError:
            for i, value in enumerate(values):
                if not _is_float(_text(value)):
                    raise InvalidInput(
                        f"row {first_row + i}: label {_text(value)!r} is not a number"
                    ) from None
            raise
        return _finite_targets(out, first_row)


def _finite_targets(out: npt.NDArray[np.float64], first_row: int) -> npt.NDArray[np.float64]:
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise InvalidInput(f"row {first_row + int(bad[0])}: label is not a finite number")
    return out


def rows_of(count: RowCount) -> int:
    """The current value of a `RowCount` (at least 1)."""
    return max(1, count() if callable(count) else count)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_int(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isdigit()


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ inputs


class InputShaper:
    """Rows of input values → one array per model input, in the input's dtype and shape."""

    def __init__(self, schema: Schema) -> None:
        """Prepare for the model's inputs."""
        self.schema = schema
        self.specs = schema.inputs
        self.names = [spec.name for spec in schema.inputs]
        self._spec_by_name = {spec.name: spec for spec in schema.inputs}

    def takes_ragged(self, columns: Mapping[str, Any]) -> bool:
        """Whether ``{input name: rows}`` gives a sequence model only its sequences (the mask is built)."""
        return self.schema.pads_sequences and SEQUENCE_INPUT in columns and MASK_INPUT not in columns

    def _sequences(self, sequences: list[Any], first_row: int) -> dict[str, npt.NDArray[Any]]:
        """Ragged sequences → padded `sequence` and `mask` (the core's padding), checked like any input."""
        last = first_row + len(sequences) - 1
        sequence, mask = pad_sequences(
            sequences,
            self.schema.sequence_channels,
            where=f"rows {first_row}-{last}",
            row_name=lambda i: f"row {first_row + i}",
        )
        return self.sequence_inputs(sequence, mask, first_row)

    def sequence_inputs(
        self, sequence: npt.NDArray[Any], mask: npt.NDArray[np.bool_], first_row: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Padded sequences and their mask → the model's inputs: padding zeroed, trailing padding that no
        row of these uses trimmed, dtype, shape and finiteness checked."""
        real = mask.any(axis=0)
        steps = int(np.flatnonzero(real)[-1]) + 1 if real.any() else 0
        sequence, mask = sequence[:, :steps], mask[:, :steps]
        sequence = np.where(mask[:, :, None], sequence, 0)
        return {
            SEQUENCE_INPUT: self.fit(sequence, self._spec_by_name[SEQUENCE_INPUT], first_row),
            MASK_INPUT: self.fit(mask, self._spec_by_name[MASK_INPUT], first_row),
        }

    def from_rows(self, items: Sequence[Any], first_row: int) -> dict[str, npt.NDArray[Any]]:
        """One item per row: the input's value (single-input model) or an object by input name.

        A sequence model takes one sequence per row (a list of steps, or ``{"sequence": steps}``), of any
        length: the rows are right-padded and the mask is built, exactly as `/predict` does.
        """
        if self.schema.pads_sequences:
            return self._sequences(
                [_sequence_of(item, first_row + i) for i, item in enumerate(items)], first_row
            )
        if len(self.specs) == 1:
            spec = self.specs[0]
            return {spec.name: self._array(items, spec, first_row)}
        columns: dict[str, list[Any]] = {name: [] for name in self.names}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidInput(
                    f"row {first_row + i}: the model has several inputs ({', '.join(self.names)}); "
                    "give each row's input as an object by input name"
                )
            for name in self.names:
                if name not in item:
                    raise InvalidInput(f"row {first_row + i}: input {name!r} is missing")
                columns[name].append(item[name])
            extra = set(item) - set(self.names)
            if extra:
                raise InvalidInput(f"row {first_row + i}: unknown input name(s) {sorted(extra)}")
        return {spec.name: self._array(columns[spec.name], spec, first_row) for spec in self.specs}

    def from_columns(
        self, columns: Mapping[str, Sequence[Any]], start: int, stop: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Rows ``start:stop`` (0-based) of ``{input name: [one value per row]}``."""
        if self.takes_ragged(columns):
            return self._sequences(list(columns[SEQUENCE_INPUT][start:stop]), start + 1)
        return {
            spec.name: self._array(columns[spec.name][start:stop], spec, start + 1) for spec in self.specs
        }

    def fit(self, arr: npt.NDArray[Any], spec: TensorSpec, first_row: int) -> npt.NDArray[Any]:
        """Cast to the input's dtype, unflatten images, check fixed dimensions and finiteness."""
        dtype = np.dtype(spec.dtype)
        if arr.dtype != dtype:
            if arr.dtype.kind not in "biuf":
                raise InvalidInput(
                    f"{_rows(first_row, arr)}: input {spec.name!r} must be numbers, got {arr.dtype}"
                )
            with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: reported below
                arr = arr.astype(dtype)
        dims = list(spec.shape[1:])
        if arr.ndim == 1 and dims == [1]:
            arr = arr.reshape(-1, 1)
        fixed = all(d > 0 for d in dims)
        if fixed and arr.ndim == 2 and len(dims) > 1 and arr.shape[1] == math.prod(dims):
            arr = arr.reshape(arr.shape[0], *dims)  # flattened pixels
        if arr.ndim != len(dims) + 1 or any(
            d > 0 and d != a for d, a in zip(dims, arr.shape[1:], strict=False)
        ):
            flat = f" (or {math.prod(dims)} flattened values)" if fixed and len(dims) > 1 else ""
            raise InvalidInput(
                f"row {first_row}: input {spec.name!r} has shape {list(arr.shape[1:])} per row, "
                f"the model takes {dims}{flat}"
            )
        if arr.dtype.kind == "f":
            finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
            bad = np.flatnonzero(~finite)
            if bad.size:
                raise InvalidInput(
                    f"row {first_row + int(bad[0])}: input {spec.name!r} has a value that is not finite"
                )
        return np.ascontiguousarray(arr)

    def _array(self, values: Sequence[Any], spec: TensorSpec, first_row: int) -> npt.NDArray[Any]:
        dtype = np.dtype(spec.dtype)
        try:
            arr = np.asarray(values, dtype=dtype)
        except (ValueError, TypeError) as err:
            raise _locate_bad_row(values, spec, dtype, first_row) from err
        return self.fit(arr, spec, first_row)


def _rows(first_row: int, arr: npt.NDArray[Any]) -> str:
    return f"rows {first_row}-{first_row + max(0, arr.shape[0] - 1)}" if arr.ndim else f"row {first_row}"


def _locate_bad_row(
    values: Sequence[Any], spec: TensorSpec, dtype: np.dtype[Any], first_row: int
) -> InvalidInput:
    shape: tuple[int, ...] | None = None
    for i, value in enumerate(values):
        row = first_row + i
        try:
            arr = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError):
            return InvalidInput(f"row {row}: input {spec.name!r} is not an array of {spec.dtype} numbers")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            return InvalidInput(
                f"row {row}: input {spec.name!r} has shape {list(arr.shape)}, "
                f"but row {first_row} has {list(shape)}"
            )
    return InvalidInput(f"input {spec.name!r} is not a rectangular array of numbers")


def _sequence_of(item: Any, row: int) -> Any:
    """A sequence model's row: its list of steps, given bare or as ``{"sequence": steps}``."""
    if not isinstance(item, dict):
        return item
    if set(item) != {SEQUENCE_INPUT}:
        raise InvalidInput(
            f"row {row}: a sequence model takes each row as a list of steps (or "
            f"{{{SEQUENCE_INPUT!r}: steps}}); got the keys {sorted(item)} (the mask is built from the "
            "sequence's length)"
        )
    return item[SEQUENCE_INPUT]


# ------------------------------------------------------------------------------------------ JSON


async def json_chunks(
    request: JsonEvaluation, schema: Schema, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> AsyncIterator[Chunk]:
    """Chunks of a JSON body (already parsed, so this only slices and converts)."""
    for chunk in _json_chunks(request, schema, chunk_rows):
        yield chunk


def _json_chunks(request: JsonEvaluation, schema: Schema, chunk_rows: int) -> Iterator[Chunk]:
    shaper, encoder = InputShaper(schema), TargetEncoder(schema)
    inputs, labels = request.inputs, request.labels
    if isinstance(inputs, dict):
        names = [SEQUENCE_INPUT] if shaper.takes_ragged(inputs) else shaper.names
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
    _check_lengths(n_inputs, len(labels), "inputs")
    for start in range(0, n_inputs, chunk_rows):
        stop = min(start + chunk_rows, n_inputs)
        arrays = (
            shaper.from_columns(inputs, start, stop)
            if isinstance(inputs, dict)
            else shaper.from_rows(inputs[start:stop], start + 1)
        )
        yield Chunk(arrays, encoder.encode_values(labels[start:stop], start + 1), start + 1)


def _check_lengths(n_inputs: int, n_labels: int, what: str) -> None:
    if n_inputs == 0 and n_labels == 0:
        raise InvalidInput("the evaluation set is empty: no rows")
    if n_inputs != n_labels:
        missing = "label" if n_labels < n_inputs else "input"
        raise InvalidInput(
            f"{what} and labels have different lengths ({n_inputs} vs {n_labels}): "
            f"row {min(n_inputs, n_labels) + 1} has no {missing}"
        )


# ------------------------------------------------------------------------------------------ lines


async def _line_batches(
    stream: ByteStream, max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[list[bytes]]:
    """Complete lines (without the newline) in the batches the network delivered them."""
    tail: list[bytes] = []
    tail_bytes = 0
    async for piece in stream:
        if not piece:
            continue
        cut = piece.rfind(b"\n")
        if cut < 0:
            tail.append(piece)
            tail_bytes += len(piece)
            if tail_bytes > max_line_bytes:
                raise PayloadTooLarge(f"a line is longer than {max_line_bytes} bytes")
            continue
        head = piece[:cut]
        if tail:
            head = b"".join([*tail, head])
        tail = [piece[cut + 1 :]] if cut + 1 < len(piece) else []
        tail_bytes = len(tail[0]) if tail else 0
        yield head.split(b"\n")
    if tail:
        yield [b"".join(tail)]


# ------------------------------------------------------------------------------------------ NDJSON


async def ndjson_chunks(
    stream: ByteStream, schema: Schema, chunk_rows: RowCount = DEFAULT_CHUNK_ROWS
) -> AsyncIterator[Chunk]:
    """Chunks of an NDJSON upload: one ``{"input": ..., "label": ...}`` per line."""
    shaper, encoder = InputShaper(schema), TargetEncoder(schema)
    items: list[Any] = []
    labels: list[Any] = []
    row = 0
    line_no = 0
    first_row = 1
    limit = rows_of(chunk_rows)
    async for lines in _line_batches(stream):
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
            if len(items) >= limit:
                yield Chunk(
                    shaper.from_rows(items, first_row), encoder.encode_values(labels, first_row), first_row
                )
                first_row = row + 1
                items, labels = [], []
                limit = rows_of(chunk_rows)
    if items:
        yield Chunk(shaper.from_rows(items, first_row), encoder.encode_values(labels, first_row), first_row)
    if row == 0:
        raise InvalidInput(
            'the evaluation set is empty: no rows (send one {"input": ..., "label": ...} per line)'
        )


# ------------------------------------------------------------------------------------------ CSV


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
    chunk_rows: RowCount = DEFAULT_CHUNK_ROWS,
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
    shaper, encoder = InputShaper(schema), TargetEncoder(schema)
    layout: _CsvLayout | None = None
    pending: list[bytes] = []
    rows = 0
    limit = rows_of(chunk_rows)

    async def convert(lines: list[bytes]) -> Chunk:
        assert layout is not None
        first = rows - len(lines) + 1
        features, labels = await _csv_parse_off_loop(lines, layout, first)
        inputs = {spec.name: shaper.fit(features, spec, first)}
        return Chunk(inputs, encoder.encode_text(labels, first), first)

    async for lines in _line_batches(stream):
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
            if len(pending) >= limit:
                yield await convert(pending)
                pending = []
                limit = rows_of(chunk_rows)
    if layout is None:
        raise InvalidInput("the CSV is empty: no header row and no rows")
    if pending:
        yield await convert(pending)
    if rows == 0:
        raise InvalidInput("the evaluation set is empty: the CSV has a header but no rows")


async def _csv_parse_off_loop(
    lines: list[bytes], layout: _CsvLayout, first_row: int
) -> tuple[npt.NDArray[Any], list[str]]:
    """`_csv_parse`, with the numbers parsed by numpy's text parser, which releases the GIL, in a
    low-priority thread (`PARSE_THREADS`).

    The event loop (which also answers `/predict`) keeps only the cheap per-line work: checking the
    column counts, cutting off the label, joining the feature text. A chunk that the fast path does not
    cover (quoted fields, the label column in the middle, anything that is not a number) is parsed by
    `_csv_parse`, which locates the bad value.
    """
    split = _csv_split(lines, layout, first_row)
    if split is not None:
        text, labels = split
        loop = asyncio.get_running_loop()
        features = await loop.run_in_executor(
            PARSE_THREADS.get(), _parse_numbers, text, len(lines), len(layout.feature_columns)
        )
        if features is not None:
            return features, labels
    return _csv_parse(lines, layout, first_row)


def _csv_split(lines: list[bytes], layout: _CsvLayout, first_row: int) -> tuple[bytes, list[str]] | None:
    """Unquoted lines with the label first or last → (the feature fields joined by commas, the labels)."""
    n_columns = len(layout.names)
    expected = n_columns - 1
    for i, line in enumerate(lines):
        if line.count(b",") != expected:
            if b'"' in line:
                return None
            raise _column_count(first_row + i, line.count(b",") + 1, n_columns)
    if any(b'"' in line for line in lines):
        return None
    if layout.label_index == n_columns - 1:
        parts = [line.rpartition(b",") for line in lines]
        return b",".join([part[0] for part in parts]), [_label_text(part[2]) for part in parts]
    if layout.label_index == 0:
        parts = [line.partition(b",") for line in lines]
        return b",".join([part[2] for part in parts]), [_label_text(part[0]) for part in parts]
    return None


def _label_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


def _parse_numbers(text: bytes, rows: int, columns: int) -> npt.NDArray[np.float32] | None:
    """Comma-separated numbers → [rows, columns] float32 (as `np.loadtxt` reads them), or None when the
    text holds anything but exactly that many numbers. Runs without the GIL."""
    try:
        values = np.fromstring(text, dtype=np.float64, sep=",")
    except ValueError:
        return None
    if values.size != rows * columns:
        return None
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which `InputShaper.fit` reports
        return values.astype(np.float32).reshape(rows, columns)


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
            dtype=np.float32,
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
        features = np.array([[row[j] for j in layout.feature_columns] for row in rows]).astype(np.float32)
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
            text = _text(fields[j]).strip()
            if not _is_float(text):
                return InvalidInput(
                    f"row {first_row + i}: column {layout.names[j]!r}: {text!r} is not a number"
                )
    return InvalidInput(f"rows {first_row}-{first_row + len(rows) - 1}: a feature value is not a number")


# ------------------------------------------------------------------------------------------ NPZ


class _NpyRows:
    """One ``.npy`` member of an archive, read a block of rows at a time (C order), or whole (Fortran)."""

    def __init__(self, archive: zipfile.ZipFile, member: str, what: str) -> None:
        self.what = what
        self._fp: IO[bytes] = archive.open(member)
        fmt = np.lib.format
        try:
            version = fmt.read_magic(self._fp)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(self._fp)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(self._fp)
            else:
                self._fp.close()
                self._fp = archive.open(member)
                whole = fmt.read_array(self._fp, allow_pickle=False)
                shape, fortran, dtype = whole.shape, False, whole.dtype
                self._whole: npt.NDArray[Any] | None = whole
        except ValueError as err:
            raise InvalidInput(f"{what!r} in the NPZ archive is not a valid .npy array: {err}") from err
        if dtype.hasobject:
            raise InvalidInput(
                f"{what!r} in the NPZ archive is an object array; save numbers or fixed-width strings"
            )
        if len(shape) == 0:
            raise InvalidInput(f"{what!r} in the NPZ archive is a scalar; it needs one entry per row")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype[Any] = dtype
        self.rows = int(shape[0])
        self._row_items = math.prod(shape[1:])
        self._next = 0
        if version in ((1, 0), (2, 0)):
            self._whole = None
            if fortran and len(shape) > 1:
                data = self._read_exactly(self.rows * self._row_items * dtype.itemsize)
                self._whole = np.frombuffer(data, dtype=dtype).reshape(shape, order="F")

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray()
        while len(buffer) < size:
            block = self._fp.read(size - len(buffer))
            if not block:
                raise InvalidInput(f"{self.what!r} in the NPZ archive is truncated")
            buffer.extend(block)
        return buffer

    def read(self, count: int) -> npt.NDArray[Any]:
        """The next ``count`` rows."""
        start = self._next
        self._next += count
        if self._whole is not None:
            return np.ascontiguousarray(self._whole[start : start + count])
        data = self._read_exactly(count * self._row_items * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])

    def close(self) -> None:
        """Close the member stream."""
        self._fp.close()


async def npz_chunks(
    stream: ByteStream,
    schema: Schema,
    chunk_rows: RowCount = DEFAULT_CHUNK_ROWS,
    max_bytes: int | None = None,
    spool_memory_bytes: int = SPOOL_MEMORY_BYTES,
) -> AsyncIterator[Chunk]:
    """Chunks of an NPZ upload: arrays ``inputs`` (or one per input name) and ``labels``."""
    with tempfile.SpooledTemporaryFile(max_size=spool_memory_bytes) as spool:
        size = 0
        async for piece in stream:
            size += len(piece)
            if max_bytes is not None and size > max_bytes:
                raise PayloadTooLarge(
                    f"the NPZ upload is larger than {max_bytes} bytes; stream CSV or NDJSON instead"
                )
            try:
                spool.write(piece)
            except OSError as err:  # a full or read-only temporary directory
                raise PayloadTooLarge(
                    f"the NPZ upload ({size} bytes so far) does not fit the server's temporary storage; "
                    "stream CSV or NDJSON instead (they are never stored)"
                ) from err
        if size == 0:
            raise InvalidInput("the evaluation set is empty: the body has no bytes (expected an NPZ archive)")
        spool.seek(0)
        try:
            archive = zipfile.ZipFile(spool)
        except zipfile.BadZipFile as err:
            raise InvalidInput(
                "the body is not an NPZ archive (a zip of .npy arrays, as numpy.savez writes)"
            ) from err
        with archive:
            for chunk in _npz_read(archive, schema, chunk_rows):
                yield chunk


def _npz_read(archive: zipfile.ZipFile, schema: Schema, chunk_rows: RowCount) -> Iterator[Chunk]:
    members = {name.removesuffix(".npy"): name for name in archive.namelist()}
    arrays = ", ".join(sorted(members)) or "none"
    if "labels" not in members:
        raise InvalidInput(f"the NPZ archive has no 'labels' array (arrays: {arrays})")
    if schema.pads_sequences:
        yield from _npz_sequences(archive, members, schema, chunk_rows)
        return
    specs = schema.inputs
    keys: dict[str, str] = {}
    if len(specs) == 1 and "inputs" in members:
        keys[specs[0].name] = "inputs"
    else:
        for spec in specs:
            if spec.name not in members:
                wanted = "'inputs'" if len(specs) == 1 else ", ".join(repr(s.name) for s in specs)
                raise InvalidInput(f"the NPZ archive has no {wanted} array (arrays: {arrays})")
            keys[spec.name] = spec.name
    readers = {name: _NpyRows(archive, members[key], key) for name, key in keys.items()}
    labels = _NpyRows(archive, members["labels"], "labels")
    try:
        for name, reader in readers.items():
            _check_lengths(reader.rows, labels.rows, repr(keys[name]))
        shaper, encoder = InputShaper(schema), TargetEncoder(schema)
        spec_by_name = {spec.name: spec for spec in specs}
        start = 0
        while start < labels.rows:
            count = min(rows_of(chunk_rows), labels.rows - start)
            inputs = {
                name: shaper.fit(reader.read(count), spec_by_name[name], start + 1)
                for name, reader in readers.items()
            }
            yield Chunk(inputs, encoder.encode_array(labels.read(count), start + 1), start + 1)
            start += count
    finally:
        for reader in (*readers.values(), labels):
            reader.close()


def _npz_sequences(
    archive: zipfile.ZipFile, members: Mapping[str, str], schema: Schema, chunk_rows: RowCount
) -> Iterator[Chunk]:
    """A sequence model's NPZ: ``inputs`` (or ``sequence``) [N, steps, channels] right-padded ([N, steps]
    for a one-channel model), with ``lengths`` [N] (real steps per row) or ``mask`` [N, steps] (true on
    real steps); with neither, every step is real."""
    arrays = ", ".join(sorted(members))
    key = next((k for k in ("inputs", SEQUENCE_INPUT) if k in members), None)
    if key is None:
        raise InvalidInput(
            "the NPZ archive has no 'inputs' array (right-padded sequences [N, steps, channels], with "
            f"'lengths' [N] or 'mask' [N, steps]) (arrays: {arrays})"
        )
    if "lengths" in members and MASK_INPUT in members:
        raise InvalidInput("the NPZ archive has both 'lengths' and 'mask'; give one of them")
    steps_key = next((k for k in ("lengths", MASK_INPUT) if k in members), None)
    sequences = _NpyRows(archive, members[key], key)
    steps = _NpyRows(archive, members[steps_key], steps_key) if steps_key else None
    labels = _NpyRows(archive, members["labels"], "labels")
    try:
        channels, shape = schema.sequence_channels, sequences.shape
        if not (
            (len(shape) == 2 and channels in (1, -1)) or (len(shape) == 3 and channels in (-1, shape[2]))
        ):
            flat = " (or [N, steps] for one channel)" if channels in (1, -1) else ""
            raise InvalidInput(
                f"{key!r} has shape {list(shape)}; the model takes right-padded sequences "
                f"[N, steps, {channels}]{flat}"
            )
        if sequences.dtype.kind not in "biuf":
            raise InvalidInput(f"{key!r} must hold numbers, got dtype {sequences.dtype}")
        _check_lengths(sequences.rows, labels.rows, repr(key))
        if steps is not None:
            expected = [shape[0]] if steps_key == "lengths" else list(shape[:2])
            if list(steps.shape) != expected:
                what = "one length per row" if steps_key == "lengths" else f"one flag per step of {key!r}"
                raise InvalidInput(
                    f"{steps_key!r} has shape {list(steps.shape)}, expected {expected} ({what})"
                )
        shaper, encoder = InputShaper(schema), TargetEncoder(schema)
        start = 0
        while start < labels.rows:
            count = min(rows_of(chunk_rows), labels.rows - start)
            first = start + 1
            sequence = sequences.read(count)
            if sequence.ndim == 2:
                sequence = sequence[:, :, None]
            if steps is None:
                mask = np.ones(sequence.shape[:2], dtype=bool)
            elif steps_key == "lengths":
                mask = _mask_from_lengths(steps.read(count), sequence.shape[1], first)
            else:
                mask = _mask_from_flags(steps.read(count), first)
            inputs = shaper.sequence_inputs(sequence, mask, first)
            yield Chunk(inputs, encoder.encode_array(labels.read(count), first), first)
            start += count
    finally:
        for reader in (sequences, steps, labels):
            if reader is not None:
                reader.close()


def _first_non_integral(values: npt.NDArray[np.floating[Any]]) -> int | None:
    """Index of the first value that is not a finite whole number, or None."""
    bad = np.flatnonzero(~(np.isfinite(values) & (values == np.round(values))))
    return int(bad[0]) if bad.size else None


def _mask_from_lengths(lengths: npt.NDArray[Any], steps: int, first_row: int) -> npt.NDArray[np.bool_]:
    """Real steps per row → the mask (true on the first ``length`` steps)."""
    if lengths.dtype.kind == "f":
        i = _first_non_integral(lengths)
        if i is not None:
            raise InvalidInput(
                f"row {first_row + i}: length {float(lengths[i])!r} is not a whole number of steps"
            )
    elif lengths.dtype.kind not in "iu":
        raise InvalidInput(f"'lengths' must hold whole numbers of steps, got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > steps))
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(
            f"row {first_row + i}: length {int(lengths[i])} is not between 1 and {steps} "
            "(the padded steps per row)"
        )
    mask: npt.NDArray[np.bool_] = np.arange(steps)[None, :] < lengths[:, None]
    return mask


def _mask_from_flags(flags: npt.NDArray[Any], first_row: int) -> npt.NDArray[np.bool_]:
    """A mask array (true/false or 0/1) checked: every row has at least one real step."""
    if flags.dtype.kind != "b" and not (flags.dtype.kind in "iu" and bool(np.isin(flags, (0, 1)).all())):
        raise InvalidInput(f"'mask' must hold true/false (or 0/1), got dtype {flags.dtype}")
    mask = flags.astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise InvalidInput(f"row {first_row + int(empty[0])}: the mask marks no real step")
    return mask
