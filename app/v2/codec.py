"""Open Inference Protocol (KServe V2) codecs: tensors and infer bodies as encode/decode pairs.

Covers the JSON tensor form (`data` flat or nested, row-major) and Triton's binary tensor extension: a
request or response body is a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
tensors, in the order of the header's tensors that carry `parameters.binary_data_size`. Fixed-size
elements are little-endian; BYTES elements are each a 4-byte little-endian length and the bytes.

Binary fixed-size tensors decode to numpy views over the request body: nothing is copied into Python
objects. Nothing here knows about HTTP or models; the routes add that.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from app.errors import InvalidInput
from app.v2.datatypes import BYTES, to_datatype, to_dtype
from app.validation import cast_values, index_text

#: Request parameters that steer the protocol itself; the rest are echoed in the response.
PROTOCOL_PARAMETERS: Final = frozenset(
    {"binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end"}
)

_LENGTH: Final = struct.Struct("<I")


# ---------------------------------------------------------------------------------------------- tensors


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of `shape`."""
    return math.prod(shape)


def decode_json_tensor(data: Any, datatype: str, shape: Sequence[int], *, name: str = "") -> np.ndarray:
    """Decode a JSON tensor's `data` (flat or nested, row-major) into an array of `shape`.

    Numbers are checked here, by the core's rules (`cast_values`, as /predict and /evaluate check them),
    so that a bad value is named as the tensor's (`input 'x' data[1][1]`); the result has the datatype's
    dtype exactly.

    Raises:
        InvalidInput: unknown datatype, values of the wrong kind or out of range, or an element count
            that does not match the shape.
    """
    dtype = to_dtype(datatype)
    count = element_count(shape)
    if datatype == BYTES:
        flat = _flatten_strings(data, _where(name))
        if len(flat) != count:
            raise InvalidInput(f"{_where(name)}shape {list(shape)} needs {count} elements, got {len(flat)}")
        array = np.empty(count, dtype=np.object_)
        array[:] = flat
        return array.reshape(shape)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{_where(name)}'data' is not a rectangular array of numbers") from err
    if raw.size != count:
        raise InvalidInput(f"{_where(name)}shape {list(shape)} needs {count} elements, got {raw.size}")
    if dtype.kind in "iu" and raw.dtype.kind in "fO":
        # numpy widens a mix of large and small Python ints (uint64 range) to float64 or object.
        integers = _integers(data)
        if integers is not None:
            with contextlib.suppress(OverflowError):  # out of range: the core says which value
                return np.array(integers, dtype=dtype).reshape(shape)

    def place(index: tuple[int, ...]) -> str:  # the core's words for a bad value, with the tensor's name
        return (f"input {name!r} data" if name else "data") + index_text(index)

    return cast_values(raw, dtype, place, data).reshape(shape)


def encode_json_tensor(array: np.ndarray) -> Any:
    """The flat row-major `data` of an array, in a form orjson writes fast (numpy for numbers)."""
    if array.dtype.kind in "OSU":
        return [_to_text(item) for item in array.reshape(-1)]
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).reshape(-1)


def decode_binary_tensor(
    buffer: bytes | memoryview,
    datatype: str,
    shape: Sequence[int],
    *,
    offset: int = 0,
    size: int | None = None,
    name: str = "",
) -> np.ndarray:
    """Decode `size` bytes of `buffer` from `offset` as a tensor; fixed-size types give a view, no copy.

    Raises:
        InvalidInput: the byte count does not match the shape and datatype, or BYTES elements overrun.
    """
    dtype = to_dtype(datatype)
    count = element_count(shape)
    size = len(buffer) - offset if size is None else size
    if datatype == BYTES:
        where = _where(name)
        elements = decode_bytes_elements(memoryview(buffer)[offset : offset + size], where=where)
        if len(elements) != count:
            raise InvalidInput(f"{where}shape {list(shape)} needs {count} elements, got {len(elements)}")
        return elements.reshape(shape)
    expected = count * dtype.itemsize
    if size != expected:
        raise InvalidInput(
            f"{_where(name)}binary data is {size} bytes, but shape {list(shape)} of {datatype} needs "
            f"{expected}"
        )
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


def encode_binary_tensor(array: np.ndarray) -> bytes:
    """Raw little-endian row-major bytes of an array (BYTES: length-prefixed elements)."""
    if array.dtype.kind in "OSU":
        return encode_bytes_elements(array)
    little = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    return np.ascontiguousarray(array, dtype=little).tobytes()


