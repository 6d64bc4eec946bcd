"""The ASGI app uvicorn runs (`create_app` returns it): what every request needs, done once, before FastAPI.

* `X-Request-ID`: the client's value when it looks like an id, else a new one (a random prefix drawn once
  per process and a counter); echoed in the response and put in a contextvar, so every log line of the
  request carries it.
* With an API key set, every path but health and metrics needs `Authorization: Bearer <key>`; admin routes
  guarded by the admin key are left to it (`app.http.admin`).
* One access log line per request (`access_log`; probes and scrapes only at debug level).
* Hot routes (`add_route`) are answered here, by their handler alone: it reads what it needs from a
  `HotRequest` and returns an `Answer` or raises; the front turns errors into their answers (the one table
  of `app.http.errors`) and records the request metrics (in flight, duration, failures).
* `X-Request-Timeout` (seconds) on an interactive hot route becomes `HotRequest.deadline_seconds`, the
  longest the request may wait in the model's queue (a bad value is a 400).
* Every other request goes to the FastAPI app, which also runs the lifespan and keeps the OpenAPI document,
  the docs page and the routing answers (404, 405, trailing-slash redirects), hot routes included.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.routing import compile_path

from app.dataplane import DataPlane
from app.errors import InvalidInput, Unauthorized
from app.http.admin import guarded_by_admin_key
from app.http.asgi import (
    JSON_HEADER,
    ClientDisconnected,
    Headers,
    Message,
    Receive,
    RequestBody,
    Scope,
    Send,
    header,
)
from app.http.errors import error_parts, reason_for
from app.http.openapi import Operation, add_raw_route
from app.observability import UNKNOWN_MODEL, PrometheusMetrics, RequestMetrics, request_id_var
from app.settings import Settings

access_logger = logging.getLogger("app.access")

# Paths probes and scrapers reach without the API key.
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_UNAUTHORIZED = "missing or wrong API key; send Authorization: Bearer <key>"
CLIENT_GONE = 499
"""The access log's status of a request whose client went away before it was answered (nothing is sent)."""


class HotRequest:
    """One request to a hot route, as its handler sees it."""

    __slots__ = ("body", "dataplane", "deadline_seconds", "model", "path_params", "scope")

    def __init__(
        self, scope: Scope, receive: Receive, path_params: dict[str, str], dataplane: DataPlane
    ) -> None:
        """Bind the request; nothing is read yet."""
        self.scope = scope
        self.body = RequestBody(scope, receive)
        self.path_params = path_params
        self.dataplane = dataplane
        """The core every route calls."""
        self.model = UNKNOWN_MODEL
        """The `model` label of the request metrics: the handler sets it once it has found the model."""
        self.deadline_seconds: float | None = None
        """The client's `X-Request-Timeout`: the longest it lets the request wait in the model's queue."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A hot route's answer (status 200)."""

    body: bytes
    content_type: bytes = b"application/json"
    headers: Headers | None = None
    """Further response headers (names in lower case)."""


Handler = Callable[[HotRequest], Awaitable[Answer]]


@dataclass(frozen=True)
class HotRoute:
    """A handler answered by the front, and how its requests are counted."""

    handler: Handler
    endpoint: str
    """The `endpoint` label of its request metrics."""
    interactive: bool = True
    """Its requests queue for the model and may set a deadline (`X-Request-Timeout`); bulk work does not."""
    drain_after_error_bytes: int = 0
    """After an error, read and drop up to this much of a body left unread, so that a client still sending
    gets the answer instead of a reset connection."""


@dataclass(frozen=True)
class _Served:
    method: str
    path: re.Pattern[str]
    route: HotRoute
    metrics: RequestMetrics


