"""Domain errors, free of any web framework. `app/http/errors.py` maps them to HTTP in one table.

Every message is meant for the caller: it says what was wrong and where, never a path or a traceback.
Every class names its `reason`, the label value of `modelserve_request_failures_total` (dashboards and
alerts select on it, so a value never changes when a class is renamed).
"""

from __future__ import annotations

from typing import ClassVar


class ModelServeError(Exception):
    """Base of every error the service raises on purpose."""

    reason: ClassVar[str] = "model_serve_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelServeError):
    """Malformed or invalid request data (shape, dtype, non-finite values, unknown input name) → 400."""

    reason = "invalid_input"


class Unauthorized(ModelServeError):
    """Missing or wrong API key → 401."""

    reason = "unauthorized"


class ModelNotFound(ModelServeError):
    """Unknown model or version → 404."""

    reason = "model_not_found"


class PayloadTooLarge(ModelServeError):
    """Request body over the configured limit → 413."""

    reason = "payload_too_large"


class UnsupportedMediaType(ModelServeError):
    """Content type the endpoint does not read → 415."""

    reason = "unsupported_media_type"


class NotReady(ModelServeError):
    """Model or server not ready yet → 503 with Retry-After."""

    reason = "not_ready"

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Overloaded(NotReady):
    """Queue full → 503 with Retry-After."""

    reason = "overloaded"


class DeadlineExceeded(ModelServeError):
    """The request waited in the queue past its deadline → 504."""

    reason = "deadline_exceeded"


class FeatureDisabled(ModelServeError):
    """An optional endpoint that settings leave off (e.g. the repository extension) → 403."""

    reason = "feature_disabled"


class InferenceFailed(ModelServeError):
    """onnxruntime failed on a batch; a genuine internal fault → 500 with a generic message."""

    reason = "inference_failed"
