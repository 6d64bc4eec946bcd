"""The one table from domain errors to HTTP answers, and the batched-equals-unbatched property."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from app.http.errors import INTERNAL_ERROR_MESSAGE, error_parts, reason_for


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInput("x"), 400),
        (Unauthorized("x"), 401),
        (FeatureDisabled("x"), 403),
        (ModelNotFound("x"), 404),
        (PayloadTooLarge("x"), 413),
        (UnsupportedMediaType("x"), 415),
        (NotReady("x"), 503),
        (Overloaded("x"), 503),
        (DeadlineExceeded("x"), 504),
        (InferenceFailed("x"), 500),
    ],
)
def test_every_domain_error_has_its_status(error: ModelServeError, status: int) -> None:
    assert error_parts(error)[0] == status


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (InvalidInput("x"), "invalid_input"),
        (Unauthorized("x"), "unauthorized"),
        (FeatureDisabled("x"), "feature_disabled"),
        (ModelNotFound("x"), "model_not_found"),
        (PayloadTooLarge("x"), "payload_too_large"),
        (UnsupportedMediaType("x"), "unsupported_media_type"),
        (NotReady("x"), "not_ready"),
        (Overloaded("x"), "overloaded"),
        (DeadlineExceeded("x"), "deadline_exceeded"),
        (InferenceFailed("x"), "inference_failed"),
        (RuntimeError("x"), "internal_error"),
    ],
)
def test_every_error_has_its_metric_reason(error: Exception, reason: str) -> None:
    # The `reason` label values of modelserve_request_failures_total: dashboards select on them.
    assert reason_for(error) == reason


def test_overloaded_answers_503_with_retry_after() -> None:
    status, body, headers = error_parts(Overloaded("queue full; retry later", retry_after_seconds=2))
    assert status == 503
    assert orjson.loads(body) == {"error": "queue full; retry later"}
    assert (b"retry-after", b"2") in headers
    assert reason_for(Overloaded("x")) == "overloaded"


def test_internal_faults_answer_a_generic_message() -> None:
    for error in (InferenceFailed("onnxruntime said /secret/path is broken"), RuntimeError("/secret/path")):
        status, body, _ = error_parts(error)
        assert status == 500
        assert orjson.loads(body) == {"error": INTERNAL_ERROR_MESSAGE}
    assert reason_for(RuntimeError()) == "internal_error"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    row_counts=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=12),
    seed=st.integers(0, 99),
)
def test_concurrent_batched_outputs_equal_unbatched_outputs(
    client: TestClient, row_counts: list[int], seed: int
) -> None:
    dataplane = client.app.state.dataplane  # type: ignore[attr-defined]
    model = dataplane.get_model("clf")
    rng = np.random.default_rng(seed)
    requests = [rng.normal(size=(n, 4)).astype(np.float32) for n in row_counts]

    async def all_at_once() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*(dataplane.infer(model, {"features": x}) for x in requests)))

    results = client.portal.call(all_at_once)  # type: ignore[union-attr]
    for x, result in zip(requests, results, strict=True):
        alone = model.run({"features": x})
        assert result["label_index"].tolist() == alone["label_index"].tolist()
        np.testing.assert_allclose(result["probabilities"], alone["probabilities"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("error", [Overloaded("queue full"), NotReady("loading"), DeadlineExceeded("late")])
def test_a_burst_of_pressure_answers_logs_a_few_warnings_with_the_count(
    error: ModelServeError, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("app.http.errors.monotonic", lambda: now[0])
    monkeypatch.setattr("app.http.errors._quieted", {})
    with caplog.at_level(logging.INFO, logger="app.http.errors"):
        for _ in range(600):
            assert error_parts(error)[0] in (503, 504)
            now[0] += 2**-9  # 600 answers in 1.17 s (a step that adds up exactly)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING]
    name = type(error).__name__
    assert lines[0][1] == f"{name}: {error.message}"
    assert lines[1][1] == f"{name}: {error.message} (and 511 more in the last 1.0 s)"


def test_a_genuine_500_stays_an_error_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.http.errors"):
        errors = [RuntimeError(f"boom {i}") for i in range(3)]
        for error in errors:
            assert error_parts(error)[0] == 500
    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3
    assert [r.exc_info[1] if r.exc_info else None for r in caplog.records] == errors
