"""What every Open Inference Protocol (V2) handler shares: how it is declared (`v2_route`) and mounted
(`V2Route.endpoint`), the core it calls, the model its path names, its JSON answers.

Handlers are plain Starlette request → response functions, except inference, a hot route of the front
(`app.http.front`): bodies never pass through FastAPI or pydantic. Errors are domain errors, answered by the
app's one table (`app/http/errors.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import request_response
from starlette.types import Receive, Scope, Send

from app.dataplane import DataPlane
from app.errors import NotReady
from app.http.openapi import JSON_TYPE, MODEL_NAME_SCHEMA, POSITIVE_INTEGER_TEXT_SCHEMA, Operation, Schema
from app.http.params import parse_version
from app.repository import LoadedModel

Handler = Callable[[Request], Awaitable[Response]]
AnyHandler = TypeVar("AnyHandler", bound=Callable[..., Awaitable[Any]])
"""A Starlette `Handler`, or a hot route's handler (`app.http.front.Handler`)."""
AnyHandler_co = TypeVar("AnyHandler_co", bound=Callable[..., Awaitable[Any]], covariant=True)

TAG: Final = "Open Inference Protocol (V2)"
ERROR_DESCRIPTIONS: Final = {
    400: "Invalid request (shape, datatype, name, malformed body)",
    401: "Missing or wrong admin key (when MODELSERVE_ADMIN_API_KEY is set)",
    403: "The admin routes are disabled",
    404: "Unknown model or version",
    413: "Body over the size limit",
    415: "Unsupported Content-Encoding",
    503: "Model not ready (see Retry-After)",
    504: "Deadline exceeded while queued",
}
PATH_PARAMETERS: Final = {"model": MODEL_NAME_SCHEMA, "version": POSITIVE_INTEGER_TEXT_SCHEMA}
"""The schemas of the path parameters of every V2 route."""
_INVALID_VERSION: Final = "model version {given!r} is not a positive integer"


@dataclass(frozen=True)
class V2Route(Generic[AnyHandler_co]):
    """A handler, the method and paths it answers, and its documentation."""

    handler: AnyHandler_co
    method: str
    paths: tuple[str, ...]
    operation: Operation
    """Its `operation_id` is `v2_<handler name>`; `app.v2.routes.install` numbers it for each path."""

    def endpoint(self: V2Route[Handler]) -> _Endpoint:
        """The handler as the ASGI app that `add_raw_route` mounts."""
        return _Endpoint(self.handler)


class _Endpoint:
    """A request → response handler as an ASGI app (a class, so that Starlette passes the triple through)."""

    def __init__(self, handler: Handler) -> None:
        self._app = request_response(handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def v2_route(
    method: str,
    *paths: str,
    summary: str,
    answer: type[BaseModel] | None = None,
    body: Mapping[str, Schema] | None = None,
    body_description: str | None = None,
    errors: tuple[int, ...] = (400, 404, 503),
    security: tuple[str, ...] = (),
    headers: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[AnyHandler], V2Route[AnyHandler]]:
    """Declare a handler for `paths`, documented by `summary`, its docstring, its answer, its errors and the
    security schemes it reads."""

    def declare(handler: AnyHandler) -> V2Route[AnyHandler]:
        operation = Operation(
            operation_id=f"v2_{handler.__name__}",
            summary=summary,
            description=inspect.getdoc(handler) or "",
            tags=(TAG,),
            answer=answer,
            errors={code: ERROR_DESCRIPTIONS[code] for code in errors},
            body=body,
            body_description=body_description,
            parameters={**PATH_PARAMETERS, **(headers or {})},
            headers=tuple(headers or ()),
            security=security,
        )
        return V2Route(handler, method, paths, operation)

    return declare


def json_response(payload: Any, status_code: int = 200) -> Response:
    """A JSON answer (orjson)."""
    return Response(orjson.dumps(payload), status_code=status_code, media_type=JSON_TYPE)


def dataplane_of(request: Request) -> DataPlane:
    """The app's core; `NotReady` before the app has one."""
    dataplane: DataPlane | None = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise NotReady("the server is starting; models are not loaded yet")
    return dataplane


def model_of(request: Request, dataplane: DataPlane) -> LoadedModel:
    """The model version the path names (`{model}`, and `{version}` if there is one)."""
    return find_model(dataplane, request.path_params)


def find_model(dataplane: DataPlane, path_params: Mapping[str, str]) -> LoadedModel:
    """The model version that path parameters name (`model`, and `version` if there is one)."""
    version = parse_version(path_params.get("version"), strict=True, invalid=_INVALID_VERSION)
    return dataplane.get_model(path_params["model"], version)
