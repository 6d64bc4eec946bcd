"""Hot swap: new versions load in the background and swap in under load, failed ones replace nothing, removed
ones retire, and the version policy (`served_versions`) picks what is served."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from app.dataplane import RETIRED_IDLE_SECONDS
from app.main import create_app
from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard
from app.settings import Settings
from tests.factories import (
    copy_repository,
    image_classifier,
    reference_outputs,
    reseal_card,
    serve_in_thread,
    tabular_classifier,
    write_model,
)

SHIPPED = Path(__file__).resolve().parents[2] / "models"
ADMIN = {"Authorization": "Bearer admin-s3cret"}
CLIENTS = 4
DIGITS = np.random.default_rng(0).integers(0, 17, size=(2, 1, 8, 8)).astype(np.float32)
WAIT_SECONDS = 30.0


def until(condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll `condition` until it returns something truthy (and return that); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def publish(root: Path, name: str, version: int, write: Callable[[Path], None]) -> None:
    """Write a version folder beside its final name, then rename it in: a poll never sees half of it."""
    staging = root / name / f".staging-{version}"  # not a version folder: scans skip it
    write(staging)
    os.rename(staging, root / name / str(version))


def digits_v2(folder: Path) -> None:
    """The shipped digits card as version 2, over another graph with the same inputs: answers differ."""
    shutil.copytree(SHIPPED / "digits" / "1", folder)
    onnx.save_model(image_classifier(channels=1, size=8, n_classes=10, seed=42).proto, folder / ONNX_FILENAME)
    card = ModelCard.read(folder / CARD_FILENAME)
    card.model_copy(update={"version": 2}).write(folder / CARD_FILENAME)
    reseal_card(folder)


def broken_v3(folder: Path) -> None:
    """Version 3: a valid card whose sha256 matches a graph file that is not ONNX."""
    shutil.copytree(SHIPPED / "digits" / "1", folder)
    (folder / ONNX_FILENAME).write_bytes(b"\x08\x07 not a protobuf")
    card = ModelCard.read(folder / CARD_FILENAME)
    card.model_copy(update={"version": 3}).write(folder / CARD_FILENAME)
    reseal_card(folder)


def statuses(http: httpx.Client | TestClient, name: str) -> dict[int, dict[str, Any]]:
    return {m["version"]: m for m in http.get("/models").json()["models"] if m["name"] == name}


@dataclass
class Answer:
    sent: float
    done: float
    status: int
    version: int | None
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class SteadyLoad:
    """Clients on keep-alive connections sending `/predict` for digits back to back, until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(url, answers), daemon=True)
            for answers in self.answers
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT_SECONDS)

    def _client(self, url: str, answers: list[Answer]) -> None:
        body = {"model": "digits", "inputs": DIGITS.tolist()}
        with httpx.Client(base_url=url, timeout=WAIT_SECONDS) as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                response = http.post("/predict", json=body)
                answer = Answer(sent, time.monotonic(), response.status_code, None)
                if response.status_code == 200:
                    document = response.json()
                    answer.version = document["version"]
                    answer.scores = [p["score"] for p in document["predictions"]]
                    answer.labels = [p["index"] for p in document["predictions"]]
                answers.append(answer)

    def each_answered_after(self, moment: float, count: int) -> bool:
        return all(sum(a.sent > moment for a in answers) >= count for answers in self.answers)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("trigger", ["poll", "reload"])
