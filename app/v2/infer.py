"""`POST /v2/models/{model}[/versions/{version}]/infer`: JSON or Triton's binary tensors, maybe compressed;
a hot route (answered by `app.http.front`, before FastAPI).

The body is decoded by `app.v2.codec` (binary tensors stay numpy views over the body), run through the
same core as `/predict` (`DataPlane.infer`), and encoded as the request asks (JSON or binary outputs,
Triton's classification extension, `Accept-Encoding`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from app.errors import InvalidInput
from app.http.asgi import Headers
from app.http.front import Answer, HotRequest
from app.http.openapi import BINARY_SCHEMA, JSON_TYPE, REQUEST_TIMEOUT_HEADER, REQUEST_TIMEOUT_SCHEMA
from app.model_card import PROBABILITIES_OUTPUT
from app.quality.ids import PREDICTION_IDS
from app.repository import LoadedModel
from app.v2 import compression
from app.v2.codec import (
    InferenceRequest,
    OutputTensor,
    RequestedOutput,
    classify,
    decode_request,
    encode_response,
)
from app.v2.datatypes import to_datatype
from app.v2.endpoint import find_model, v2_route
from app.v2.schemas import V2InferRequest, V2InferResponse

ENDPOINT: Final = "/v2/models/{model}/infer"
"""The `endpoint` label of the request metrics (both paths)."""
HEADER_LENGTH: Final = b"inference-header-content-length"
BINARY_TYPE: Final = "application/octet-stream"
JSON_CONTENT: Final = JSON_TYPE.encode()
BINARY_CONTENT: Final = BINARY_TYPE.encode()
_READ_HEADERS: Final = frozenset({b"content-encoding", HEADER_LENGTH, b"accept-encoding"})


@v2_route(
    "POST",
    "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}/infer",
    summary="Inference",
    answer=V2InferResponse,
    body={JSON_TYPE: V2InferRequest, BINARY_TYPE: BINARY_SCHEMA},
    body_description=(
        "JSON, or Triton's binary tensor extension: a JSON header of `Inference-Header-Content-Length` "
        "bytes, then each tensor with `parameters.binary_data_size` as raw little-endian bytes (BYTES "
        "elements: 4-byte length + bytes). `Content-Encoding: gzip | deflate` compresses either form."
    ),
    errors=(400, 404, 413, 415, 503, 504),
    headers={REQUEST_TIMEOUT_HEADER: REQUEST_TIMEOUT_SCHEMA},
)
async def infer(request: HotRequest) -> Answer:
    """Decode (JSON or binary, maybe compressed), run through the shared core, encode as asked; the
    response parameter `prediction_ids` lists one id per row (for `POST /feedback`; none when
    `prediction_ids` is off)."""
    dataplane = request.dataplane
    model = find_model(dataplane, request.path_params)
    request.model = model.name
    content_encoding, header_length, accept_encoding = _headers(request)
    limit = dataplane.settings.max_body_bytes
    body = await request.body.read(limit)
    if content_encoding is not None:
        body = compression.decompress(body, content_encoding.decode("latin-1"), max_bytes=limit)
    decoded = decode_request(body, _header_length(header_length))
    _check_datatypes(model, decoded)
    wanted = _requested_outputs(model, decoded)
    # One check of the values: JSON tensors were checked as they were decoded, binary ones are here.
    arrays = model.validate_inputs(decoded.inputs, values_checked=decoded.values_checked)
    results = await dataplane.run_validated(model, arrays, deadline_seconds=_deadline(request, decoded))
    parameters = dict(decoded.parameters)
    issued = results.get(PREDICTION_IDS)
    if issued is not None:
        parameters["prediction_ids"] = issued.tolist()
    encoded = encode_response(
        model_name=model.name,
        model_version=str(model.version),
        outputs=[_output(model, results, output, decoded.binary_output) for output in wanted],
        request_id=decoded.id,
        parameters=parameters,
    )
    headers: Headers = []
    content = encoded.body
    if encoded.header_length is not None:
        headers.append((HEADER_LENGTH, b"%d" % encoded.header_length))
    encoding = None if accept_encoding is None else compression.negotiate(accept_encoding.decode("latin-1"))
    if encoding is not None:
        content = compression.compress(content, encoding)
        headers.append((b"content-encoding", encoding.encode()))
    content_type = JSON_CONTENT if encoded.header_length is None else BINARY_CONTENT
    return Answer(content, content_type, headers)


def _deadline(request: HotRequest, decoded: InferenceRequest) -> float | None:
    """The sooner of the `X-Request-Timeout` header and the request's `parameters.timeout`."""
    header, parameter = request.deadline_seconds, decoded.timeout_seconds
    if header is None:
        return parameter
    return header if parameter is None else min(header, parameter)


def _headers(request: HotRequest) -> tuple[bytes | None, bytes | None, bytes | None]:
    """`Content-Encoding`, `Inference-Header-Content-Length` and `Accept-Encoding` (the first of each), in
    one pass over the request's headers."""
    found: dict[bytes, bytes] = {}
    for key, value in request.scope["headers"]:
        if key in _READ_HEADERS:
            found.setdefault(key, value)
    return found.get(b"content-encoding"), found.get(HEADER_LENGTH), found.get(b"accept-encoding")


def _header_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    raw = value.decode("latin-1")
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _check_datatypes(model: LoadedModel, request: InferenceRequest) -> None:
    """Refuse a datatype that differs from the graph's (as Triton does) instead of casting silently."""
    graph_datatypes = _facts(model).datatypes
    for name, datatype in request.datatypes.items():
        expected = graph_datatypes.get(name)
        if expected is None:
            raise InvalidInput(f"unknown input {name!r}; model {model.name!r} takes {model.input_names}")
        if datatype != expected:
            raise InvalidInput(
                f"input {name!r} has datatype {datatype}; model {model.name!r} expects {expected}"
            )


def _requested_outputs(model: LoadedModel, request: InferenceRequest) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return _facts(model).every_output
    for output in request.outputs:
        if output.name not in model.output_names:
            raise InvalidInput(
                f"unknown output {output.name!r}; model {model.name!r} has {model.output_names}"
            )
    return request.outputs


@dataclass(frozen=True, slots=True)
class _GraphFacts:
    """What every request to one model version needs from its graph, worked out once."""

    datatypes: dict[str, str]
    """The V2 datatype of each graph input."""
    every_output: tuple[RequestedOutput, ...]
    """What a request that names no output gets: every output, as it is."""


_FACTS: Final[weakref.WeakKeyDictionary[LoadedModel, _GraphFacts]] = weakref.WeakKeyDictionary()


def _facts(model: LoadedModel) -> _GraphFacts:
    """The model version's `_GraphFacts` (forgotten with the version)."""
    facts = _FACTS.get(model)
    if facts is None:
        facts = _FACTS[model] = _GraphFacts(
            datatypes={spec.name: to_datatype(spec.dtype) for spec in model.inputs},
            every_output=tuple(RequestedOutput(name) for name in model.output_names),
        )
    return facts


def _output(
    model: LoadedModel, results: Mapping[str, np.ndarray], requested: RequestedOutput, binary_default: bool
) -> OutputTensor:
    array = results[requested.name]
    if requested.class_count:
        labels = model.labels
        row_width = int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
        if labels is not None and requested.name != PROBABILITIES_OUTPUT and row_width != len(labels):
            labels = None
        array = classify(array, requested.class_count, labels)
    binary = binary_default if requested.binary is None else requested.binary
    return OutputTensor(requested.name, array, binary)
