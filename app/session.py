"""onnxruntime sessions: execution providers, thread settings, and a protobuf walk of the file first."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnxruntime as ort

from app.settings import AUTOMATIC_PROVIDERS, Settings

logger = logging.getLogger(__name__)


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Providers to ask onnxruntime for: the requested ones this build has, else TensorRT/CUDA/CPU as present.

    A CPU build asked for CUDA only warns and runs on CPU, so unavailable providers are dropped here with
    a log line, and the providers a session really uses are read back from it (`session.get_providers()`).
    """
    available = ort.get_available_providers()
    wanted = list(requested) or list(AUTOMATIC_PROVIDERS)
    chosen = [name for name in wanted if name in available]
    missing = [name for name in requested if name not in available]
    if missing:
        logger.warning(
            "execution providers not in this onnxruntime build are skipped",
            extra={"skipped": missing, "available": available},
        )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # the fallback every build has
    return chosen


def create_session(model_bytes: bytes, settings: Settings, providers: Sequence[str]) -> ort.InferenceSession:
    """An inference session over an in-memory graph (the bytes whose sha256 was checked, not a re-read)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.resolved_intra_op_threads()
    options.inter_op_num_threads = settings.inter_op_threads
    # Warnings about providers the build lacks are expected on CPU machines; errors still show.
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=options, providers=list(providers))


# ---------------------------------------------------------------------------- protobuf walk (no onnx import)
# The messages of an ONNX file the walk enters: for each kind, its fields (number → kind) holding a nested
# message. Every place a TensorProto can sit is covered: graph initializers and sparse initializers, tensors
# in node attributes (`Constant` values), subgraphs in attributes (`If`, `Loop`, `Scan`), model-local
# functions and training graphs. Inputs and outputs of the main graph are entered down to their dimensions
# (for negative lengths). The walk takes about a second per million fields.
_NESTED: dict[str, dict[int, str]] = {
    "model": {7: "main graph", 20: "training info", 25: "function"},
    "main graph": {1: "node", 5: "tensor", 11: "value info", 12: "value info", 15: "sparse tensor"},
    "graph": {1: "node", 5: "tensor", 15: "sparse tensor"},
    "training info": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {
        5: "tensor",
        6: "graph",
        10: "tensor",
        11: "graph",
        22: "sparse tensor",
        23: "sparse tensor",
    },
    "sparse tensor": {1: "tensor", 2: "tensor"},
    "value info": {2: "type"},
    "type": {1: "tensor type"},
    "tensor type": {2: "shape"},
    "shape": {1: "dimension"},
}
# TensorProto.external_data = 13, data_location = 14 (EXTERNAL = 1); Dimension.dim_value = 1.
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL, _DIM_VALUE = 13, 14, 1, 1
# A negative int64 is written as a 10-byte varint of at least 2**63; -1 (2**64 - 1) is a common way to write a
# variable axis, which onnxruntime reads like any negative length: as a variable axis.
_INT64_SIGN, _MINUS_ONE = 1 << 63, (1 << 64) - 1
_MAX_DEPTH = 100  # protobuf's own default recursion limit: onnxruntime parses nothing deeper


@dataclass(frozen=True)
class GraphFileFacts:
    """What the protobuf walk finds in an ONNX file before onnxruntime sees it."""

    external_data: bool
    """A tensor keeps its data in a separate file (initializer, attribute, subgraph, function: anywhere)."""
    negative_dimension: bool
    """An input or output of the main graph declares an axis of negative length other than -1."""


def inspect_graph_file(model_bytes: bytes) -> GraphFileFacts:
    """Walk the protobuf of an ONNX file (no `onnx` import; raises `ValueError` on truncated or malformed
    bytes).

    onnxruntime resolves external data files relative to a folder; a served model must be self-contained, so
    such a graph is refused before onnxruntime is asked.
    """
    external = negative = False
    # Depth-first, one field at a time: memory grows with the nesting depth (capped, as protobuf caps it)
    # and never with the number of fields, whose count and nesting are chosen by whoever wrote the file.
    open_messages = [("model", _fields(memoryview(model_bytes)))]
    while open_messages:
        kind, fields = open_messages[-1]
        field = next(fields, None)
        if field is None:
            open_messages.pop()
            continue
        number, value = field
        nested = _NESTED.get(kind, {})
        if isinstance(value, memoryview) and number in nested:
            if len(open_messages) >= _MAX_DEPTH:
                raise ValueError(f"messages nested more than {_MAX_DEPTH} deep")
            open_messages.append((nested[number], _fields(value)))
        elif kind == "tensor":
            external |= number == _TENSOR_EXTERNAL_DATA or (
                number == _TENSOR_DATA_LOCATION and value == _EXTERNAL
            )
        elif kind == "dimension" and number == _DIM_VALUE and isinstance(value, int):
            negative |= value >= _INT64_SIGN and value != _MINUS_ONE
    return GraphFileFacts(external_data=external, negative_dimension=negative)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 70:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _fields(data: memoryview) -> Iterator[tuple[int, memoryview | int]]:
    """(field number, value) of one protobuf message, in order: an int for a varint, a memoryview (no copy)
    for a length-delimited field; fixed-width fields are skipped. A generator, so that a message of millions
    of fields never becomes a list of them."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
            continue
        if wire == 2:
            length, pos = _varint(data, pos)
            end = pos + length
        elif wire in (1, 5):
            end = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if end > len(data):
            raise ValueError("field runs past the end of its message")
        if wire == 2:
            yield number, data[pos:end]
        pos = end
