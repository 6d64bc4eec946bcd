"""`modelserve feedback FILE --url URL` against a real server, and the secret `modelserve serve` shares with
its workers when none is set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from pydantic import SecretStr

from app.cli import main
from app.main import create_app
from app.quality.ids import PredictionIds
from app.settings import Settings
from tests.factories import serve_in_thread


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    app = create_app(settings.model_copy(update={"api_key": SecretStr("key")}))
    with serve_in_thread(app) as url:
        yield url


def _ids(url: str, rows: int) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{url}/predict",
        json={"model": "clf", "inputs": [[0.1 * i, 0.2, -0.3, 1.0] for i in range(rows)]},
        headers={"Authorization": "Bearer key"},
    )
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def test_ndjson_backfill_in_batches_reports_errors_by_file_position(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = _ids(server, 7)
    lines = [orjson.dumps({"id": p["id"], "label": p["label"]}) for p in predictions]
    lines.insert(3, b"")  # blank lines are not items
    lines.insert(5, b'{"id": "forged-or-not", "label": "setosa"}')
    lines.append(lines[0])  # a duplicate
    path = tmp_path / "labels.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    status = main(["feedback", str(path), "--url", server, "--api-key", "key", "--batch-size", "3", "--json"])
    assert status == 1
    answer = orjson.loads(capsys.readouterr().out)
    assert answer["counted"] == 7
    assert [error["index"] for error in answer["errors"]] == [4, 8]
    assert "malformed" in answer["errors"][0]["error"]
    assert "already counted" in answer["errors"][1]["error"]


def test_json_file_all_counted_exits_0(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = _ids(server, 4)
    path = tmp_path / "labels.json"
    path.write_bytes(orjson.dumps({"items": [{"id": p["id"], "label": p["index"]} for p in predictions]}))
    assert main(["feedback", str(path), "--url", server, "--api-key", "key", "--batch-size", "2"]) == 0
    assert "counted 4 of 4 items; 0 not counted" in capsys.readouterr().out


def test_a_server_error_or_a_bad_file_exits_1(server: str, tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_bytes(b'{"items": [{"id": "x", "label": 1}]}')
    assert main(["feedback", str(path), "--url", server]) == 1  # no API key: 401
    path.write_bytes(b"{not json")
    assert main(["feedback", str(path), "--url", server, "--api-key", "key"]) == 1
    assert main(["feedback", str(tmp_path / "missing.ndjson"), "--url", server]) == 1


def test_serve_draws_one_secret_for_its_workers(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    import uvicorn

    seen: list[Settings] = []
    names = (
        "MODELSERVE_FEEDBACK_SECRET",
        "MODELSERVE_MODEL_REPOSITORY",
        "MODELSERVE_WORKERS",
        "PROMETHEUS_MULTIPROC_DIR",
    )
    for name in names:
        monkeypatch.setenv(name, "")  # `serve` sets these: restored after the test
        monkeypatch.delenv(name)
    # what a worker process builds from the environment it inherits
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.extend([Settings(), Settings()]))
    assert main(["serve", "--model-repository", str(model_repository), "--workers", "2"]) == 0
    secrets = {settings.feedback_secret.get_secret_value() for settings in seen if settings.feedback_secret}
    assert len(secrets) == 1
    (secret,) = secrets
    assert len(secret) >= 32
    token = PredictionIds(secret.encode()).issue("clf", 1, np.array([1]))[0]
    assert PredictionIds(os.environ["MODELSERVE_FEEDBACK_SECRET"].encode()).read(token).prediction == 1
