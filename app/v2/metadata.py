"""Server and model metadata: `GET /v2`, `/v2/models/{model}[/versions/{version}]` and its `/ready` and
`/config` (Triton's model configuration extension). The core owns `/v2/health/live` and `/ready`."""

from __future__ import annotations

from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import __version__
from app.http.admin import admin_enabled
from app.model_card import TensorSpec
from app.v2.datatypes import DATATYPE_TO_CONFIG_TYPE, to_datatype
from app.v2.endpoint import dataplane_of, json_response, model_of, v2_route
from app.v2.schemas import V2ModelMetadata, V2ModelReady, V2ServerMetadata

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
"""Listed only when the admin routes are on (`app.http.admin.admin_enabled`)."""


@v2_route("GET", "/v2", summary="Server metadata", answer=V2ServerMetadata, errors=())
async def server_metadata(request: Request) -> Response:
    """Name, version and the protocol extensions this server speaks."""
    extensions = list(EXTENSIONS)
    if admin_enabled(dataplane_of(request).settings):
        extensions.append(REPOSITORY_EXTENSION)
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": extensions})


@v2_route(
    "GET",
    "/v2/models/{model}",
    "/v2/models/{model}/versions/{version}",
    summary="Model metadata",
    answer=V2ModelMetadata,
)
async def model_metadata(request: Request) -> Response:
    """Platform, versions, and every input and output with its datatype and shape (-1 = variable)."""
    dataplane = dataplane_of(request)
    model = model_of(request, dataplane)
    versions = [
        str(status.version)
        for status in dataplane.models()
        if status.name == model.name and status.state == "ready"
    ]
    return json_response(
        {
            "name": model.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [_tensor_metadata(spec) for spec in model.inputs],
            "outputs": [_tensor_metadata(spec) for spec in model.outputs],
        }
    )


@v2_route(
    "GET",
    "/v2/models/{model}/ready",
    "/v2/models/{model}/versions/{version}/ready",
    summary="Model readiness",
    answer=V2ModelReady,
)
async def model_ready(request: Request) -> Response:
    """200 `{"ready": true}` when the version can answer; 404 unknown, 503 loading, failed or unloaded."""
    model = model_of(request, dataplane_of(request))
    return json_response({"name": model.name, "version": str(model.version), "ready": True})


@v2_route(
    "GET",
    "/v2/models/{model}/config",
    "/v2/models/{model}/versions/{version}/config",
    summary="Model configuration (Triton)",
)
async def model_config(request: Request) -> Response:
    """A Triton-style model configuration (`dims` leave out the batch axis that `max_batch_size` bounds)."""
    dataplane = dataplane_of(request)
    model = model_of(request, dataplane)
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
    return json_response(config)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": to_datatype(spec.dtype), "shape": list(spec.shape)}


def _tensor_config(spec: TensorSpec, *, batched: bool) -> dict[str, Any]:
    dims = spec.shape[1:] if batched else spec.shape
    return {
        "name": spec.name,
        "data_type": DATATYPE_TO_CONFIG_TYPE[to_datatype(spec.dtype)],
        "dims": list(dims),
    }
