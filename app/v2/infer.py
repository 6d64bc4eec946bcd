"""`POST /v2/models/{model}[/versions/{version}]/infer`: JSON or Triton's binary tensors, maybe compressed.

The body is decoded by `app.v2.codec` (binary tensors stay numpy views over the body), run through the
same core as `/predict` (`DataPlane.infer`), and encoded as the request asks (JSON or binary outputs,
Triton's classification extension, `Accept-Encoding`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from app.dataplane import DataPlane
from app.errors import InvalidInput
from app.http.asgi import ClientDisconnected, read_body
from app.http.errors import reason_for, status_for
from app.http.openapi import BINARY_SCHEMA, JSON_TYPE
from app.model_card import PROBABILITIES_OUTPUT
from app.observability import UNKNOWN_MODEL
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
from app.v2.endpoint import dataplane_of, model_of, v2_route
from app.v2.schemas import V2InferRequest, V2InferResponse

ENDPOINT: Final = "/v2/models/{model}/infer"
"""The `endpoint` label of the request metrics (both paths)."""
HEADER_LENGTH: Final = "inference-header-content-length"
BINARY_TYPE: Final = "application/octet-stream"


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
)
async def infer(request: Request) -> Response:
    """Decode (JSON or binary, maybe compressed), run through the shared core, encode as asked."""
    dataplane = dataplane_of(request)
    metrics = dataplane.metrics
    started = time.perf_counter()
    label = UNKNOWN_MODEL
    inflight = metrics.inflight_requests.labels(endpoint=ENDPOINT)
    inflight.inc()
    try:
        model = model_of(request, dataplane)
        label = model.name
        response = await _infer(request, dataplane, model)
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        metrics.request_failures.labels(model=label, reason=reason_for(exc)).inc()
        metrics.request_duration.labels(endpoint=ENDPOINT, model=label, status=str(status_for(exc))).observe(
            time.perf_counter() - started
        )
        raise
    finally:
        inflight.dec()
    metrics.request_duration.labels(endpoint=ENDPOINT, model=label, status="200").observe(
        time.perf_counter() - started
    )
    return response


async def _infer(request: Request, dataplane: DataPlane, model: LoadedModel) -> Response:
    limit = dataplane.settings.max_body_bytes
    body = await read_body(request.scope, request.receive, limit)
    body = compression.decompress(body, request.headers.get("content-encoding"), max_bytes=limit)
    decoded = decode_request(body, _header_length(request))
    _check_datatypes(model, decoded)
    wanted = _requested_outputs(model, decoded)
    results = await dataplane.infer(model, decoded.inputs)
    encoded = encode_response(
        model_name=model.name,
        model_version=str(model.version),
        outputs=[_output(model, results, output, decoded.binary_output) for output in wanted],
        request_id=decoded.id,
        parameters=decoded.parameters,
    )
    headers: dict[str, str] = {}
    content = encoded.body
    if encoded.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(encoded.header_length)
    encoding = compression.negotiate(request.headers.get("accept-encoding"))
    if encoding is not None:
        content = compression.compress(content, encoding)
        headers["Content-Encoding"] = encoding
    media_type = JSON_TYPE if encoded.header_length is None else BINARY_TYPE
    return Response(content, media_type=media_type, headers=headers)


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _check_datatypes(model: LoadedModel, request: InferenceRequest) -> None:
    """Refuse a datatype that differs from the graph's (as Triton does) instead of casting silently."""
    specs = {spec.name: spec for spec in model.inputs}
    for name, datatype in request.datatypes.items():
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; model {model.name!r} takes {model.input_names}")
        expected = to_datatype(spec.dtype)
        if datatype != expected:
            raise InvalidInput(
                f"input {name!r} has datatype {datatype}; model {model.name!r} expects {expected}"
            )


def _requested_outputs(model: LoadedModel, request: InferenceRequest) -> tuple[RequestedOutput, ...]:
    if not request.outputs:
        return tuple(RequestedOutput(name) for name in model.output_names)
    for output in request.outputs:
        if output.name not in model.output_names:
            raise InvalidInput(
                f"unknown output {output.name!r}; model {model.name!r} has {model.output_names}"
            )
    return request.outputs


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
