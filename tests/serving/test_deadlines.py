"""Client deadlines end to end: `X-Request-Timeout` on `/predict` and tritonclient's `timeout=` (V2
`parameters.timeout`, microseconds) against a real server whose model calls are held at a gate."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.main import create_app
from app.repository import LoadedModel
from app.settings import Settings
from tests.factories import serve_in_thread

WAIT = 10.0  # seconds: upper bound for anything that must happen "now"
MARK = 7777.0  # a feature value only the requests that must expire send


class Gate:
    """Holds every onnxruntime call of the server while closed; records the inputs that reached a session."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.seen: list[np.ndarray] = []

    def wrap(self, run: Any) -> Any:
        def gated(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.seen.append(np.array(inputs["features"]))
            self.entered.set()
            assert self.open.wait(WAIT), "test left a model call held"
            result: dict[str, np.ndarray] = run(model, inputs)
            return result

        return gated


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    monkeypatch.setattr(LoadedModel, "run", held.wrap(LoadedModel.run))
    yield held
    held.open.set()


@pytest.fixture
def server(settings: Settings, gate: Gate) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_requests_still_queued_at_their_deadline_get_504_and_never_run(server: str, gate: Gate) -> None:
    gate.entered.clear()
    gate.open.clear()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            httpx.post, f"{server}/predict", json={"model": "clf", "inputs": [[0.0] * 4]}, timeout=WAIT
        )
        assert gate.entered.wait(WAIT)

        hasty = httpx.post(
            f"{server}/predict",
            json={"model": "clf", "inputs": [[MARK] * 4]},
            headers={"X-Request-Timeout": "0.2"},
            timeout=WAIT,
        )
        assert hasty.status_code == 504
        assert "deadline of 0.2 s" in hasty.json()["error"]

        tensor = triton.InferInput("features", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.full((1, 4), MARK, np.float32))
        with (
            triton.InferenceServerClient(server.removeprefix("http://")) as client,
            pytest.raises(InferenceServerException) as caught,
        ):
            client.infer("clf", [tensor], timeout=200_000)  # microseconds, as Triton's protocol says
        assert caught.value.status() == "504"
        assert "deadline of 0.2 s" in caught.value.message()

        gate.open.set()
        assert held.result(WAIT).status_code == 200
    assert not any((batch == MARK).any() for batch in gate.seen)


def test_a_generous_deadline_runs(server: str) -> None:
    answer = httpx.post(
        f"{server}/predict",
        json={"model": "clf", "inputs": [[0.5] * 4]},
        headers={"X-Request-Timeout": "30"},
        timeout=WAIT,
    )
    assert answer.status_code == 200
    tensor = triton.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), 0.5, np.float32))
    with triton.InferenceServerClient(server.removeprefix("http://")) as client:
        result = client.infer("clf", [tensor], timeout=30_000_000)
    assert result.as_numpy("probabilities").shape == (1, 3)


def test_a_bad_request_timeout_header_is_400(server: str) -> None:
    v2_body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]}
    for value in ["soon", "0", "-1", "nan", "inf", ""]:
        for path, body in [
            ("/predict", {"model": "clf", "inputs": [[0.5] * 4]}),
            ("/v2/models/clf/infer", v2_body),
        ]:
            answer = httpx.post(
                f"{server}{path}", json=body, headers={"X-Request-Timeout": value}, timeout=WAIT
            )
            assert answer.status_code == 400, (path, value)
            assert answer.json()["error"] == (
                f"X-Request-Timeout: expected a positive number of seconds, got {value!r}"
            )


def test_a_bad_v2_timeout_parameter_is_400(server: str) -> None:
    for value in [-1, 1.5, "100", True]:
        body = {
            "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}],
            "parameters": {"timeout": value},
        }
        answer = httpx.post(f"{server}/v2/models/clf/infer", json=body, timeout=WAIT)
        assert answer.status_code == 400, value
        assert answer.json()["error"] == (
            f"'parameters.timeout' must be a non-negative integer of microseconds, got {value!r}"
        )
