"""Small helpers for raw ASGI handlers (the hot path skips FastAPI's request machinery)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.errors import PayloadTooLarge, UnsupportedMediaType

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_HEADER = (b"content-type", b"application/json")


class ClientDisconnected(Exception):
    """The client closed the connection before sending the whole body (no answer is sent)."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (`name` in lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def require_json(scope: Scope) -> None:
    """Raise `UnsupportedMediaType` unless the body is declared JSON (no content type counts as JSON)."""
    content_type = header(scope, b"content-type")
    if content_type is None:
        return
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type != b"application/json" and not media_type.endswith(b"+json"):
        raise UnsupportedMediaType(
            f"content type {media_type.decode('latin-1')!r} is not supported; send application/json"
        )


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading them where possible.

    Raises:
        PayloadTooLarge: the declared or received size exceeds `limit`.
        ClientDisconnected: the client went away mid-body.
    """
    declared = header(scope, b"content-length")
    too_large = f"request body over the limit of {limit} bytes; send fewer rows per request"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(too_large)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    """Send a complete JSON response."""
    response_headers = [JSON_HEADER, (b"content-length", str(len(body)).encode())]
    if headers:
        response_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})
