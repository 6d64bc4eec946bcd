"""gzip / deflate bodies, as Triton's HTTP endpoint and `tritonclient` use them.

`Content-Encoding: deflate` means the zlib format (RFC 1950), which is what `tritonclient` sends; a raw
deflate stream (RFC 1951) is accepted too, since some clients send that under the same name.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Final

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

GZIP: Final = "gzip"
DEFLATE: Final = "deflate"
ENCODINGS: Final = (GZIP, DEFLATE)

#: zlib level for responses: 1 is ~4x cheaper than the default 6 and still shrinks float tensors well.
RESPONSE_COMPRESSION_LEVEL: Final = 1

_WBITS: Final = {GZIP: 16 + zlib.MAX_WBITS, DEFLATE: zlib.MAX_WBITS}


def decompress(body: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    """Undo a request's `Content-Encoding`, refusing more than `max_bytes` once inflated.

    Raises:
        UnsupportedMediaType: an encoding other than gzip, deflate or identity.
        InvalidInput: the body is not valid data in that encoding.
        PayloadTooLarge: the inflated body exceeds `max_bytes` (a compression bomb stops here).
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise UnsupportedMediaType(
            f"unsupported Content-Encoding {content_encoding!r}; use gzip, deflate or identity"
        )
    try:
        return _inflate(body, _WBITS[encoding], max_bytes)
    except zlib.error as err:
        if encoding != DEFLATE:
            raise InvalidInput(f"request body is not valid {encoding} data: {err}") from err
    try:
        return _inflate(body, -zlib.MAX_WBITS, max_bytes)
    except zlib.error as err:
        raise InvalidInput(f"request body is not valid deflate data: {err}") from err


def _inflate(body: bytes, wbits: int, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, max_bytes + 1)
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes once decompressed")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def negotiate(accept_encoding: str | None) -> str | None:
    """The response encoding to use for an `Accept-Encoding` header: gzip, deflate or None (identity)."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        token, _, params = item.strip().partition(";")
        weight = 1.0
        params = params.strip().replace(" ", "")
        if params.startswith("q="):
            try:
                weight = float(params[2:])
            except ValueError:
                weight = 0.0
        weights[token.strip().lower()] = weight
    for encoding in ENCODINGS:
        if weights.get(encoding, weights.get("*", 0.0)) > 0.0:
            return encoding
    return None


def compress(body: bytes, encoding: str) -> bytes:
    """Compress a response body with `encoding` (gzip or deflate in the zlib format)."""
    if encoding == GZIP:
        return gzip.compress(body, compresslevel=RESPONSE_COMPRESSION_LEVEL, mtime=0)
    if encoding == DEFLATE:
        return zlib.compress(body, RESPONSE_COMPRESSION_LEVEL)
    raise ValueError(f"unknown encoding {encoding!r}")
