"""Triton's model repository extension (admin routes, off by default; `app.http.admin` says who may call
them): `POST /v2/repository/index`, `/v2/repository/models/{model}/load` and `/unload`.

`load` swaps new versions in without a gap (see `DataPlane.load`); `unload` lets queued requests finish."""

from __future__ import annotations

from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.dataplane import DataPlane
from app.errors import InvalidInput
from app.http.admin import ADMIN_KEY, require_admin
from app.http.asgi import RequestBody
from app.v2.endpoint import dataplane_of, json_response, v2_route

_REPOSITORY_STATES: Final = {
    "ready": "READY",
    "loading": "LOADING",
    "failed": "UNAVAILABLE",
    "unloaded": "UNAVAILABLE",
}


@v2_route(
    "POST",
    "/v2/repository/index",
    summary="Repository index (admin)",
    errors=(400, 401, 403, 413),
    security=(ADMIN_KEY.scheme_name,),
)
async def repository_index(request: Request) -> Response:
    """Every model version in the repository with its state (`{"ready": true}` keeps only ready ones)."""
    dataplane = await _repository(request)
    options = await _options(request, dataplane)
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
    return json_response(index)


@v2_route(
    "POST",
    "/v2/repository/models/{model}/load",
    summary="Load a model (admin)",
    errors=(400, 401, 403, 404, 413),
    security=(ADMIN_KEY.scheme_name,),
)
async def repository_load(request: Request) -> Response:
    """Rescan a model's folder: new, failed and unloaded versions load while the served ones go on, then
    swap in; 400 if no version of the model is ready afterwards."""
    dataplane = await _repository(request)
    name = request.path_params["model"]
    options = await _options(request, dataplane)
    if options.get("parameters"):
        raise InvalidInput(
            "load takes no parameters here (no config override or files); put the model on disk"
        )
    await dataplane.load(name)
    statuses = [status for status in dataplane.models() if status.name == name]
    if not any(status.state == "ready" for status in statuses):
        reasons = "; ".join(f"version {status.version}: {status.reason}" for status in statuses)
        raise InvalidInput(f"model {name!r} failed to load: {reasons}")
    return Response(status_code=200)


@v2_route(
    "POST",
    "/v2/repository/models/{model}/unload",
    summary="Unload a model (admin)",
    errors=(400, 401, 403, 404, 413),
    security=(ADMIN_KEY.scheme_name,),
)
async def repository_unload(request: Request) -> Response:
    """Stop serving every version of a model (requests already queued finish); it stays unloaded until
    loaded again, even by the repository poll."""
    dataplane = await _repository(request)
    await _options(request, dataplane)
    await dataplane.unload(request.path_params["model"])
    return Response(status_code=200)


async def _repository(request: Request) -> DataPlane:
    dataplane = dataplane_of(request)
    require_admin(dataplane.settings, await ADMIN_KEY(request))
    return dataplane


async def _options(request: Request, dataplane: DataPlane) -> dict[str, Any]:
    """The optional JSON object body of a repository request (at most the settings' body limit)."""
    body = await RequestBody(request.scope, request.receive).read(dataplane.settings.max_body_bytes)
    if not body.strip():
        return {}
    try:
        options = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"request body is not valid JSON: {err}") from err
    if not isinstance(options, dict):
        raise InvalidInput("request body must be a JSON object")
    return options
