"""Small helpers for raw ASGI handlers (the hot paths skip FastAPI's request machinery)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from app.errors import PayloadTooLarge, UnsupportedMediaType

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_HEADER = (b"content-type", b"application/json")
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
"""Media types of newline-delimited JSON (one JSON value per line)."""


class ClientDisconnected(Exception):
    """The client closed the connection before sending the whole body (no answer is sent)."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (`name` in lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def media_type(scope: Scope) -> str | None:
    """The declared content type without its parameters, in lower case (`text/csv`), or None."""
    value = header(scope, b"content-type")
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def is_json(media: str | None) -> bool:
    """Whether a media type (from `media_type`) is JSON; no content type counts as JSON."""
    return media is None or media == "application/json" or media.endswith("+json")


def require_json(scope: Scope) -> None:
    """Raise `UnsupportedMediaType` unless the body is declared JSON (no content type counts as JSON)."""
    media = media_type(scope)
    if not is_json(media):
        raise UnsupportedMediaType(f"content type {media!r} is not supported; send application/json")


class RequestBody:
    """The body of one request, taken from the ASGI `receive` channel whole (`read`) or piece by piece
    (`stream`); `done` says whether it was taken to the end."""

    __slots__ = ("_receive", "_scope", "done")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        """Bind the request; nothing is read yet."""
        self._scope = scope
        self._receive = receive
        self.done = False

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes before reading them where possible.

        Raises:
            PayloadTooLarge: the declared or received size exceeds `limit`.
            ClientDisconnected: the client went away mid-body.
        """
        declared = header(self._scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(_too_large(limit))
        chunks: list[bytes] = []
        size = 0
        while not self.done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            self.done = not message.get("more_body", False)
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(limit))
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def stream(self) -> AsyncIterator[bytes]:
        """The body's non-empty pieces as they arrive (unbounded: the caller decides what to keep).

        Raises:
            ClientDisconnected: the client went away mid-body.
        """
        while not self.done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            self.done = not message.get("more_body", False)
            piece: bytes = message.get("body", b"")
            if piece:
                yield piece

    async def drain(self, limit: int) -> None:
        """Read and drop the rest of the body, up to `limit` bytes (so that a client still sending gets
        the answer instead of a reset connection)."""
        size = 0
        async for piece in self.stream():
            size += len(piece)
            if size > limit:
                return


def _too_large(limit: int) -> str:
    return f"request body over the limit of {limit} bytes; send fewer rows per request"
