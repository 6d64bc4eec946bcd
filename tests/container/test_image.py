"""The serving image, for real: built with podman, run read-only with no capabilities, spoken to over HTTP.

`make container-test` runs this (CI too, as root on a fresh machine; conftest.py installs podman and
builds the base image when they are missing). The first run builds everything (about 3-5 minutes on two
cores); later runs reuse podman's cache.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.container.container_harness import (
    REPO_ROOT,
    BuiltImage,
    Podman,
    RunningContainer,
    http_request,
    run_container,
)

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE_UID = 10001
DESIGN_METRICS = (
    "modelserve_request_duration_seconds",
    "modelserve_queue_duration_seconds",
    "modelserve_inference_duration_seconds",
    "modelserve_batch_rows",
    "modelserve_queue_rows",
    "modelserve_inflight_requests",
    "modelserve_request_failures",
    "modelserve_model_load_seconds",
    "modelserve_evaluation_score",
)


# ---------------------------------------------------------------------------------------------- models


def _shipped_cards() -> list[dict[str, Any]]:
    """The newest card of every model under models/ (what the image serves by default)."""
    cards = []
    for model_dir in sorted(p for p in (REPO_ROOT / "models").iterdir() if p.is_dir()):
        versions = sorted((int(v.name), v) for v in model_dir.iterdir() if v.name.isdigit())
        if versions and (versions[-1][1] / "model.json").exists():
            cards.append(json.loads((versions[-1][1] / "model.json").read_text()))
    return cards


CARDS = _shipped_cards()


def _card_ids(card: dict[str, Any]) -> str:
    return str(card["name"])


def _real_data(card: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The card's own dataset when it is a scikit-learn builtin (so /evaluate can be checked for quality)."""
    source = card["dataset"]["source"]
    if not source.startswith("builtin:"):
        return None
    datasets = pytest.importorskip("sklearn.datasets")
    loader = getattr(datasets, f"load_{source.split(':', 1)[1]}", None)
    if loader is None:
        return None
    x, y = loader(return_X_y=True)
    return np.asarray(x, dtype=np.float32), np.asarray(y)


def _inputs(card: dict[str, Any], rows: int, seed: int = 0) -> tuple[Any, np.ndarray | None]:
    """A valid `inputs` value for /predict and /evaluate, built from the card's input schema.

    Returns the inputs and, when the dataset is a builtin, the matching labels (indices or targets).
    """
    specs = card["inputs"]
    real = _real_data(card)
    if real is not None and len(specs) == 1:
        x, y = real
        shape = list(specs[0]["shape"][1:])
        return x[:rows].reshape(len(x[:rows]), *shape).tolist(), y[:rows]
    rng = np.random.default_rng(seed)
    steps = 12
    named: dict[str, Any] = {}
    for spec in specs:
        shape = [rows] + [steps if d == -1 else d for d in spec["shape"][1:]]
        if spec["dtype"] == "bool":
            named[spec["name"]] = np.ones(shape, dtype=bool).tolist()
        else:
            named[spec["name"]] = rng.normal(size=shape).astype(np.float32).tolist()
    if len(specs) == 1:
        return named[specs[0]["name"]], None
    return named, None


def _labels(card: dict[str, Any], rows: int, known: np.ndarray | None) -> list[Any]:
    if known is not None:
        return [int(v) for v in known] if card["task"] == "classification" else [float(v) for v in known]
    rng = np.random.default_rng(1)
    if card["task"] == "classification":
        return [card["labels"][i] for i in rng.integers(0, len(card["labels"]), size=rows)]
    return rng.normal(size=rows).tolist()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(podman: Podman, image: BuiltImage) -> Iterator[RunningContainer]:
    """The image as production runs it: read-only, no capabilities, default settings."""
    if not CARDS:
        pytest.fail("models/ holds no model: the image would serve nothing")
    with run_container(podman, image.ref) as container:
        yield container


