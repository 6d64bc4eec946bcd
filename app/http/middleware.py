"""The one middleware (raw ASGI, cheap): request id, API key check, access log.

* `X-Request-ID` from the client is kept (if it looks like an id) or a new one is made; it is echoed in
  the response and put in a contextvar so every log line of the request carries it.
* With an API key set, every path but health and metrics needs `Authorization: Bearer <key>`; admin routes
  guarded by the admin key are left to it (`app.http.admin`).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Unauthorized
from app.http.admin import guarded_by_admin_key
from app.http.asgi import JSON_HEADER
from app.http.errors import error_parts
from app.observability import request_id_var
from app.settings import Settings

logger = logging.getLogger("app.access")

# Paths probes and scrapers reach without the API key.
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContextMiddleware:
    """Request id, authentication and access log for every HTTP request."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        """Wrap `app`; the API key and access-log switch come from `settings`."""
        self.app = app
        self._settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._expected = f"Bearer {key}".encode() if key else None
        self._access_log = settings.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        authorization = b""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value
            elif key == b"authorization":
                authorization = value
        if not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex.encode()
        token = request_id_var.set(request_id.decode())
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            if (
                self._expected is not None
                and scope["path"] not in PUBLIC_PATHS
                and not guarded_by_admin_key(self._settings, scope["path"])
                and not hmac.compare_digest(authorization, self._expected)
            ):
                code, body, headers = error_parts(
                    Unauthorized("missing or wrong API key; send Authorization: Bearer <key>")
                )
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": code,
                        "headers": [JSON_HEADER, *headers],
                    }
                )
                await send_with_id({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_with_id)
        finally:
            if self._access_log:
                # Probes and scrapes come every few seconds: they are logged only at debug level.
                logger.log(
                    logging.DEBUG if scope["path"] in PUBLIC_PATHS else logging.INFO,
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    },
                )
            request_id_var.reset(token)