def test_digits_v1_to_v2_under_load_then_a_broken_v3(tmp_path: Path, trigger: str) -> None:
    root = copy_repository(SHIPPED, tmp_path / "models", ["digits"])
    settings = Settings(
        model_repository=root,
        access_log=False,
        repository_poll_seconds=0.1 if trigger == "poll" else 0.0,
        admin_api_key="admin-s3cret" if trigger == "reload" else None,
    )
    app = create_app(settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=WAIT_SECONDS) as http:
        v1 = app.state.dataplane.get_model("digits")
        v1_model, v1_session = weakref.ref(v1), weakref.ref(v1.session)
        del v1
        readiness: list[int] = []

        def observe(condition: Callable[[], Any]) -> Callable[[], Any]:
            def check() -> Any:
                readiness.append(http.get("/v2/health/ready").status_code)
                return condition()

            return check

        with SteadyLoad(url, CLIENTS) as load:
            until(observe(lambda: load.each_answered_after(0.0, 5)), "answers from every client")
            published = time.monotonic()
            publish(root, "digits", 2, digits_v2)
            if trigger == "reload":
                reloaded = http.post("/models/digits/reload", headers=ADMIN)
                assert reloaded.status_code == 200, reloaded.text
                answer = {m["version"]: m for m in reloaded.json()["models"]}
                assert (answer[2]["state"], answer[2]["default"]) == ("ready", True)
                assert answer[1]["state"] == "unloaded"
            until(observe(lambda: statuses(http, "digits").get(2, {}).get("state") == "ready"), "v2 in")
            swapped = time.monotonic()
            until(observe(lambda: load.each_answered_after(swapped, 5)), "answers from v2")

            publish(root, "digits", 3, broken_v3)
            if trigger == "reload":
                assert http.post("/models/digits/reload", headers=ADMIN).status_code == 200
            until(observe(lambda: statuses(http, "digits").get(3, {}).get("state") == "failed"), "v3 failed")
            broken = time.monotonic()
            until(observe(lambda: load.each_answered_after(broken, 5)), "answers after the broken v3")

            # v1 is released while the load goes on: its batcher idles, closes, and the session is freed.
            def v1_released() -> bool:
                gc.collect()
                return v1_model() is None and v1_session() is None

            until(observe(v1_released), "the v1 session to be collected", timeout=RETIRED_IDLE_SECONDS + 20)

        models = statuses(http, "digits")
        refused = http.post("/predict", json={"model": "digits", "version": 3, "inputs": DIGITS.tolist()})

    assert set(readiness) == {200}  # background loads never took the server out of readiness
    assert (models[2]["state"], models[2]["default"]) == ("ready", True)
    assert models[1]["state"] == "unloaded"
    assert "MODELSERVE_SERVED_VERSIONS=1" in models[1]["reason"]
    assert models[3]["state"] == "failed"
    assert "not an ONNX protobuf" in models[3]["reason"]
    assert refused.status_code == 503
    assert "failed: model.onnx is not an ONNX protobuf" in refused.json()["error"]

    expected = {version: reference_outputs(root, "digits", version, {"image": DIGITS}) for version in (1, 2)}
    assert not np.allclose(expected[1]["probabilities"], expected[2]["probabilities"])  # v1 ≠ v2
    for answers in load.answers:
        assert [a.status for a in answers] == [200] * len(answers)  # zero failed requests
        versions = [a.version for a in answers]
        assert versions == sorted(versions)  # v1, then v2 only, never back
        assert set(versions) == {1, 2}
        assert all(a.version == 1 for a in answers if a.done < published)
        assert all(a.version == 2 for a in answers if a.sent > swapped)
        for a in answers:  # each answer really came from the graph of the version it names
            outputs = expected[a.version or 0]
            assert a.labels == outputs["label_index"].tolist()
            np.testing.assert_allclose(a.scores, outputs["probabilities"].max(axis=1), rtol=1e-5)


# ------------------------------------------------------------------------------------------ version policy
def three_versions(root: Path, broken: int | None = None) -> Path:
    for version in (1, 2, 3):
        folder = write_model(root, "m", version, tabular_classifier(seed=version))
        if version == broken:
            (folder / ONNX_FILENAME).write_bytes(b"not onnx")  # the card's sha256 no longer matches
    return root


def predict_version(client: TestClient, version: int | None) -> httpx.Response:
    body: dict[str, Any] = {"model": "m", "inputs": [[1.0, 2.0, 3.0, 4.0]]}
    if version is not None:
        body["version"] = version
    return client.post("/predict", json=body)


