"""`POST /feedback` and `GET /models/{name}/quality` in process, on the fixture models: every kind of bad
item is refused with its reason while the good ones count; regression scores equal scikit-learn's; the
window keeps the latest items; the Prometheus counters add up."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sklearn.metrics import max_error, mean_absolute_error, mean_squared_error, r2_score

from app.main import create_app
from app.quality.ids import PredictionIds
from app.settings import Settings
from tests.factories import CLASSIFIER_LABELS

SECRET = "feedback-test-secret"
MAX_AGE = 3600


@pytest.fixture
def feedback_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"feedback_secret": SecretStr(SECRET), "feedback_max_age_seconds": MAX_AGE}
    )


@pytest.fixture
def client(feedback_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(feedback_settings)) as test_client:
        yield test_client


def predict(client: TestClient, model: str, rows: Any, **extra: Any) -> list[dict[str, Any]]:
    response = client.post("/predict", json={"model": model, "inputs": rows, **extra})
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def send(client: TestClient, items: list[Any]) -> dict[str, Any]:
    response = client.post("/feedback", json={"items": items})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def metric_samples(client: TestClient, name: str) -> list[Any]:
    text = client.get("/metrics").text
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_each_bad_item_is_refused_with_its_reason_and_the_good_ones_count(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    predictions = predict(client, "clf", rng.normal(size=(6, 4)).tolist())
    good = [{"id": p["id"], "label": CLASSIFIER_LABELS[i % 3]} for i, p in enumerate(predictions[:4])]
    good[1]["label"] = 2  # a class index is a label too
    now = time.time()
    old = PredictionIds(SECRET.encode(), clock=lambda: now - MAX_AGE - 5).issue("clf", 1, np.array([0]))[0]
    strangers = PredictionIds(b"another server").issue("clf", 1, np.array([0]))[0]
    unknown_model = PredictionIds(SECRET.encode()).issue("nope", 1, np.array([0]))[0]
    unknown_version = PredictionIds(SECRET.encode()).issue("clf", 9, np.array([0]))[0]
    as_regressor = PredictionIds(SECRET.encode()).issue("clf", 1, np.array([0.5]))[0]
    tampered = (
        predictions[4]["id"][:20]
        + ("A" if predictions[4]["id"][20] != "A" else "B")
        + predictions[4]["id"][21:]
    )
    fresh = predictions[5]["id"]
    bad: list[tuple[Any, str]] = [
        ({"id": good[0]["id"], "label": "setosa"}, "already counted"),
        ({"id": old, "label": "setosa"}, "expired"),
        ({"id": strangers, "label": "setosa"}, "forged"),
        ({"id": tampered, "label": "setosa"}, "forged|malformed"),
        ({"id": "not-an-id", "label": "setosa"}, "malformed"),
        ({"id": 12345, "label": "setosa"}, "expected a prediction id"),
        ({"id": unknown_model, "label": "setosa"}, "nope"),
        ({"id": unknown_version, "label": "setosa"}, "version"),
        ({"id": as_regressor, "label": "setosa"}, "no longer a classification model"),
        ({"id": fresh, "label": "tulip"}, "not one of the model's classes"),
        ({"id": fresh, "label": 3}, "class index 3 is not among"),
        ({"id": fresh, "label": True}, "expected a class name"),
        ({"id": fresh, "label": 1.0}, "expected a class name"),
        ({"id": fresh}, "expected an object"),
        ({"id": fresh, "label": "setosa", "extra": 1}, "expected an object"),
        ("just text", "expected an object"),
        (None, "expected an object"),
    ]
    items = good[:2] + [item for item, _ in bad] + good[2:]
    answer = send(client, items)
    assert answer["counted"] == 4
    errors = {error["index"]: error["error"] for error in answer["errors"]}
    assert sorted(errors) == list(range(2, 2 + len(bad)))
    for offset, (_, reason) in enumerate(bad):
        assert re.search(reason, errors[2 + offset]), (offset, errors[2 + offset])

    again = send(client, [*good, {"id": fresh, "label": "virginica"}])  # a second request: duplicates
    assert again["counted"] == 1
    assert [error["index"] for error in again["errors"]] == [0, 1, 2, 3]
    assert all("already counted" in error["error"] for error in again["errors"])

    quality = client.get("/models/clf/quality", params={"version": 2}).json()
    assert (quality["version"], quality["count"], quality["n"]) == (2, 5, 5)
    true = [0, 2, 2, 0, 2]
    predicted = [p["index"] for p in predictions[:4]] + [predictions[5]["index"]]
    matrix = np.zeros((3, 3), dtype=int)
    np.add.at(matrix, (true, predicted), 1)
    assert quality["confusion_matrix"] == {"labels": list(CLASSIFIER_LABELS), "matrix": matrix.tolist()}
    counters = {
        (s.labels["true"], s.labels["predicted"]): s.value
        for s in metric_samples(client, "modelserve_feedback_total")
        if s.labels["model"] == "clf" and s.labels["version"] == "2"
    }
    assert counters == {
        (CLASSIFIER_LABELS[t], CLASSIFIER_LABELS[p]): float(matrix[t, p])
        for t, p in zip(*np.nonzero(matrix), strict=True)
    }


def test_envelope_errors_are_400_and_other_content_types_415(client: TestClient) -> None:
    for body in (b"", b"{", b"[]", b'{"items": []}', b'{"items": {}}', b'{"items": [1], "more": 2}'):
        response = client.post("/feedback", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        assert set(response.json()) == {"error"}
    response = client.post("/feedback", content=b"id,label", headers={"content-type": "text/csv"})
    assert response.status_code == 415


def test_ndjson_items_are_read_line_by_line(client: TestClient) -> None:
    predictions = predict(client, "clf", [[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, -1.0, 2.0]])
    lines = [
        b'{"id": "%s", "label": "setosa"}' % predictions[0]["id"].encode(),
        b"",
        b"{not json",
        b'{"id": "%s", "label": 1}' % predictions[1]["id"].encode(),
    ]
    response = client.post(
        "/feedback", content=b"\n".join(lines) + b"\n", headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["counted"] == 2
    assert [error["index"] for error in answer["errors"]] == [1]  # blank lines are not items
    assert "malformed JSON" in answer["errors"][0]["error"]


def test_regression_scores_equal_scikit_learn_and_the_sums_add_up(client: TestClient) -> None:
    rng = np.random.default_rng(1)
    predictions = predict(client, "reg", rng.normal(size=(40, 3)).tolist())
    response = client.post(
        "/v2/models/reg/infer",
        json={
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [10, 3],
                    "data": rng.normal(size=30).tolist(),
                }
            ]
        },
    )
    v2 = response.json()
    ids = [p["id"] for p in predictions] + v2["parameters"]["prediction_ids"]
    # the model's float32 outputs (V2 JSON prints the shortest text that reads back as the same float32)
    predicted = np.array([p["value"] for p in predictions] + v2["outputs"][0]["data"], np.float32).astype(
        float
    )
    truth = predicted + rng.normal(scale=0.5, size=predicted.shape[0])
    assert (
        send(client, [{"id": i, "label": float(t)} for i, t in zip(ids, truth, strict=True)])["counted"] == 50
    )
    quality = client.get("/models/reg/quality").json()
    assert quality["task"] == "regression"
    assert quality["n"] == quality["count"] == 50
    assert quality["mse"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-9)
    assert quality["rmse"] == pytest.approx(np.sqrt(mean_squared_error(truth, predicted)), rel=1e-9)
    assert quality["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-9)
    assert quality["r2"] == pytest.approx(r2_score(truth, predicted), rel=1e-9)
    assert quality["max_error"] == pytest.approx(max_error(truth, predicted), rel=1e-9)
    assert quality["drift"] is None
    sums = {
        s.labels["quantity"]: s.value for s in metric_samples(client, "modelserve_feedback_regression_sum")
    }
    error = predicted - truth
    expected = {
        "count": 50,
        "error_sum": error.sum(),
        "abs_error_sum": np.abs(error).sum(),
        "squared_error_sum": (error**2).sum(),
        "label_sum": truth.sum(),
        "label_squared_sum": (truth**2).sum(),
    }
    assert sums == pytest.approx(expected, rel=1e-9)
    # R² from the exported sums, as a PromQL expression would compute it
    total = sums["label_squared_sum"] - sums["label_sum"] ** 2 / sums["count"]
    assert 1 - sums["squared_error_sum"] / total == pytest.approx(r2_score(truth, predicted), rel=1e-9)


def test_the_window_keeps_the_latest_items(feedback_settings: Settings) -> None:
    app = create_app(feedback_settings.model_copy(update={"feedback_window": 4}))
    with TestClient(app) as client:
        predictions = predict(client, "clf", np.random.default_rng(2).normal(size=(7, 4)).tolist())
        for prediction in predictions:  # one request each: their order is the order of the window
            wrong = CLASSIFIER_LABELS[(prediction["index"] + 1) % 3]
            label = prediction["label"] if len(predictions) - predictions.index(prediction) <= 4 else wrong
            assert send(client, [{"id": prediction["id"], "label": label}])["counted"] == 1
        quality = client.get("/models/clf/quality").json()
    assert (quality["count"], quality["n"], quality["window"]) == (7, 4, 4)
    assert quality["accuracy"] == 1.0  # the 3 wrong ones left the window


def test_quality_without_feedback_has_no_scores_and_unknown_models_404(client: TestClient) -> None:
    quality = client.get("/models/clf/quality").json()
    assert (quality["model"], quality["version"], quality["count"], quality["n"]) == ("clf", 2, 0, 0)
    assert "accuracy" not in quality
    assert quality["difference"] == {}
    assert quality["drift"] is None
    assert client.get("/models/nope/quality").status_code == 404
    assert client.get("/models/clf/quality", params={"version": 7}).status_code == 404
    assert client.get("/models/clf/quality", params={"version": 0}).status_code == 400


def test_feedback_and_quality_need_the_api_key(feedback_settings: Settings) -> None:
    app = create_app(feedback_settings.model_copy(update={"api_key": SecretStr("k")}))
    with TestClient(app) as client:
        assert client.post("/feedback", json={"items": [{"id": "x", "label": 1}]}).status_code == 401
        assert client.get("/models/clf/quality").status_code == 401
        authorized = {"Authorization": "Bearer k"}
        assert client.get("/models/clf/quality", headers=authorized).status_code == 200