def _json(status_body: tuple[int, dict[str, str], bytes]) -> tuple[int, Any]:
    status, _, body = status_body
    return status, json.loads(body) if body else None


# ---------------------------------------------------------------------------------------------- image


def test_image_facts(podman: Podman, image: BuiltImage, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads(podman.run("image", "inspect", "--format", "{{json .Config}}", image.ref).stdout)
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert "8000/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["MODELSERVE_HOST"] == "0.0.0.0"
    assert config["Entrypoint"] == ["modelserve"]
    assert config["Cmd"] == ["serve"]
    # --format docker keeps it (OCI images drop HEALTHCHECK silently).
    inspected = json.loads(podman.run("image", "inspect", image.ref).stdout)[0]
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck, "the image lost its HEALTHCHECK"
    assert "healthcheck.py" in " ".join(healthcheck["Test"])
    with capsys.disabled():
        print(
            f"\n[container] image {image.ref}: {image.size_bytes / 1e6:.0f} MB "
            f"(built in {image.build_seconds:.0f} s)"
        )


def test_image_has_no_torch_and_no_compiler(podman: Podman, image: BuiltImage) -> None:
    probe = (
        "import importlib.util as u, shutil, json; "
        "print(json.dumps({'torch': u.find_spec('torch') is not None, "
        "'trainer': u.find_spec('trainer') is not None, "
        "'onnxruntime': u.find_spec('onnxruntime') is not None, "
        "'compilers': [c for c in ('gcc', 'cc', 'g++', 'clang') if shutil.which(c)]}))"
    )
    proc = podman.run("run", "--rm", "--read-only", "--entrypoint", "python3", image.ref, "-c", probe)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"torch": False, "trainer": False, "onnxruntime": True, "compilers": []}


# ---------------------------------------------------------------------------------------------- serving


def test_health_and_non_root(server: RunningContainer, capsys: pytest.CaptureFixture[str]) -> None:
    assert http_request("GET", f"{server.base_url}/v2/health/live")[0] == 200
    assert http_request("GET", f"{server.base_url}/v2/health/ready")[0] == 200
    with capsys.disabled():
        print(f"\n[container] ready {server.ready_seconds:.1f} s after `podman run` ({len(CARDS)} models)")
    ids = server.exec("python3", "-c", "import os; print(os.getuid(), os.getgid())")
    assert ids.stdout.split() == [str(IMAGE_UID), str(IMAGE_UID)]
    # The server itself is PID 1 (exec-form entrypoint), so SIGTERM reaches it.
    cmdline = server.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")
    assert "modelserve" in cmdline
    assert "serve" in cmdline


