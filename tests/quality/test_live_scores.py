"""The quality gauges (`modelserve_live_score` from the feedback window, `modelserve_card_test_score` from the
card) and the `prediction_ids` switch, in process on the fixture models."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings
from tests.factories import CLASSIFIER_LABELS
from tests.quality.test_feedback import SECRET, metric_samples, predict, send

WAIT_SECONDS = 10.0


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"feedback_secret": SecretStr(SECRET)}))) as test:
        yield test


def scores(client: TestClient, gauge: str, model: str, version: int) -> dict[str, float]:
    """The gauge's values for a model version, by metric."""
    return {
        sample.labels["metric"]: sample.value
        for sample in metric_samples(client, gauge)
        if sample.labels["model"] == model and sample.labels["version"] == str(version)
    }


def until(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_card_test_scores_are_set_when_a_version_loads(client: TestClient) -> None:
    for version in (1, 2):
        assert scores(client, "modelserve_card_test_score", "clf", version) == {"accuracy": 0.9}
    assert scores(client, "modelserve_card_test_score", "reg", 1) == {"r2": 0.5}
    assert scores(client, "modelserve_live_score", "clf", 2) == {}  # no feedback yet


def test_live_scores_follow_the_feedback_window(client: TestClient) -> None:
    rng = np.random.default_rng(3)
    predictions = predict(client, "clf", rng.normal(size=(30, 4)).tolist())  # version 2, the default
    right = [{"id": p["id"], "label": p["label"]} for p in predictions[:20]]
    assert send(client, right)["counted"] == 20
    live = until(lambda: scores(client, "modelserve_live_score", "clf", 2), "the first live scores")
    assert live["accuracy"] == 1.0
    assert live["f1_macro"] == client.get("/models/clf/quality").json()["f1"]["macro"]

    # Ten wrong labels right after: the refresh waits out its second, then reads every item counted.
    wrong = [
        {"id": p["id"], "label": next(c for c in CLASSIFIER_LABELS if c != p["label"])}
        for p in predictions[20:]
    ]
    assert send(client, wrong)["counted"] == 10
    report = client.get("/models/clf/quality").json()
    assert report["accuracy"] == pytest.approx(20 / 30)
    live = until(
        lambda: (s := scores(client, "modelserve_live_score", "clf", 2))["accuracy"] < 1.0 and s,
        "the live scores to take the wrong labels",
    )
    for metric in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        average = metric.partition("_")[2]
        expected = report[metric] if not average else report[metric.partition("_")[0]][average]
        assert live[metric] == pytest.approx(expected), metric
    assert scores(client, "modelserve_card_test_score", "clf", 2) == {"accuracy": 0.9}


def test_regressor_live_scores(client: TestClient) -> None:
    predictions = predict(client, "reg", np.random.default_rng(4).normal(size=(8, 3)).tolist())
    truth = [p["value"] + (1.0 if i % 2 else -1.0) for i, p in enumerate(predictions)]
    send(client, [{"id": p["id"], "label": t} for p, t in zip(predictions, truth, strict=True)])
    live = until(lambda: scores(client, "modelserve_live_score", "reg", 1), "the regressor's live scores")
    assert live["mse"] == pytest.approx(1.0)
    assert live["mae"] == pytest.approx(1.0)
    assert live["r2"] == pytest.approx(client.get("/models/reg/quality").json()["r2"])


def test_prediction_ids_off_answers_carry_no_ids(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"prediction_ids": False}))) as client:
        predictions = predict(client, "clf", [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
        assert [set(p) for p in predictions] == [{"label", "index", "score"}] * 2
        inputs = [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]
        answer = client.post("/v2/models/clf/infer", json={"inputs": inputs})
        assert answer.status_code == 200, answer.text
        assert "prediction_ids" not in (answer.json().get("parameters") or {})
