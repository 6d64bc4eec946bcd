"""`/predict` and the simple API through the app factory (TestClient runs the lifespan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings
from tests.factories import CLASSIFIER_LABELS, reference_outputs, without_ids

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [0.0, 0.0, 0.0, 0.0]]


def predict(client: TestClient, **body: Any) -> Any:
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_classifier_answers_class_names_scores_and_top_k(client: TestClient, model_repository: Path) -> None:
    answer = predict(client, model="clf", inputs=IRIS_ROWS, top_k=2)
    assert (answer["model"], answer["version"]) == ("clf", 2)  # the highest version by default
    expected = reference_outputs(model_repository, "clf", 2, {"features": np.array(IRIS_ROWS, np.float32)})
    for row, prediction in zip(expected["probabilities"], answer["predictions"], strict=True):
        best = int(np.argmax(row))
        assert prediction["index"] == best
        assert prediction["label"] == CLASSIFIER_LABELS[best]
        assert prediction["score"] == pytest.approx(float(row[best]), rel=1e-6)
        ranked = [entry["index"] for entry in prediction["top_k"]]
        assert ranked == list(np.argsort(-row, kind="stable")[:2])
        assert [entry["label"] for entry in prediction["top_k"]] == [CLASSIFIER_LABELS[i] for i in ranked]


def test_a_request_may_name_a_version(client: TestClient, model_repository: Path) -> None:
    answer = predict(client, model="clf", version=1, inputs=IRIS_ROWS[:1])
    expected = reference_outputs(
        model_repository, "clf", 1, {"features": np.array(IRIS_ROWS[:1], np.float32)}
    )
    assert answer["version"] == 1
    assert answer["predictions"][0]["index"] == int(expected["label_index"][0])
    assert "top_k" not in answer["predictions"][0]


def test_top_k_larger_than_the_class_count_returns_every_class(client: TestClient) -> None:
    answer = predict(client, model="clf", inputs=IRIS_ROWS[:1], top_k=10)
    assert len(answer["predictions"][0]["top_k"]) == len(CLASSIFIER_LABELS)


def test_regression_values(client: TestClient, model_repository: Path) -> None:
    rows = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]
    answer = predict(client, model="reg", inputs=rows)
    expected = reference_outputs(model_repository, "reg", 1, {"features": np.array(rows, np.float32)})[
        "value"
    ]
    assert [p["value"] for p in answer["predictions"]] == pytest.approx(expected.tolist(), rel=1e-6)


def test_multi_input_model_takes_an_object_of_inputs(client: TestClient, model_repository: Path) -> None:
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.5, 0.5], [1.0, -1.0, 2.0]]
    answer = predict(client, model="multi", inputs={"a": a, "b": b})
    expected = reference_outputs(
        model_repository, "multi", 1, {"a": np.array(a, np.float32), "b": np.array(b, np.float32)}
    )["value"]
    assert [p["value"] for p in answer["predictions"]] == pytest.approx(expected.tolist(), rel=1e-6)


def test_image_model_takes_flattened_or_shaped_pixels(client: TestClient, model_repository: Path) -> None:
    pixels = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
    flat = predict(client, model="img", inputs=pixels.tolist())
    shaped = predict(client, model="img", inputs=pixels.reshape(2, 1, 4, 4).tolist())
    assert without_ids(flat["predictions"]) == without_ids(shaped["predictions"])
    expected = reference_outputs(model_repository, "img", 1, {"image": pixels.reshape(2, 1, 4, 4)})
    assert [p["index"] for p in flat["predictions"]] == expected["label_index"].tolist()


def test_sequence_model_pads_ragged_sequences_and_builds_the_mask(
    client: TestClient, model_repository: Path
) -> None:
    sequences = [[[0.1, 0.2], [0.3, 0.4], [0.5, -0.6]], [[1.0, -1.0]], [[0.0, 2.0], [2.0, 0.0]]]
    answer = predict(client, model="seq", inputs=sequences)
    for sequence, prediction in zip(sequences, answer["predictions"], strict=True):
        alone = {"sequence": np.array([sequence], np.float32), "mask": np.ones((1, len(sequence)), bool)}
        expected = reference_outputs(model_repository, "seq", 1, alone)["probabilities"][0]
        assert prediction["index"] == int(np.argmax(expected))
        assert prediction["score"] == pytest.approx(float(expected.max()), rel=1e-6)
    explicit = predict(
        client,
        model="seq",
        inputs={"sequence": [[[1.0, -1.0], [9.0, 9.0]]], "mask": [[True, False]]},
    )
    assert without_ids(explicit["predictions"]) == without_ids(answer["predictions"][1:2])


def test_models_lists_versions_state_providers_and_schema(client: TestClient) -> None:
    models = {(m["name"], m["version"]): m for m in client.get("/models").json()["models"]}
    clf2 = models[("clf", 2)]
    assert clf2["state"] == "ready"
    assert clf2["default"] is True
    assert models[("clf", 1)]["default"] is False
    # Automatic providers: whatever this onnxruntime build offers, CPU always last as the fallback.
    assert clf2["providers"][-1] == "CPUExecutionProvider"
    assert set(clf2["providers"]) <= set(ort.get_available_providers())
    assert clf2["inputs"] == [{"name": "features", "dtype": "float32", "shape": [-1, 4], "description": ""}]
    assert clf2["labels"] == list(CLASSIFIER_LABELS)
    assert models[("seq", 1)]["inputs"][1]["dtype"] == "bool"


def test_health_and_metrics_endpoints(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    predict(client, model="reg", inputs=[[1, 2, 3]])
    text = client.get("/metrics").text
    for name in (
        "modelserve_request_duration_seconds",
        "modelserve_queue_duration_seconds",
        "modelserve_inference_duration_seconds",
        "modelserve_batch_rows",
        "modelserve_queue_rows",
        "modelserve_inflight_requests",
        "modelserve_request_failures_total",
        "modelserve_model_load_seconds",
        "modelserve_evaluation_score",
    ):
        assert f"# TYPE {name} " in text, name
    assert (
        'modelserve_request_duration_seconds_count{endpoint="/predict",model="reg",status="200"} 1.0' in text
    )
    assert 'modelserve_batch_rows_count{model="reg"} 1.0' in text


def test_not_ready_until_the_lifespan_has_loaded_the_models(settings: Settings) -> None:
    app = create_app(settings)
    assert not app.state.dataplane.ready()
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
    assert not app.state.dataplane.ready()  # shut down


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    given = client.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.post("/predict", json={"model": "nope", "inputs": [[1]]})
    assert len(made.headers["x-request-id"]) == 32
    hostile = client.get("/v2/health/live", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["x-request-id"] != "a b\tc" * 50


def test_api_key_guards_everything_but_health_and_metrics(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}))
    body = {"model": "reg", "inputs": [[1, 2, 3]]}
    with TestClient(app) as client:
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert client.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = client.post("/predict", json=body, headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert set(refused.json()) == {"error"}
        assert client.get("/models").status_code == 401
        ok = client.post("/predict", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_openapi_documents_the_raw_predict_route_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/predict"]["post"]
    request_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema == {"$ref": "#/components/schemas/PredictRequest"}
    assert schema["components"]["schemas"]["PredictRequest"]["examples"]
    assert schema["components"]["schemas"]["PredictResponse"]["examples"]
    assert {"200", "400", "404", "413", "415", "503", "504"} <= set(operation["responses"])
    assert "/models" in schema["paths"]
    assert "/v2/health/ready" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_batching_off_serves_the_same_answers(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"batching": False}))
    with TestClient(app) as client, TestClient(create_app(settings)) as batched:
        body = {"model": "clf", "inputs": IRIS_ROWS, "top_k": 3}
        alone, together = predict(client, **body), predict(batched, **body)
        assert without_ids(alone.pop("predictions")) == without_ids(together.pop("predictions"))
        assert alone == together
