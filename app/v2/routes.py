"""Open Inference Protocol (KServe V2) HTTP routes, with Triton's binary tensor, classification, model
configuration, statistics and model repository extensions.

Thin HTTP: each handler reads the raw request, calls the protocol-free core on `app.state.dataplane` (the
same `get_model` / `infer` as `/predict`) and writes the answer through `app.v2.codec`. The handlers are
plain Starlette endpoints: bodies never pass through FastAPI or pydantic, so binary tensors stay numpy
views over the body. Errors are domain errors, answered by the app's one table (`app/http_errors.py`).
The core owns `/v2/health/live` and `/v2/health/ready`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final

import numpy as np
import orjson
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, multiprocess
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import request_response
from starlette.types import Receive, Scope, Send

from app import __version__
from app.api.asgi import ClientDisconnected, read_body
from app.api.openapi import add_raw_route
from app.api.schemas import ErrorResponse
from app.dataplane import DataPlane
from app.errors import FeatureDisabled, InvalidInput, ModelServeError, NotReady
from app.http_errors import reason_for, status_for
from app.model_card import PROBABILITIES_OUTPUT, TensorSpec
from app.observability import UNKNOWN_MODEL, Metrics
from app.repository import LoadedModel
from app.settings import Settings
from app.v2 import compression
from app.v2.codec import (
    InferenceRequest,
    OutputTensor,
    RequestedOutput,
    classify,
    decode_request,
    encode_response,
)
from app.v2.datatypes import DATATYPE_TO_CONFIG_TYPE, to_datatype
from app.v2.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2ServerMetadata,
)

SERVER_NAME: Final = "modelserve"
PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"
EXTENSIONS: Final = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "statistics",
    "parameters",
)
REPOSITORY_EXTENSION: Final = "model_repository"
REPOSITORY_DISABLED: Final = (
    "the model repository extension (index, load, unload) is disabled; "
    "set MODELSERVE_ENABLE_REPOSITORY_API=true to enable it"
)
HEADER_LENGTH: Final = "inference-header-content-length"
INFER_ENDPOINT: Final = "/v2/models/{model}/infer"
JSON_TYPE: Final = "application/json"
BINARY_TYPE: Final = "application/octet-stream"
_REPOSITORY_STATES: Final = {
    "ready": "READY",
    "loading": "LOADING",
    "failed": "UNAVAILABLE",
    "unloaded": "UNAVAILABLE",
}

Handler = Callable[[Request], Awaitable[Response]]
_TAG: Final = "Open Inference Protocol (V2)"
_ROUTES: list[tuple[str, str, Handler, dict[str, Any]]] = []
_SCHEMAS: list[type[BaseModel]] = [
    ErrorResponse,
    V2InferRequest,
    V2InferResponse,
    V2ServerMetadata,
    V2ModelMetadata,
    V2ModelReady,
]


def install(app: FastAPI) -> None:
    """Mount every V2 route on `app` (as plain Starlette endpoints) and document them in OpenAPI."""
    for path, method, handler, operation in _ROUTES:
        add_raw_route(app, path, _Endpoint(handler), methods=[method], operation=operation, schemas=_SCHEMAS)


class _Endpoint:
    """A request → response handler as an ASGI app (what `add_raw_route` mounts)."""

    def __init__(self, handler: Handler) -> None:
        self._app = request_response(handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def _route(
    method: str,
    *paths: str,
    summary: str,
    answer: type[BaseModel] | None = None,
    body: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (400, 404, 503),
) -> Callable[[Handler], Handler]:
    """Register a handler for `paths` with its OpenAPI operation (description from its docstring)."""

    def register(handler: Handler) -> Handler:
        ok: dict[str, Any] = {"description": "OK"}
        if answer is not None:
            ok["content"] = {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{answer.__name__}"}}}
        error = {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        responses = {"200": ok} | {
            str(code): {"description": _REASONS[code], "content": error} for code in errors
        }
        for path in paths:
            parameters = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in ("model", "version")
                if f"{{{name}}}" in path
            ]
            operation: dict[str, Any] = {
                "tags": [_TAG],
                "summary": summary,
                "description": inspect.getdoc(handler) or "",
                "operationId": f"v2_{handler.__name__}_{len(_ROUTES)}",
                "parameters": parameters,
                "responses": responses,
            }
            if body is not None:
                operation["requestBody"] = body
            _ROUTES.append((path, method, handler, operation))
        return handler

    return register


_REASONS: Final = {
    400: "Invalid request (shape, datatype, name, malformed body)",
    403: "The repository extension is disabled",
    404: "Unknown model or version",
    413: "Body over the size limit",
    415: "Unsupported Content-Encoding",
    503: "Model not ready (see Retry-After)",
    504: "Deadline exceeded while queued",
}
_INFER_BODY: Final = {
    "required": True,
    "description": (
        "JSON, or Triton's binary tensor extension: a JSON header of `Inference-Header-Content-Length` "
        "bytes, then each tensor with `parameters.binary_data_size` as raw little-endian bytes (BYTES "
        "elements: 4-byte length + bytes). `Content-Encoding: gzip | deflate` compresses either form."
    ),
    "content": {
        JSON_TYPE: {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
        BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}},
    },
}


# ------------------------------------------------------------------------------------------------ infer
# Registered first: the hot path is matched before the other V2 routes.


@_route(
    "POST",
    "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}/infer",
    summary="Inference",
    answer=V2InferResponse,
    body=_INFER_BODY,
    errors=(400, 404, 413, 415, 503, 504),
)
async def infer(request: Request) -> Response:
    """Decode (JSON or binary, maybe compressed), run through the shared core, encode as asked."""
    dataplane = _dataplane(request)
    metrics = dataplane.metrics
    started = time.perf_counter()
    label = UNKNOWN_MODEL
    inflight = metrics.inflight_requests.labels(endpoint=INFER_ENDPOINT)
    inflight.inc()
    try:
        model = _model(request, dataplane)
        label = model.name
        response = await _infer(request, dataplane, model)
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        metrics.request_failures.labels(model=label, reason=reason_for(exc)).inc()
        status = status_for(exc) if isinstance(exc, ModelServeError) else 500
        metrics.request_duration.labels(endpoint=INFER_ENDPOINT, model=label, status=str(status)).observe(
            time.perf_counter() - started
        )
        raise
    finally:
        inflight.dec()
    metrics.request_duration.labels(endpoint=INFER_ENDPOINT, model=label, status="200").observe(
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


# ---------------------------------------------------------------------------------------- server + models


@_route("GET", "/v2", summary="Server metadata", answer=V2ServerMetadata, errors=())
async def server_metadata(request: Request) -> Response:
    """Name, version and the protocol extensions this server speaks."""
    extensions = list(EXTENSIONS)
    if _settings(request).enable_repository_api:
        extensions.append(REPOSITORY_EXTENSION)
    return _json({"name": SERVER_NAME, "version": __version__, "extensions": extensions})


# Before `/v2/models/{model}`, which would otherwise take "stats" for a model name.
@_route("GET", "/v2/models/stats", summary="Statistics of every model", errors=())
async def all_statistics(request: Request) -> Response:
    """Triton-style inference statistics of every ready model version."""
    dataplane = _dataplane(request)
    totals = _MetricTotals(dataplane.metrics)
    stats = [
        _statistics(dataplane.get_model(status.name, status.version), totals)
        for status in dataplane.models()
        if status.state == "ready"
    ]
    return _json({"model_stats": stats})


@_route(
    "GET",
    "/v2/models/{model}",
    "/v2/models/{model}/versions/{version}",
    summary="Model metadata",
    answer=V2ModelMetadata,
)
async def model_metadata(request: Request) -> Response:
    """Platform, versions, and every input and output with its datatype and shape (-1 = variable)."""
    dataplane = _dataplane(request)
    model = _model(request, dataplane)
    versions = [
        str(status.version)
        for status in dataplane.models()
        if status.name == model.name and status.state == "ready"
    ]
    return _json(
        {
            "name": model.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [_tensor_metadata(spec) for spec in model.inputs],
            "outputs": [_tensor_metadata(spec) for spec in model.outputs],
        }
    )


@_route(
    "GET",
    "/v2/models/{model}/ready",
    "/v2/models/{model}/versions/{version}/ready",
    summary="Model readiness",
    answer=V2ModelReady,
)
async def model_ready(request: Request) -> Response:
    """200 `{"ready": true}` when the version can answer; 404 unknown, 503 loading, failed or unloaded."""
    model = _model(request, _dataplane(request))
    return _json({"name": model.name, "version": str(model.version), "ready": True})


@_route(
    "GET",
    "/v2/models/{model}/config",
    "/v2/models/{model}/versions/{version}/config",
    summary="Model configuration (Triton)",
)
async def model_config(request: Request) -> Response:
    """A Triton-style model configuration (`dims` leave out the batch axis that `max_batch_size` bounds)."""
    dataplane = _dataplane(request)
    model = _model(request, dataplane)
    settings = dataplane.settings
    max_batch_size = settings.max_batch_rows if model.batchable else 0
    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"all": {}},  # every version in the repository is served
        "max_batch_size": max_batch_size,
        "input": [_tensor_config(spec, batched=max_batch_size > 0) for spec in model.inputs],
        "output": [_tensor_config(spec, batched=max_batch_size > 0) for spec in model.outputs],
        "parameters": {"task": {"string_value": model.task}},
    }
    if model.labels:
        config["parameters"]["labels"] = {"string_value": orjson.dumps(model.labels).decode()}
    if settings.batching and max_batch_size > 0:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(settings.max_batch_delay_seconds * 1e6),
        }
    return _json(config)


@_route(
    "GET",
    "/v2/models/{model}/stats",
    "/v2/models/{model}/versions/{version}/stats",
    summary="Model statistics (Triton)",
)
async def model_statistics(request: Request) -> Response:
    """Triton-style inference statistics: counts, and queue and compute time in nanoseconds."""
    dataplane = _dataplane(request)
    model = _model(request, dataplane)
    return _json({"model_stats": [_statistics(model, _MetricTotals(dataplane.metrics))]})


# ------------------------------------------------------------------------------------------- repository


@_route("POST", "/v2/repository/index", summary="Repository index (admin)", errors=(400, 403))
async def repository_index(request: Request) -> Response:
    """Every model version in the repository with its state (`{"ready": true}` keeps only ready ones)."""
    dataplane = _repository(request)
    options = await _options(request)
    ready_only = options.get("ready", False) is True
    index = [
        {
            "name": status.name,
            "version": str(status.version),
            "state": _REPOSITORY_STATES[status.state],
            "reason": status.reason or ("unloaded" if status.state == "unloaded" else ""),
        }
        for status in dataplane.models()
        if not ready_only or status.state == "ready"
    ]
    return _json(index)


@_route("POST", "/v2/repository/models/{model}/load", summary="Load a model (admin)", errors=(400, 403, 404))
async def repository_load(request: Request) -> Response:
    """(Re)load every version of a model from the repository folder; 400 if none of them loads."""
    dataplane = _repository(request)
    name = request.path_params["model"]
    options = await _options(request)
    if options.get("parameters"):
        raise InvalidInput(
            "load takes no parameters here (no config override or files); put the model on disk"
        )
    await dataplane.load(name)
    failed = [status for status in dataplane.models() if status.name == name and status.state != "ready"]
    if failed and len(failed) == len([status for status in dataplane.models() if status.name == name]):
        reasons = "; ".join(f"version {status.version}: {status.reason}" for status in failed)
        raise InvalidInput(f"model {name!r} failed to load: {reasons}")
    return Response(status_code=200)


@_route(
    "POST", "/v2/repository/models/{model}/unload", summary="Unload a model (admin)", errors=(400, 403, 404)
)
async def repository_unload(request: Request) -> Response:
    """Stop serving every version of a model."""
    dataplane = _repository(request)
    await _options(request)
    await dataplane.unload(request.path_params["model"])
    return Response(status_code=200)


# ------------------------------------------------------------------------------------------- statistics


class _MetricTotals:
    """Sums and counts of the core's per-model Prometheus metrics (all endpoints, all workers)."""

    def __init__(self, metrics: Metrics) -> None:
        self._values: dict[tuple[str, str], float] = {}
        self._success: dict[str, tuple[float, float]] = {}
        self._fail: dict[str, tuple[float, float]] = {}
        for name, labels, value in self._samples(metrics):
            model = labels.get("model", "")
            if name.startswith("modelserve_request_duration_seconds_"):
                table = self._success if labels.get("status", "").startswith("2") else self._fail
                count, total = table.get(model, (0.0, 0.0))
                if name.endswith("_count"):
                    count += value
                elif name.endswith("_sum"):
                    total += value
                table[model] = (count, total)
            elif name.endswith(("_count", "_sum")):
                key = (name, model)
                self._values[key] = self._values.get(key, 0.0) + value

    @staticmethod
    def _samples(metrics: Metrics) -> Iterator[tuple[str, dict[str, str], float]]:
        if metrics.multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(metrics.multiprocess_dir))  # type: ignore[no-untyped-call]
            families = list(registry.collect())
        else:
            families = [
                family
                for metric in (
                    metrics.request_duration,
                    metrics.queue_duration,
                    metrics.inference_duration,
                    metrics.batch_rows,
                )
                for family in metric.collect()
            ]
        for family in families:
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value

    def value(self, metric: str, model: str) -> float:
        return self._values.get((metric, model), 0.0)

    def duration(self, metric: str, model: str) -> dict[str, int]:
        return {
            "count": int(self.value(f"{metric}_count", model)),
            "ns": int(self.value(f"{metric}_sum", model) * 1e9),
        }

    def requests(self, model: str, *, success: bool) -> dict[str, int]:
        count, total = (self._success if success else self._fail).get(model, (0.0, 0.0))
        return {"count": int(count), "ns": int(total * 1e9)}