def decode_bytes_elements(buffer: bytes | memoryview, *, where: str = "") -> npt.NDArray[np.object_]:
    """Split a BYTES buffer (4-byte little-endian length, then the bytes, repeated) into a 1-D array."""
    view = memoryview(buffer)
    end = len(view)
    items: list[bytes] = []
    position = 0
    while position < end:
        if position + 4 > end:
            raise InvalidInput(f"{where}BYTES data ends inside an element's 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(view, position)
        position += 4
        if position + length > end:
            raise InvalidInput(f"{where}BYTES element of {length} bytes runs past the end of its data")
        items.append(bytes(view[position : position + length]))
        position += length
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element as a 4-byte little-endian length and its bytes (str → UTF-8)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        raw = _to_bytes(item)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


# ------------------------------------------------------------------------------------------ infer bodies


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One entry of a request's `outputs`."""

    name: str
    binary: bool | None = None
    """`parameters.binary_data`; None follows the request's `binary_data_output`."""
    class_count: int = 0
    """`parameters.classification`; 0 returns the raw tensor."""


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A decoded infer request."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: tuple[RequestedOutput, ...] = ()
    """Outputs asked for, in the order asked; empty means every output."""
    binary_output: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    """Request parameters other than the protocol's own, passed through to the response."""
    timeout_seconds: float | None = None
    """`parameters.timeout` (microseconds in the protocol, as Triton's clients send it; 0 or absent: none)."""
    values_checked: frozenset[str] = frozenset()
    """Inputs sent as JSON `data`, whose values `decode_json_tensor` already checked (see
    `InputValidator.validate`); binary tensors are raw bytes, checked by the validator."""


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output to write in a response."""

    name: str
    array: np.ndarray
    binary: bool = False


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    """A response body and, when it carries binary tensors, the length of its JSON header."""

    body: bytes
    header_length: int | None


def decode_request(body: bytes, header_length: int | None = None) -> InferenceRequest:
    """Decode an infer request body (JSON, or JSON header + binary tensors when `header_length` is set).

    Raises:
        InvalidInput: malformed JSON, a malformed tensor, or binary sizes that do not add up to the body.
    """
    whole_json = header_length is None
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
        )
    try:
        header = orjson.loads(body if whole_json else memoryview(body)[:header_length])
    except orjson.JSONDecodeError as err:
        hint = "; a body with binary tensors needs Inference-Header-Content-Length" if whole_json else ""
        raise InvalidInput(f"request body is not valid JSON: {err}{hint}") from err
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    parameters = _object(header.get("parameters"), "'parameters'")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    values_checked: list[str] = []
    offset = header_length
    for raw in raw_inputs:
        name, datatype, shape, tensor_parameters = _tensor_header(raw)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears more than once")
        binary_size = tensor_parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in raw:
                raise InvalidInput(f"input {name!r} has both 'data' and 'binary_data_size'")
            if not _is_int(binary_size) or binary_size < 0:
                raise InvalidInput(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
            if whole_json and binary_size:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if offset + binary_size > len(body):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {binary_size} runs past the end of the request body"
                )
            array = decode_binary_tensor(body, datatype, shape, offset=offset, size=binary_size, name=name)
            offset += binary_size
        elif "data" in raw:
            array = decode_json_tensor(raw["data"], datatype, shape, name=name)
            if datatype != BYTES:
                values_checked.append(name)
        elif "shared_memory_region" in tensor_parameters:
            raise InvalidInput(f"input {name!r}: shared memory is not supported; send the data in the body")
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor 'parameters.binary_data_size'")
        inputs[name] = array
        datatypes[name] = datatype
    if offset != len(body):
        raise InvalidInput(
            f"request body has {len(body) - offset} bytes after the last binary input; "
            "check Inference-Header-Content-Length and each input's binary_data_size"
        )

    return InferenceRequest(
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(header.get("outputs")),
        binary_output=_flag(parameters.get("binary_data_output", False), "'binary_data_output'"),
        id=request_id,
        parameters={key: value for key, value in parameters.items() if key not in PROTOCOL_PARAMETERS},
        timeout_seconds=_timeout_seconds(parameters.get("timeout")),
        values_checked=frozenset(values_checked),
    )


def _timeout_seconds(raw: Any) -> float | None:
    """`parameters.timeout` in seconds: a non-negative integer of microseconds, 0 meaning none."""
    if raw is None:
        return None
    if not _is_int(raw) or raw < 0:
        raise InvalidInput(
            f"'parameters.timeout' must be a non-negative integer of microseconds, got {raw!r}"
        )
    return raw / 1e6 if raw else None


def encode_response(
    *,
    model_name: str,
    model_version: str,
    outputs: Iterable[OutputTensor],
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> EncodedResponse:
    """Encode an infer response: JSON tensors inline, binary tensors after the JSON header."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": to_datatype(output.array.dtype),
            "shape": list(output.array.shape),
        }
        if output.binary:
            blob = encode_binary_tensor(output.array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = encode_json_tensor(output.array)
        tensors.append(tensor)
    header["outputs"] = tensors
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return EncodedResponse(head, None)
    return EncodedResponse(b"".join([head, *blobs]), len(head))


# -------------------------------------------------------------------------------------- classification


def classify(
    scores: np.ndarray, class_count: int, labels: Sequence[str] | None = None
) -> npt.NDArray[np.object_]:
    """Triton's classification extension: the top `class_count` entries of each row as BYTES.

    Each element is ``"<value>:<index>"`` or ``"<value>:<index>:<label>"``, the value printed as C's
    ``%f`` for floating outputs (Triton prints it with ``std::to_string``) and ``%d`` for integers. The
    result has shape ``[rows, min(class_count, classes)]``; ties keep the lower index first.
    """
    if class_count < 1:
        raise InvalidInput("'classification' must be a positive integer")
    rows = scores.reshape(scores.shape[0] if scores.ndim else 1, -1)
    keep = min(class_count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :keep]
    pattern = "%f" if rows.dtype.kind == "f" else "%d"
    result = np.empty((rows.shape[0], keep), dtype=np.object_)
    for row, indices in enumerate(order.tolist()):
        values = rows[row, indices].tolist()
        for column, (index, value) in enumerate(zip(indices, values, strict=True)):
            text = f"{pattern % value}:{index}"
            if labels is not None and index < len(labels):
                text = f"{text}:{labels[index]}"
            result[row, column] = text.encode()
    return result


# ------------------------------------------------------------------------------------------- helpers


def _tensor_header(raw: Any) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(raw, dict):
        raise InvalidInput("each input must be a JSON object with 'name', 'shape' and 'datatype'")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("each input needs a non-empty string 'name'")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as FP32")
    to_dtype(datatype)
    parameters = raw.get("parameters")
    if parameters is None:
        return name, datatype, shape, {}
    return name, datatype, shape, _object(parameters, f"input {name!r}: 'parameters'")


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput("each requested output needs a non-empty string 'name'")
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _object(item.get("parameters"), f"output {name!r}: 'parameters'")
        if "shared_memory_region" in parameters:
            raise InvalidInput(f"output {name!r}: shared memory is not supported")
        binary = parameters.get("binary_data")
        if binary is not None:
            binary = _flag(binary, f"output {name!r}: 'binary_data'")
        class_count = parameters.get("classification", 0)
        if not _is_int(class_count) or class_count < 0:
            raise InvalidInput(f"output {name!r}: 'classification' must be a non-negative integer")
        outputs.append(RequestedOutput(name=name, binary=binary, class_count=class_count))
    return tuple(outputs)


def _object(raw: Any, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return raw


def _flag(raw: Any, what: str) -> bool:
    if not isinstance(raw, bool):
        raise InvalidInput(f"{what} must be true or false")
    return raw


def _where(name: str) -> str:
    """How a message about a tensor's data starts: `input 'x': ` (nothing for an unnamed tensor)."""
    return f"input {name!r}: " if name else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flatten_strings(data: Any, where: str) -> list[bytes]:
    flat: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item.encode())
        else:
            raise InvalidInput(f"{where}BYTES 'data' must hold strings")
    return flat


def _integers(data: Any) -> list[int] | None:
    """The items of nested lists, flat, when every one is an integer; else None."""
    flat: list[int] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif _is_int(item):
            flat.append(item)
        else:
            return None
    return flat


def _to_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    return str(item).encode()


def _to_text(item: object) -> str:
    if isinstance(item, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(item).decode()
        except UnicodeDecodeError:
            raise InvalidInput("a BYTES output is not UTF-8 text; ask for it with binary_data=true") from None
    return str(item)
