"""The one table that turns domain errors (`app/errors.py`) into HTTP answers `{"error": "..."}`.

Raw ASGI handlers use `error_parts`; FastAPI routes get the same answers through the exception handlers
that `install_exception_handlers` registers. 4xx are logged without a traceback; the answers to pressure
(503 not ready or overloaded, 504 deadline exceeded) are expected under load, so they are warnings, at most
one line per second per error class with a count of the ones left out; anything unexpected is a 500 with a
generic message (never a traceback or a path), logged at error level with its traceback. `ErrorResponse`
documents the body in OpenAPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import monotonic

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.errors import (
    DeadlineExceeded,
    FeatureDisabled,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelServeError,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from app.http.asgi import Headers

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ModelServeError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    FeatureDisabled: 403,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InferenceFailed: 500,
    NotReady: 503,
    Overloaded: 503,
    DeadlineExceeded: 504,
}
PRESSURE_ERRORS: tuple[type[ModelServeError], ...] = (NotReady, DeadlineExceeded)
"""Answers a busy or starting server gives by design (`Overloaded` is a `NotReady`): logged as warnings."""
PRESSURE_LOG_INTERVAL_SECONDS = 1.0
"""At most one warning line per pressure error class in this time; the others are counted in the next."""
INTERNAL_ERROR_MESSAGE = (
    "internal server error; the request id in the X-Request-ID header finds it in the logs"
)


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str = Field(
        description="what was wrong and where", examples=["inputs: expected shape [N, 4], got [2, 3]"]
    )


def status_for(exc: BaseException) -> int:
    """HTTP status of an error (the nearest domain error class in the table; 500 if none)."""
    for cls in type(exc).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 500


def reason_for(exc: BaseException) -> str:
    """The `reason` label of failure metrics: the domain error's own, `internal_error` for anything else."""
    return exc.reason if isinstance(exc, ModelServeError) else "internal_error"


def error_body(message: str) -> bytes:
    """The JSON error body every endpoint answers with."""
    return orjson.dumps({"error": message})


@dataclass(slots=True)
class _Quieted:
    """One pressure error class's log: when it last wrote a line and how many it left out since."""

    logged_at: float
    left_out: int = 0


_quieted: dict[type[ModelServeError], _Quieted] = {}


def _log_pressure(exc: ModelServeError) -> None:
    """Log a pressure answer at WARNING, at most once per interval per class (monotonic clock)."""
    now = monotonic()
    state = _quieted.get(type(exc))
    if state is not None and now - state.logged_at < PRESSURE_LOG_INTERVAL_SECONDS:
        state.left_out += 1
        return
    if state is None or not state.left_out:
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    else:
        logger.warning(
            "%s: %s (and %d more in the last %.1f s)",
            type(exc).__name__,
            exc.message,
            state.left_out,
            now - state.logged_at,
        )
    _quieted[type(exc)] = _Quieted(now)


def error_parts(exc: BaseException) -> tuple[int, bytes, Headers]:
    """Status, body and extra headers for any exception (unexpected ones become a generic 500).

    Also logs it: a 4xx at INFO without a traceback, a pressure answer (503, 504) as a rate-limited
    warning, any other 5xx at ERROR (with the traceback when unexpected).
    """
    if not isinstance(exc, ModelServeError):
        logger.error("unexpected error", exc_info=exc)
        return 500, error_body(INTERNAL_ERROR_MESSAGE), []
    status = status_for(exc)
    headers: Headers = []
    if isinstance(exc, NotReady):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after_seconds))).encode()))
    elif isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, PRESSURE_ERRORS):
        _log_pressure(exc)
        message = exc.message
    elif status >= 500:
        # InferenceFailed carries internal detail for the log only; the client gets the generic text.
        logger.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__)
        message = INTERNAL_ERROR_MESSAGE if status == 500 else exc.message
    else:
        logger.info("%s: %s", type(exc).__name__, exc.message)
        message = exc.message
    return status, error_body(message), headers


def error_response(exc: BaseException) -> Response:
    """`error_parts` as a Starlette response."""
    status, body, headers = error_parts(exc)
    response = Response(body, status_code=status, media_type="application/json")
    for key, value in headers:
        response.headers[key.decode()] = value.decode()
    return response


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_domain_error(_: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(InvalidInput(_validation_message(exc)))


async def _on_http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    response = Response(
        error_body(str(exc.detail)), status_code=exc.status_code, media_type="application/json"
    )
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


async def _on_unexpected(_: Request, exc: Exception) -> Response:
    return error_response(exc)


def install_exception_handlers(app: FastAPI) -> None:
    """Register the mapping above on a FastAPI app (domain errors, validation, HTTP errors, anything else)."""
    app.add_exception_handler(ModelServeError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
