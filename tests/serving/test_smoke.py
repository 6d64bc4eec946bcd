"""The fixtures work: the app loads the fixture repository, a live uvicorn answers."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient


def test_client_serves_every_fixture_model(client: TestClient) -> None:
    models = client.get("/models").json()["models"]
    assert {(m["name"], m["version"], m["state"]) for m in models} == {
        ("clf", 1, "ready"),
        ("clf", 2, "ready"),
        ("reg", 1, "ready"),
        ("multi", 1, "ready"),
        ("img", 1, "ready"),
        ("seq", 1, "ready"),
    }
    assert client.get("/v2/health/ready").status_code == 200


def test_live_server_answers(live_server: str) -> None:
    response = httpx.post(f"{live_server}/predict", json={"model": "reg", "inputs": [[1, 2, 3]]})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 1
