"""Each kind of bad input gets its 4xx with `{"error": ...}` saying what and where; the server stays up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.errors import InvalidInput
from app.main import create_app
from app.settings import Settings
from tests.serving.bad_input_cases import CASES, GOOD, body


@pytest.fixture(scope="module")
def shared_client(model_repository: Path) -> Iterator[TestClient]:
    """One app for the whole table: every case runs against the same, still healthy, server."""
    app = create_app(Settings(model_repository=model_repository, max_body_bytes=4096, access_log=False))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_with_a_useful_message(
    shared_client: TestClient, payload: Any, content_type: str, status: int, message: str
) -> None:
    import orjson

    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    response = shared_client.post("/predict", content=raw, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error"}
    assert message in answer["error"]
    assert "Traceback" not in answer["error"]
    assert "/tmp" not in answer["error"]
    # The server is still healthy and serving others.
    assert shared_client.post("/predict", json=GOOD).status_code == 200
    assert shared_client.get("/v2/health/ready").status_code == 200


def test_failures_are_counted_by_model_and_reason(shared_client: TestClient) -> None:
    shared_client.post("/predict", json=body(inputs=[[1, 2]]))
    shared_client.post("/predict", json=body(model="someone's typo"))
    text = shared_client.get("/metrics").text
    assert 'modelserve_request_failures_total{model="clf",reason="invalid_input"}' in text
    assert 'modelserve_request_failures_total{model="unknown",reason="model_not_found"}' in text
    assert "typo" not in text  # labels never carry user-supplied strings


def test_wrong_method_and_unknown_path_answer_json_errors(shared_client: TestClient) -> None:
    wrong_method = shared_client.get("/predict")
    assert wrong_method.status_code == 405
    assert set(wrong_method.json()) == {"error"}
    missing = shared_client.get("/no/such/path")
    assert missing.status_code == 404
    assert set(missing.json()) == {"error"}


def test_dataplane_refuses_non_finite_values_and_bad_dtypes(shared_client: TestClient) -> None:
    dataplane = shared_client.app.state.dataplane  # type: ignore[attr-defined]
    model = dataplane.get_model("clf")

    async def infer(features: Any) -> Any:
        return await dataplane.infer(model, {"features": features})

    nan = np.array([[1.0, np.nan, 2.0, 3.0]], dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"inputs\[0\]\[1\]: NaN or Inf"):
        asyncio.run(infer(nan))
    with pytest.raises(InvalidInput, match=r"inputs\[0\]\[0\]: 'a' is not a number"):
        asyncio.run(infer(np.array([["a", "b", "c", "d"]])))
    seq = dataplane.get_model("seq")
    with pytest.raises(InvalidInput, match=r"inputs\.mask\[0\]\[0\]: 0\.5 is not true/false \(or 0/1\)"):
        asyncio.run(
            dataplane.infer(
                seq, {"sequence": np.zeros((1, 2, 2), np.float32), "mask": np.array([[0.5, 1.0]])}
            )
        )


def test_sequence_and_mask_lengths_must_agree(shared_client: TestClient) -> None:
    body = {"model": "seq", "inputs": {"sequence": [[[1, 2], [3, 4]]], "mask": [[True, True, True]]}}
    response = shared_client.post("/predict", json=body)
    assert response.status_code == 400
    assert "axis 1 has length 3 but axis 1 of inputs.sequence has 2" in response.json()["error"]
