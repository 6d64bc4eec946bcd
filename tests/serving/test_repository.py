"""The model repository: a model that cannot be served is reported with its reason and stops nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.model_card import CARD_FILENAME, ONNX_FILENAME, sha256_of
from app.settings import Settings
from tests.factories import tabular_classifier, tabular_regressor, write_model


def _reseal(folder: Path) -> None:
    """Make the card's sha256 match whatever model.onnx now holds."""
    card = json.loads((folder / CARD_FILENAME).read_text())
    card["onnx"]["sha256"] = sha256_of(folder / ONNX_FILENAME)
    (folder / CARD_FILENAME).write_text(json.dumps(card))


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    write_model(root, "good", 1, tabular_regressor())
    write_model(root, "mixed", 1, tabular_regressor())  # v2 is broken: v1 is served
    (root / "mixed" / "2").mkdir()
    shutil.copy(root / "mixed" / "1" / ONNX_FILENAME, root / "mixed" / "2" / ONNX_FILENAME)

    folder = write_model(root, "badsha", 1, tabular_regressor())
    (folder / ONNX_FILENAME).write_bytes((folder / ONNX_FILENAME).read_bytes() + b"\0")

    folder = write_model(root, "badcard", 1, tabular_regressor())
    (folder / CARD_FILENAME).write_text('{"name": "badcard"}')

    folder = write_model(root, "wrongname", 1, tabular_regressor())
    card = json.loads((folder / CARD_FILENAME).read_text())
    card["name"] = "other"
    (folder / CARD_FILENAME).write_text(json.dumps(card))

    built = tabular_classifier()
    folder = write_model(root, "external", 1, built)
    onnx.save_model(
        built.proto,
        folder / ONNX_FILENAME,
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    _reseal(folder)

    folder = write_model(root, "garbage", 1, tabular_regressor())
    (folder / ONNX_FILENAME).write_bytes(b"\xff\xfe not a protobuf")
    _reseal(folder)

    folder = write_model(root, "convention", 1, tabular_regressor())
    onnx.save_model(tabular_classifier().proto, folder / ONNX_FILENAME)  # graph and card disagree
    _reseal(folder)

    (root / "good" / "notes").mkdir()  # not a version: skipped
    (root / "good" / "0").mkdir()  # not a positive version: skipped
    (root / "README.txt").write_text("files beside models are ignored")
    return root


EXPECTED_REASONS = {
    ("mixed", 2): "no model.json",
    ("badsha", 1): "sha256 of model.onnx is",
    ("badcard", 1): "invalid model card",
    ("wrongname", 1): "the card describes other/1 but sits in wrongname/1",
    ("external", 1): "external data file",
    ("garbage", 1): "not an ONNX protobuf",
    ("convention", 1): "a regressor must output 'value'",
}


@pytest.fixture(scope="module")
def broken_client(broken_repository: Path) -> TestClient:
    with TestClient(create_app(Settings(model_repository=broken_repository, access_log=False))) as client:
        yield client  # type: ignore[misc]


def test_failed_versions_are_listed_with_their_reason(broken_client: TestClient) -> None:
    models = {(m["name"], m["version"]): m for m in broken_client.get("/models").json()["models"]}
    assert set(models) == {("good", 1), ("mixed", 1), *EXPECTED_REASONS}
    for key, reason in EXPECTED_REASONS.items():
        assert models[key]["state"] == "failed", key
        assert reason in models[key]["reason"], (key, models[key]["reason"])
    assert models[("good", 1)]["state"] == "ready"
    assert models[("mixed", 1)]["default"] is True


def test_failures_do_not_block_readiness_or_other_models(broken_client: TestClient) -> None:
    assert broken_client.get("/v2/health/ready").status_code == 200
    ok = broken_client.post("/predict", json={"model": "mixed", "inputs": [[1, 2, 3]]})
    assert ok.json()["version"] == 1
    refused = broken_client.post("/predict", json={"model": "badsha", "inputs": [[1, 2, 3]]})
    assert refused.status_code == 503
    assert "failed: sha256" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"


def test_unload_and_load_a_model(client: TestClient) -> None:
    dataplane = client.app.state.dataplane  # type: ignore[attr-defined]
    body = {"model": "reg", "inputs": [[1, 2, 3]]}
    client.portal.call(dataplane.unload, "reg")  # type: ignore[union-attr]
    assert client.post("/predict", json=body).status_code == 503
    assert {m["state"] for m in client.get("/models").json()["models"] if m["name"] == "reg"} == {"unloaded"}
    client.portal.call(dataplane.load, "reg")  # type: ignore[union-attr]
    assert client.post("/predict", json=body).status_code == 200


def test_a_missing_repository_serves_nothing_but_starts(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_repository=tmp_path / "absent", access_log=False))) as client:
        assert client.get("/models").json() == {"models": []}
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/predict", json={"model": "x", "inputs": [[1]]}).status_code == 404


def test_every_shipped_model_loads() -> None:
    """The committed `models/` repository: every version there loads, warms up and answers /predict."""
    repository = Path(__file__).resolve().parents[2] / "models"
    versions = sorted(p.parent.relative_to(repository) for p in repository.glob("*/*/model.onnx"))
    assert versions, f"no shipped models under {repository}"
    with TestClient(create_app(Settings(model_repository=repository, access_log=False))) as client:
        models = client.get("/models").json()["models"]
        assert sorted(Path(m["name"], str(m["version"])) for m in models) == versions
        for model in models:
            assert model["state"] == "ready", (model["name"], model["reason"])
            inputs = {spec["name"]: _sample(spec["dtype"], spec["shape"]) for spec in model["inputs"]}
            body = {"model": model["name"], "version": model["version"], "inputs": inputs}
            answer = client.post("/predict", json=body)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["predictions"]) == 2
        assert client.get("/v2/health/ready").status_code == 200


def _sample(dtype: str, shape: list[int]) -> Any:
    """Two rows of a valid input: variable axes get length 3, booleans are true, numbers zero."""
    concrete = [2, *(3 if d == -1 else d for d in shape[1:])]
    return np.ones(concrete, dtype=bool).tolist() if dtype == "bool" else np.zeros(concrete).tolist()