def test_logs_are_json_lines(server: RunningContainer) -> None:
    """Every line the server writes is one JSON object (log shippers parse them; no stray C++ warnings)."""
    assert http_request("GET", f"{server.base_url}/v2/health/ready")[0] == 200
    lines = [line for line in server.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        if "unable to get systemd connection" in line:  # podman's own note about healthchecks, not the app
            continue
        record = json.loads(line)
        assert {"time", "level", "message"} <= record.keys(), line


def test_root_filesystem_is_read_only(server: RunningContainer) -> None:
    write = "import sys; open(sys.argv[1], 'w').write('x')"
    assert server.exec("python3", "-c", write, "/opt/modelserve/models/x").returncode != 0
    assert server.exec("python3", "-c", write, "/tmp/x").returncode == 0


def test_docker_healthcheck_passes(server: RunningContainer) -> None:
    proc = server.podman.run("healthcheck", "run", server.cid, check=False)
    if proc.returncode != 0 and "systemd" in proc.stderr:
        # Without systemd podman may refuse to run it; the command itself is what matters.
        proc = server.exec("python3", "/opt/modelserve/healthcheck.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_models_are_listed(server: RunningContainer) -> None:
    status, body = _json(http_request("GET", f"{server.base_url}/models"))
    assert status == 200
    text = json.dumps(body)
    for card in CARDS:
        assert card["name"] in text


@pytest.mark.parametrize("card", CARDS, ids=_card_ids)
def test_predict_through_the_published_port(server: RunningContainer, card: dict[str, Any]) -> None:
    rows = 5
    inputs, _ = _inputs(card, rows)
    status, body = _json(
        http_request("POST", f"{server.base_url}/predict", {"model": card["name"], "inputs": inputs})
    )
    assert status == 200, body
    assert body["model"] == card["name"]
    assert int(body["version"]) == card["version"]
    predictions = body["predictions"]
    assert len(predictions) == rows
    for prediction in predictions:
        if card["task"] == "classification":
            assert prediction["label"] in card["labels"]
            assert 0.0 <= prediction["score"] <= 1.0
        else:
            assert math.isfinite(prediction["value"])


@pytest.mark.parametrize("card", CARDS, ids=_card_ids)
def test_evaluate_through_the_published_port(server: RunningContainer, card: dict[str, Any]) -> None:
    rows = 400
    inputs, known = _inputs(card, rows)
    n = len(known) if known is not None else rows
    payload = {"model": card["name"], "inputs": inputs, "labels": _labels(card, n, known)}
    status, body = _json(http_request("POST", f"{server.base_url}/evaluate", payload, timeout=120))
    assert status == 200, body
    assert body["n"] == n
    if card["task"] == "classification":
        assert 0.0 <= body["accuracy"] <= 1.0
        assert set(body["f1"]) >= {"micro", "macro", "weighted"}
        if known is not None:
            # The model's own data (train + test rows): at least close to the card's test accuracy.
            assert body["accuracy"] >= card["metrics"]["test"]["accuracy"] - 0.1
    else:
        assert math.isfinite(body["rmse"])
        assert math.isfinite(body["r2"])


def test_v2_infer_through_the_published_port(server: RunningContainer) -> None:
    card = CARDS[0]
    inputs, _ = _inputs(card, 2)
    named = inputs if isinstance(inputs, dict) else {card["inputs"][0]["name"]: inputs}
    tensors = []
    for spec in card["inputs"]:
        array = np.asarray(named[spec["name"]])
        tensors.append(
            {
                "name": spec["name"],
                "shape": list(array.shape),
                "datatype": "BOOL" if spec["dtype"] == "bool" else "FP32",
                "data": array.ravel().tolist(),
            }
        )
    url = f"{server.base_url}/v2/models/{urllib.parse.quote(card['name'])}/infer"
    status, body = _json(http_request("POST", url, {"inputs": tensors}))
    assert status == 200, body
    assert {o["name"] for o in body["outputs"]} >= {o["name"] for o in card["outputs"]}


def test_metrics_through_the_published_port(server: RunningContainer) -> None:
    # Traffic first, so that the labelled series exist.
    card = CARDS[0]
    inputs, _ = _inputs(card, 3)
    payload = {"model": card["name"], "inputs": inputs}
    assert http_request("POST", f"{server.base_url}/predict", payload)[0] == 200
    status, headers, body = http_request("GET", f"{server.base_url}/metrics")
    assert status == 200
    assert headers.get("Content-Type", headers.get("content-type", "")).startswith("text/plain")
    text = body.decode()
    for name in DESIGN_METRICS:
        assert f"# TYPE {name}" in text, f"/metrics lacks {name}"
    assert f'model="{card["name"]}"' in text
    assert "modelserve_batch_rows_count" in text


# ---------------------------------------------------------------------------------------------- workers


def test_several_workers_merge_metrics_on_a_read_only_root(podman: Podman, image: BuiltImage) -> None:
    """`--workers 2` keeps prometheus_client's multiprocess files under the tmpfs /tmp and merges them."""
    card = CARDS[0]
    inputs, _ = _inputs(card, 2)
    with run_container(podman, image.ref, "-e", "MODELSERVE_WORKERS=2") as container:
        for _ in range(8):  # a new connection each time: both workers get some
            payload = {"model": card["name"], "inputs": inputs}
            assert http_request("POST", f"{container.base_url}/predict", payload)[0] == 200
        payload = {"model": "no-such-model", "inputs": inputs}
        assert http_request("POST", f"{container.base_url}/predict", payload)[0] == 404
        status, _, body = http_request("GET", f"{container.base_url}/metrics")
        assert status == 200
        text = body.decode()
        # (In multiprocess mode only metrics with a value appear: no /evaluate ran, so no scores.)
        for name in set(DESIGN_METRICS) - {"modelserve_evaluation_score"}:
            assert f"# TYPE {name}" in text, f"/metrics lacks {name} with 2 workers"
        count = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("modelserve_request_duration_seconds_count{")
            and "predict" in line.split("}")[0]
            and 'status="200"' in line
        )
        assert count == 8, "the merged metrics miss requests answered by the other worker"
        # Both workers write their value files (`<kind>_<pid>.db`) under the writable /tmp.
        listing = container.exec("find", "/tmp", "-name", "*.db")
        assert listing.returncode == 0, listing.stderr
        pids = {Path(name).stem.rsplit("_", 1)[-1] for name in listing.stdout.split()}
        assert len(pids) >= 2, listing.stdout


# ---------------------------------------------------------------------------------------------- SIGTERM


@contextlib.contextmanager
def _half_sent_request(base_url: str, path: str, payload: dict[str, Any]) -> Iterator[list[Any]]:
    """A request whose headers and half its body are on the wire; the rest is sent on exit."""
    parsed = urllib.parse.urlsplit(base_url)
    body = json.dumps(payload).encode()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    half = len(body) // 2
    conn.send(body[:half])
    result: list[Any] = []
    try:
        yield result
    finally:
        try:
            conn.send(body[half:])
            response = conn.getresponse()
            result.extend([response.status, response.read()])
        finally:
            conn.close()


def test_sigterm_drains_in_flight_requests_then_exits(
    podman: Podman, image: BuiltImage, capsys: pytest.CaptureFixture[str]
) -> None:
    card = CARDS[0]
    inputs, _ = _inputs(card, 50)
    with run_container(podman, image.ref) as container:
        with _half_sent_request(
            container.base_url, "/predict", {"model": card["name"], "inputs": inputs}
        ) as res:
            time.sleep(0.5)  # the server has the request's headers: it is in flight
            signalled_at = time.monotonic()
            podman.run("kill", "--signal", "TERM", container.cid)
            time.sleep(1.0)  # the server is shutting down while the body is still arriving
            # New connections are refused once the listener is closed.
            with pytest.raises(urllib.error.URLError):
                http_request("GET", f"{container.base_url}/v2/health/live", timeout=2)
        assert res[0] == 200, f"the in-flight request was not drained: {res}"
        assert len(json.loads(res[1])["predictions"]) == 50

        waited = podman.run("wait", container.cid, timeout=90)
        exit_code = int(waited.stdout.strip().splitlines()[-1])
        stopped_in = time.monotonic() - signalled_at
        logs = container.logs()
        # uvicorn exits by re-raising SIGTERM after a clean shutdown (143); as PID 1 the re-raised signal
        # is ignored and it exits 0. 137 would mean it had to be killed.
        assert exit_code in {0, 143}, f"exit {exit_code}; logs:\n{logs[-3000:]}"
        assert "Application shutdown complete" in logs, logs[-3000:]
        assert "Finished server process" in logs, logs[-3000:]
        assert stopped_in < 30
    with capsys.disabled():
        print(f"\n[container] SIGTERM mid-request: drained, exit {exit_code} after {stopped_in:.1f} s")


def test_image_size_is_reasonable(image: BuiltImage) -> None:
    # torch alone would add > 700 MB; the serving image stays well under that.
    assert image.size_bytes < 700e6, f"{image.size_bytes / 1e6:.0f} MB"