def _statistics(model: LoadedModel, totals: _MetricTotals) -> dict[str, Any]:
    """Triton's statistics shape, from the core's metrics (per model name: they carry no version)."""
    name = model.name
    zero = {"count": 0, "ns": 0}
    return {
        "name": name,
        "version": str(model.version),
        "last_inference": 0,
        "inference_count": int(totals.value("modelserve_batch_rows_sum", name)),
        "execution_count": int(totals.value("modelserve_batch_rows_count", name)),
        "inference_stats": {
            "success": totals.requests(name, success=True),
            "fail": totals.requests(name, success=False),
            "queue": totals.duration("modelserve_queue_duration_seconds", name),
            "compute_input": zero,
            "compute_infer": totals.duration("modelserve_inference_duration_seconds", name),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
        "memory_usage": [],
    }


# ---------------------------------------------------------------------------------------------- helpers


def _json(payload: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type=JSON_TYPE)


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane | None = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise NotReady("the server is starting; models are not loaded yet")
    return dataplane


def _settings(request: Request) -> Settings:
    return _dataplane(request).settings


def _repository(request: Request) -> DataPlane:
    dataplane = _dataplane(request)
    if not dataplane.settings.enable_repository_api:
        raise FeatureDisabled(REPOSITORY_DISABLED)
    return dataplane


async def _options(request: Request) -> dict[str, Any]:
    """The optional JSON object body of a repository request."""
    body = await read_body(request.scope, request.receive, 1 << 20)
    if not body.strip():
        return {}
    try:
        options = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"request body is not valid JSON: {err}") from err
    if not isinstance(options, dict):
        raise InvalidInput("request body must be a JSON object")
    return options


def _model(request: Request, dataplane: DataPlane) -> LoadedModel:
    params = request.path_params
    return dataplane.get_model(params["model"], _version(params.get("version")))


def _version(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"model version {text!r} is not a positive integer")
    return int(text)


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": to_datatype(spec.dtype), "shape": list(spec.shape)}


def _tensor_config(spec: TensorSpec, *, batched: bool) -> dict[str, Any]:
    dims = spec.shape[1:] if batched else spec.shape
    return {
        "name": spec.name,
        "data_type": DATATYPE_TO_CONFIG_TYPE[to_datatype(spec.dtype)],
        "dims": list(dims),
    }
