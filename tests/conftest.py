"""Fixtures shared by every test directory.

* `model_repository`: a read-only model repository of tiny real ONNX models (see `tests/factories.py`):
  `clf` (3-class classifier, versions 1 and 2), `reg` (regressor), `multi` (inputs `a` and `b`),
  `img` (image classifier [N, 1, 4, 4]), `seq` (sequence classifier with `sequence` + `mask`).
  Copy it (`tests.factories.copy_repository`) before changing anything in it.
* `settings`: `Settings` serving that repository (small batch delay, no API key, every version served so
  that a request may name either `clf` version).
* `app` / `client`: the app from the factory, and a `TestClient` with the lifespan run (models loaded).
* `live_server`: a real uvicorn on a free port serving the repository; yields the base URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.factories import build_repository, serve_in_thread


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the fixture models (read-only: shared by the whole session)."""
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture
def settings(model_repository: Path, tmp_path: Path) -> Settings:
    """Settings for the fixture repository; tests may `settings.model_copy(update=...)`."""
    return Settings(
        model_repository=model_repository,
        state_dir=tmp_path / "state",
        max_batch_delay_seconds=0.002,
        access_log=False,
        served_versions=0,
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """The app (models not loaded until the lifespan runs)."""
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient with the lifespan run: models are loaded and warm."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live_server(model_repository: Path) -> Iterator[str]:
    """A real uvicorn server on a free port (one per test module); yields `http://127.0.0.1:<port>`."""
    app = create_app(Settings(model_repository=model_repository, access_log=False))
    with serve_in_thread(app) as url:
        yield url
