"""The ASGI front (`app/http/front.py`): request ids, FastAPI's routing answers for the hot paths, the
request metrics of every instrumented endpoint, and client disconnects."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_made_request_ids_are_valid_and_unique(client: TestClient) -> None:
    ids = [client.get("/v2/health/live").headers["x-request-id"] for _ in range(5)]
    ids += [client.post("/predict", json={"model": "reg", "inputs": [[1, 2, 3]]}).headers["x-request-id"]]
    assert all(_ID.match(made) for made in ids)
    assert len(set(ids)) == len(ids)


def test_hot_paths_keep_fastapis_routing_answers(client: TestClient) -> None:
    for method, path in (("GET", "/predict"), ("PUT", "/predict"), ("GET", "/v2/models/clf/infer")):
        answer = client.request(method, path)
        assert answer.status_code == 405, (method, path)
        assert answer.headers["allow"] == "POST"
        assert answer.json() == {"error": "Method Not Allowed"}
        assert _ID.match(answer.headers["x-request-id"])
    redirect = client.post("/predict/", json={}, follow_redirects=False)
    assert redirect.status_code == 307
    assert redirect.headers["location"].endswith("/predict")


def test_every_instrumented_endpoint_records_duration_and_failures(client: TestClient) -> None:
    infer = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    wrong = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    assert client.post("/v2/models/clf/versions/1/infer", json=infer).status_code == 200
    assert client.post("/v2/models/clf/infer", json=wrong).status_code == 400
    assert client.post("/v2/models/nope/infer", json=infer).status_code == 404
    labelled = {"model": "clf", "inputs": [[1, 2, 3, 4]], "labels": ["setosa"]}
    assert client.post("/evaluate", json=labelled).status_code == 200
    text = client.get("/metrics").text
    duration = "modelserve_request_duration_seconds_count"
    v2 = 'endpoint="/v2/models/{model}/infer"'
    assert _sample(text, duration, f'{v2},model="clf",status="200"') == 1
    assert _sample(text, duration, f'{v2},model="clf",status="400"') == 1
    assert _sample(text, duration, f'{v2},model="unknown",status="404"') == 1
    assert _sample(text, duration, 'endpoint="/evaluate",model="clf",status="200"') == 1
    failures = "modelserve_request_failures_total"
    assert _sample(text, failures, 'model="clf",reason="invalid_input"') == 1
    assert _sample(text, failures, 'model="unknown",reason="model_not_found"') == 1
    for endpoint in ("/predict", "/v2/models/{model}/infer", "/evaluate"):
        assert _sample(text, "modelserve_inflight_requests", f'endpoint="{endpoint}"') == 0


def test_v2_statistics_count_the_requests_of_every_endpoint(client: TestClient) -> None:
    def success() -> int:
        stats = client.get("/v2/models/reg/stats").json()["model_stats"][0]
        count: int = stats["inference_stats"]["success"]["count"]
        return count

    before = success()
    assert client.post("/predict", json={"model": "reg", "inputs": [[1, 2, 3]]}).status_code == 200
    infer = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert client.post("/v2/models/reg/infer", json=infer).status_code == 200
    assert success() - before == 2


def test_a_client_gone_mid_body_gets_nothing_and_is_not_counted(settings: Settings) -> None:
    app = create_app(settings)

    async def scenario() -> None:
        async with LifespanManager(app):
            messages: list[dict[str, Any]] = [
                {"type": "http.request", "body": b'{"model": "reg", ', "more_body": True},
                {"type": "http.disconnect"},
            ]

            async def receive() -> dict[str, Any]:
                return messages.pop(0)

            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/predict",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json")],
            }
            await app(scope, receive, send)
            assert sent == []
            text = app.state.metrics.exposition().decode()
            assert 'modelserve_request_duration_seconds_count{endpoint="/predict"' not in text
            assert "modelserve_request_failures_total{" not in text

    asyncio.run(scenario())