@pytest.mark.parametrize(
    ("served_versions", "broken", "served"),
    [(1, None, [3]), (2, None, [2, 3]), (0, None, [1, 2, 3]), (1, 3, [2]), (2, 3, [1, 2])],
)
def test_the_newest_versions_that_load_are_served(
    tmp_path: Path, served_versions: int, broken: int | None, served: list[int]
) -> None:
    root = three_versions(tmp_path, broken)
    settings = Settings(model_repository=root, access_log=False, served_versions=served_versions)
    with TestClient(create_app(settings)) as client:
        models = statuses(client, "m")
        assert sorted(v for v, m in models.items() if m["state"] == "ready") == served
        assert [v for v, m in models.items() if m["default"]] == [max(served)]
        assert predict_version(client, None).json()["version"] == max(served)
        for version, model in models.items():
            answer = predict_version(client, version)
            if version in served:
                assert answer.status_code == 200
                assert answer.json()["version"] == version
            elif version == broken:
                assert model["state"] == "failed"
                assert answer.status_code == 503
            else:  # not served by the policy: as unknown as a version that does not exist
                assert model["state"] == "unloaded"
                assert f"MODELSERVE_SERVED_VERSIONS={served_versions}" in model["reason"]
                assert answer.status_code == 404
                assert f"version {version} is not served" in answer.json()["error"]
                assert f"versions served: {served}" in answer.json()["error"]


