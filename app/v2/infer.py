"""`POST /v2/models/{model}[/versions/{version}]/infer`: JSON or Triton's binary tensors, maybe compressed;
a hot route (answered by `app.http.front`, before FastAPI).

The body is decoded by `app.v2.codec` (binary tensors stay numpy views over the body), run through the
same core as `/predict` (`DataPlane.infer`), and encoded as the request asks (JSON or binary outputs,
Triton's classification extension, `Accept-Encoding`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Final

import numpy as np

from app.errors import InvalidInput
from app.http.asgi import Headers, header
from app.http.front import Answer, HotRequest
from app.http.openapi import BINARY_SCHEMA, JSON_TYPE, REQUEST_TIMEOUT_HEADER, REQUEST_TIMEOUT_SCHEMA
from app.model_card import PROBABILITIES_OUTPUT
from app.quality.ids import PredictionIds, predictions_of
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
async def infer(request: HotRequest, ids: PredictionIds | None) -> Answer:
    """Decode (JSON or binary, maybe compressed), run through the shared core, encode as asked; the
    response parameter `prediction_ids` lists one id per row (for `POST /feedback`; none when `ids` is
    None: `prediction_ids` off)."""
    dataplane = request.dataplane
    model = find_model(dataplane, request.path_params)
    request.model = model.name
    limit = dataplane.settings.max_body_bytes
    body = await request.body.read(limit)
    body = compression.decompress(body, _header(request, b"content-encoding"), max_bytes=limit)
    decoded = decode_request(body, _header_length(request))
    _check_datatypes(model, decoded)
    wanted = _requested_outputs(model, decoded)
    results = await dataplane.infer(model, decoded.inputs, deadline_seconds=_deadline(request, decoded))
    parameters = dict(decoded.parameters)
    if ids is not None:
        parameters["prediction_ids"] = ids.issue(
            model.name, model.version, predictions_of(model.task, results)
        )
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
    encoding = compression.negotiate(_header(request, b"accept-encoding"))
    if encoding is not None:
        content = compression.compress(content, encoding)
        headers.append((b"content-encoding", encoding.encode()))
    content_type = JSON_CONTENT if encoded.header_length is None else BINARY_CONTENT
    return Answer(content, content_type, headers)


def _deadline(request: HotRequest, decoded: InferenceRequest) -> float | None:
    """The sooner of the `X-Request-Timeout` header and the request's `parameters.timeout`."""
    limits = [s for s in (request.deadline_seconds, decoded.timeout_seconds) if s is not None]
    return min(limits) if limits else None


def _header(request: HotRequest, name: bytes) -> str | None:
    value = header(request.scope, name)
    return None if value is None else value.decode("latin-1")


def _header_length(request: HotRequest) -> int | None:
    raw = _header(request, HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _check_datatypes(model: LoadedModel, request: InferenceRequest) -> None:
    """Refuse a datatype that differs from the graph's (as Triton does) instead of casting silently."""
    for name, datatype in request.datatypes.items():
        spec = next((spec for spec in model.inputs if spec.name == name), None)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; model {model.name!r} takes {model.input_names}")
        expected = to_datatype(spec.dtype)
        if datatype != expected:
            raise InvalidInput(
                f"input {name!r} has datatype {datatype}; model {model.name!r} expects {expected}"
            )


def _requested_outputs(model: LoadedModel, request: InferenceRequest) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return tuple(_every(name) for name in model.output_names)
    for output in request.outputs:
        if output.name not in model.output_names:
            raise InvalidInput(
                f"unknown output {output.name!r}; model {model.name!r} has {model.output_names}"
            )
    return request.outputs


@functools.cache
def _every(output: str) -> RequestedOutput:
    """An output a request that names none gets (made once per output name)."""
    return RequestedOutput(output)


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
