"""Domain errors, free of any web framework. `app/http_errors.py` maps them to HTTP in one table.

Every message is meant for the caller: it says what was wrong and where, never a path or a traceback.
"""

from __future__ import annotations


class ModelServeError(Exception):
    """Base of every error the service raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelServeError):
    """Malformed or invalid request data (shape, dtype, non-finite values, unknown input name) → 400."""


class Unauthorized(ModelServeError):
    """Missing or wrong API key → 401."""


class ModelNotFound(ModelServeError):
    """Unknown model or version → 404."""


class PayloadTooLarge(ModelServeError):
    """Request body over the configured limit → 413."""


class UnsupportedMediaType(ModelServeError):
    """Content type the endpoint does not read → 415."""


class NotReady(ModelServeError):
    """Model or server not ready yet → 503 with Retry-After."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Overloaded(NotReady):
    """Queue full → 503 with Retry-After."""


class DeadlineExceeded(ModelServeError):
    """The request waited in the queue past its deadline → 504."""


class FeatureDisabled(ModelServeError):
    """An optional endpoint that settings leave off (e.g. the repository extension) → 403."""


class InferenceFailed(ModelServeError):
    """onnxruntime failed on a batch; a genuine internal fault → 500 with a generic message."""
