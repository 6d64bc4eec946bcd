"""onnxruntime sessions: execution providers, thread settings, and a refusal of external-data graphs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto.external_data = 13, data_location = 14.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 7, 5, 13, 14
_EXTERNAL = 1


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> list[tuple[int, int, memoryview | int]]:
    """Top-level (field number, wire type, value) of one protobuf message."""
    out: list[tuple[int, int, memoryview | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, wire, value))
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            out.append((number, wire, data[pos : pos + length]))
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def uses_external_data(model_bytes: bytes) -> bool:
    """Whether any initializer of the main graph keeps its data in a separate file.

    onnxruntime resolves such files relative to a folder; a served model must be self-contained, so this is
    refused before onnxruntime is asked (raises `ValueError` on bytes that are not a protobuf).
    """
    for number, wire, graph in _fields(memoryview(model_bytes)):
        if number != _MODEL_GRAPH or wire != 2 or isinstance(graph, int):
            continue
        for g_number, g_wire, tensor in _fields(graph):
            if g_number != _GRAPH_INITIALIZER or g_wire != 2 or isinstance(tensor, int):
                continue
            for t_number, _, value in _fields(tensor):
                if t_number == _TENSOR_EXTERNAL_DATA or (
                    t_number == _TENSOR_DATA_LOCATION and value == _EXTERNAL
                ):
                    return True
    return False
