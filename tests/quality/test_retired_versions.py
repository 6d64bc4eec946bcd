"""Feedback arrives after hot swaps: the ids of a version retired by a swap are still counted (its card is
read from the repository), its live scores stay available, and only a version with neither a served model
nor a card on disk is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.model_card import CARD_FILENAME, ModelCard
from app.quality.ids import PredictionIds
from app.settings import Settings
from tests.factories import copy_repository
from tests.quality.test_feedback import SECRET, metric_samples, predict, send
from tests.quality.test_live_scores import scores, until
from tests.serving.test_hot_swap import ADMIN, SHIPPED, digits_v2, publish, statuses

ROWS = np.random.default_rng(7).integers(0, 17, size=(24, 1, 8, 8)).astype(np.float64).tolist()


@pytest.mark.timeout(120)
def test_feedback_for_a_version_retired_by_a_hot_swap_is_counted(tmp_path: Path) -> None:
    root = copy_repository(SHIPPED, tmp_path / "models", ["digits"])
    settings = Settings(
        model_repository=root,
        state_dir=tmp_path / "state",
        access_log=False,
        feedback_secret=SecretStr(SECRET),
        admin_api_key="admin-s3cret",
    )
    card_v1 = ModelCard.read(root / "digits" / "1" / CARD_FILENAME)
    with TestClient(create_app(settings)) as client:
        v1 = predict(client, "digits", ROWS)
        publish(root, "digits", 2, digits_v2)
        assert client.post("/models/digits/reload", headers=ADMIN).status_code == 200
        models = statuses(client, "digits")
        assert (models[1]["state"], models[2]["state"]) == ("unloaded", "ready")
        assert (
            client.post("/predict", json={"model": "digits", "version": 1, "inputs": ROWS}).status_code == 404
        )
        until(
            lambda: not scores(client, "modelserve_card_test_score", "digits", 1),
            "the card test scores of v1 to go when v1 is released",
        )
        assert scores(client, "modelserve_card_test_score", "digits", 2) == card_v1.metrics.test

        # Half the labels agree with v1's predictions, half do not.
        wrong = {p["label"]: str((int(p["label"]) + 1) % 10) for p in v1}
        items = [
            {"id": p["id"], "label": p["label"] if i % 2 else wrong[p["label"]]} for i, p in enumerate(v1)
        ]
        answer = send(client, items)
        assert answer == {"counted": len(v1), "errors": []}

        quality = client.get("/models/digits/quality", params={"version": 1})
        assert quality.status_code == 200, quality.text
        report = quality.json()
        assert (report["version"], report["count"], report["n"]) == (1, len(v1), len(v1))
        assert report["accuracy"] == pytest.approx(0.5)
        assert report["training"] == card_v1.metrics.test
        assert report["drift"] is None  # no served rows: the version is not served
        assert client.get("/models/digits/quality").json()["count"] == 0  # v2: no feedback
        counted = [
            s for s in metric_samples(client, "modelserve_feedback_total") if s.labels["version"] == "1"
        ]
        assert sum(s.value for s in counted) == len(v1)
        live = until(lambda: scores(client, "modelserve_live_score", "digits", 1), "v1's live scores")
        assert live["accuracy"] == pytest.approx(0.5)
        assert scores(client, "modelserve_card_test_score", "digits", 1) == card_v1.metrics.test

        # Neither served nor on disk: refused, saying both.
        gone = PredictionIds(SECRET.encode()).issue("digits", 3, np.array([4]))[0]
        errors = send(client, [{"id": gone, "label": "4"}])["errors"]
        assert len(errors) == 1
        assert "model 'digits' has no version 3" in errors[0]["error"]
        assert "nor can its card be read: no model.json in digits/3" in errors[0]["error"]
        unknown = client.get("/models/digits/quality", params={"version": 3})
        assert unknown.status_code == 404
        assert unknown.json()["error"].startswith("model 'digits' has no version 3")