# ----------------------------------------------------------------------------------------- polling
@pytest.fixture
def polled(tmp_path: Path) -> Iterator[tuple[Path, TestClient]]:
    """A repository with model `m` versions 1 and 2, served with a 50 ms poll (the default policy: v2)."""
    root = tmp_path / "models"
    for version in (1, 2):
        write_model(root, "m", version, tabular_classifier(seed=version))
    settings = Settings(model_repository=root, access_log=False, repository_poll_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        yield root, client


def test_a_removed_folder_retires_its_version(polled: tuple[Path, TestClient]) -> None:
    root, client = polled
    assert predict_version(client, None).json()["version"] == 2
    shutil.rmtree(root / "m" / "2")
    until(lambda: statuses(client, "m")[1]["state"] == "ready", "v1 to be loaded in place of v2")
    assert predict_version(client, None).json()["version"] == 1
    until(lambda: 2 not in statuses(client, "m"), "v2 to drain and leave", RETIRED_IDLE_SECONDS + 10)
    assert predict_version(client, 2).status_code == 404

    shutil.rmtree(root / "m")
    until(lambda: not statuses(client, "m"), "the model to leave", RETIRED_IDLE_SECONDS + 10)
    assert predict_version(client, None).status_code == 404
    assert client.get("/v2/health/ready").status_code == 200


def test_the_poll_retries_a_failed_version_only_once_its_files_change(
    polled: tuple[Path, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, client = polled
    import app.dataplane

    loads: list[int] = []
    real_load_model = app.dataplane.load_model

    def counting_load_model(source: Any, *args: Any) -> Any:
        loads.append(source.version)
        return real_load_model(source, *args)

    monkeypatch.setattr(app.dataplane, "load_model", counting_load_model)

    staged = write_model(root.parent / "staging", "m", 3, tabular_classifier(seed=3))
    (staged / ONNX_FILENAME).write_bytes(b"not onnx")  # the card's sha256 no longer matches
    os.rename(staged, root / "m" / "3")
    until(lambda: statuses(client, "m").get(3, {}).get("state") == "failed", "v3 to fail")
    assert "sha256 of model.onnx" in statuses(client, "m")[3]["reason"]
    time.sleep(0.5)  # ten polls
    assert loads == [3]  # the same broken files are not loaded again
    assert predict_version(client, None).json()["version"] == 2

    write_model(root, "m", 3, tabular_classifier(seed=3))  # fixed in place
    until(lambda: statuses(client, "m")[3]["state"] == "ready", "the fixed v3 to load")
    assert len(loads) >= 2  # (a poll may also have caught the files half rewritten)
    assert predict_version(client, None).json()["version"] == 3
    assert statuses(client, "m")[2]["state"] == "unloaded"


def test_a_model_unloaded_on_request_stays_unloaded_until_loaded(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_model(root, "m", 1, tabular_classifier(seed=1))
    settings = Settings(
        model_repository=root, access_log=False, repository_poll_seconds=0.05, admin_api_key="admin-s3cret"
    )
    with TestClient(create_app(settings)) as client:
        assert client.post("/v2/repository/models/m/unload", headers=ADMIN).status_code == 200
        write_model(root, "m", 2, tabular_classifier(seed=2))
        time.sleep(0.3)  # several polls
        assert {m["state"] for m in statuses(client, "m").values()} == {"unloaded"}
        assert predict_version(client, None).status_code == 503
        assert client.post("/v2/repository/models/m/load", headers=ADMIN).status_code == 200
        assert predict_version(client, None).json()["version"] == 2


# ------------------------------------------------------------------------------------------ admin routes
def admin_client(tmp_path: Path, **settings: Any) -> TestClient:
    root = tmp_path / "models"
    if not root.exists():
        write_model(root, "m", 1, tabular_classifier(seed=1))
    return TestClient(create_app(Settings(model_repository=root, access_log=False, **settings)))


ADMIN_CALLS = (
    "/models/m/reload",
    "/v2/repository/index",
    "/v2/repository/models/m/unload",
    "/v2/repository/models/m/load",
)


def test_admin_routes_are_off_by_default(tmp_path: Path) -> None:
    with admin_client(tmp_path) as client:
        for path in ADMIN_CALLS:
            refused = client.post(path, headers=ADMIN)
            assert refused.status_code == 403, path
            assert "MODELSERVE_ADMIN_API_KEY" in refused.json()["error"]
        assert "model_repository" not in client.get("/v2").json()["extensions"]
        assert predict_version(client, None).status_code == 200  # nothing was unloaded


def test_the_admin_key_and_only_it_opens_the_admin_routes(tmp_path: Path) -> None:
    inference = {"Authorization": "Bearer inference-s3cret"}
    with admin_client(tmp_path, api_key="inference-s3cret", admin_api_key="admin-s3cret") as client:
        for path in ADMIN_CALLS:
            for headers in (
                {},
                inference,
                {"Authorization": "Bearer wrong"},
                {"Authorization": "admin-s3cret"},
            ):
                refused = client.post(path, headers=headers)
                assert refused.status_code == 401, (path, headers)
                assert refused.headers["www-authenticate"] == "Bearer"
                assert set(refused.json()) == {"error"}
            assert client.post(path, headers=ADMIN).status_code == 200, path
        assert "model_repository" in client.get("/v2", headers=inference).json()["extensions"]
        body = {"model": "m", "inputs": [[1.0, 2.0, 3.0, 4.0]]}
        assert client.post("/predict", json=body, headers=ADMIN).status_code == 401  # not an inference key
        assert client.post("/predict", json=body, headers=inference).status_code == 200


def test_the_admin_key_alone_leaves_inference_open(tmp_path: Path) -> None:
    with admin_client(tmp_path, admin_api_key="admin-s3cret") as client:
        assert predict_version(client, None).status_code == 200
        assert client.post("/models/m/reload").status_code == 401
        reloaded = client.post("/models/m/reload", headers=ADMIN)
        assert reloaded.status_code == 200
        assert [(m["name"], m["version"], m["state"]) for m in reloaded.json()["models"]] == [
            ("m", 1, "ready")
        ]
        missing = client.post("/models/ghost/reload", headers=ADMIN)
        assert missing.status_code == 404
        assert "no model 'ghost' in the repository" in missing.json()["error"]


def test_the_repository_switch_without_an_admin_key_keeps_the_api_key_guard(tmp_path: Path) -> None:
    with admin_client(tmp_path, api_key="inference-s3cret", enable_repository_api=True) as client:
        assert client.post("/models/m/reload").status_code == 401
        reloaded = client.post("/models/m/reload", headers={"Authorization": "Bearer inference-s3cret"})
        assert reloaded.status_code == 200


def test_openapi_documents_the_reload_route_and_its_key(tmp_path: Path) -> None:
    with admin_client(tmp_path) as client:
        schema = client.get("/openapi.json").json()
    reload = schema["paths"]["/models/{name}/reload"]["post"]
    assert reload["security"] == [{"adminKey": []}]
    assert {"200", "401", "403", "404"} <= set(reload["responses"])
    assert schema["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"