class Front:
    """The service's ASGI app: the FastAPI app `app`, behind the work every request shares."""

    def __init__(
        self, app: FastAPI, settings: Settings, metrics: PrometheusMetrics, dataplane: DataPlane
    ) -> None:
        """Put the front before `app`; the API key and access-log switch come from `settings`."""
        self.app = app
        self._settings = settings
        self._metrics = metrics
        self._dataplane = dataplane
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._expected = f"Bearer {key}".encode() if key else None
        self._access_log = settings.access_log
        self._routes: list[_Served] = []
        self._id_prefix = os.urandom(8).hex().encode()
        self._id_counter = itertools.count()

    @property
    def state(self) -> State:
        """The FastAPI app's state: `settings`, `metrics`, `dataplane`."""
        return self.app.state

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document (the FastAPI app's)."""
        return self.app.openapi()

    def add_route(self, path: str, route: HotRoute, *, method: str, operation: Operation) -> None:
        """Answer `method` on `path` (Starlette syntax, e.g. `/v2/models/{model}/infer`) with `route`.

        The FastAPI app mounts and documents the route too, so its routing answers for the path (405 for
        another method, trailing-slash redirects) and the OpenAPI document stay FastAPI's.
        """
        served = _Served(method, compile_path(path)[0], route, RequestMetrics(self._metrics, route.endpoint))
        self._routes.append(served)
        add_raw_route(self.app, path, _Mounted(self, served), method=method, operation=operation)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call (the lifespan and anything but HTTP go to the FastAPI app)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        authorization = b""
        request_timeout: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value
            elif key == b"authorization":
                authorization = value
            elif key == b"x-request-timeout":
                request_timeout = value
        if not _REQUEST_ID.match(request_id):
            request_id = b"%s%016x" % (self._id_prefix, next(self._id_counter))
        token = request_id_var.set(request_id.decode())
        started = time.perf_counter()
        status = 500
        path = scope["path"]
        try:
            if (
                self._expected is not None
                and path not in PUBLIC_PATHS
                and not hmac.compare_digest(authorization, self._expected)
                and not guarded_by_admin_key(self._settings, path)
            ):
                status = await self._refuse(send, request_id)
            else:
                status = await self._dispatch(scope, receive, send, request_id, started, request_timeout)
        finally:
            if self._access_log:
                # Probes and scrapes come every few seconds: they are logged only at debug level.
                level = logging.DEBUG if path in PUBLIC_PATHS else logging.INFO
                if access_logger.isEnabledFor(level):
                    extra = {
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    }
                    # `access_logger.log` without its search of the caller's source line (a tenth of the
                    # line's cost; the JSON log does not show it).
                    access_logger.handle(
                        access_logger.makeRecord(
                            access_logger.name, level, "", 0, "request", (), None, extra=extra
                        )
                    )
            request_id_var.reset(token)

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: bytes,
        started: float,
        request_timeout: bytes | None,
    ) -> int:
        method = scope["method"]
        for served in self._routes:
            if served.method == method:
                match = served.path.match(scope["path"])
                if match is not None:
                    return await self._serve(
                        served, match.groupdict(), scope, receive, send, request_id, started, request_timeout
                    )
        return await self._forward(scope, receive, send, request_id)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> int:
        """Let the FastAPI app answer, with the request id added to its answer."""
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)
        return status

    async def _serve(
        self,
        served: _Served,
        path_params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: bytes | None,
        started: float,
        request_timeout: bytes | None,
    ) -> int:
        """Answer a hot route (every error becomes its answer here) and record its metrics; the status.

        `started` is when the request came in (`time.perf_counter`); `request_timeout` the `X-Request-Timeout`
        header's value.
        """
        route, metrics = served.route, served.metrics
        request = HotRequest(scope, receive, path_params, self._dataplane)
        metrics.in_flight.inc()
        try:
            if request_timeout is not None and route.interactive:
                request.deadline_seconds = parse_request_timeout(request_timeout)
            answer = await route.handler(request)
            status, body = 200, answer.body
            headers = [(b"content-type", answer.content_type), (b"content-length", b"%d" % len(body))]
            if answer.headers:
                headers += answer.headers
        except ClientDisconnected:
            return CLIENT_GONE
        except Exception as exc:
            status, body, extra = error_parts(exc)
            metrics.failed(request.model, reason_for(exc))
            headers = [JSON_HEADER, (b"content-length", b"%d" % len(body)), *extra]
            if route.drain_after_error_bytes and not request.body.done:
                try:
                    await request.body.drain(route.drain_after_error_bytes)
                except ClientDisconnected:
                    return CLIENT_GONE
        finally:
            metrics.in_flight.dec()
        if request_id is not None:
            headers.append((b"x-request-id", request_id))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics.answered(request.model, status, time.perf_counter() - started)
        return status

    async def _refuse(self, send: Send, request_id: bytes) -> int:
        """Answer 401 (no API key, or a wrong one)."""
        status, body, headers = error_parts(Unauthorized(_UNAUTHORIZED))
        headers = [JSON_HEADER, *headers, (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return status


class _Mounted:
    """A hot route as the FastAPI app mounts it: answered the same way, should FastAPI route a request to
    it (the front answers its method on its path first; the request id is then added by `_forward`)."""

    def __init__(self, front: Front, served: _Served) -> None:
        self._front = front
        self._served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._front._serve(
            self._served,
            scope["path_params"],
            scope,
            receive,
            send,
            None,
            time.perf_counter(),
            header(scope, b"x-request-timeout"),
        )


def parse_request_timeout(value: bytes) -> float:
    """The `X-Request-Timeout` header in seconds: a positive, finite number.

    Raises:
        InvalidInput: anything else.
    """
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(
            f"X-Request-Timeout: expected a positive number of seconds, got {value.decode('latin-1')!r}"
        )
    return seconds
