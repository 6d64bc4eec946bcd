"""End to end on real `modelserve serve --workers 2` processes: predictions of the shipped `digits` model,
feedback for some of them (ids issued by the other worker, and by the server before a restart with the same
secret), then `/models/digits/quality` from any worker is the same answer, equals scikit-learn on those rows
and counts in its input drift every row both workers served (in both server lives: the window is kept in the
state directory), and the feedback counters scraped from `/metrics` (summed over label sets and over the two
server lives, as PromQL sums over replicas) hold the same confusion matrix."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from tests.factories import copy_model, free_socket

REPOSITORY = Path(__file__).resolve().parents[2] / "models"
SECRET = "two-workers-share-this-secret"
LABELS = [str(digit) for digit in range(10)]


@contextlib.contextmanager
def two_workers(repository: Path, state_dir: Path, metrics_dir: Path) -> Iterator[str]:
    """`modelserve serve --workers 2` with the feedback secret; yields its URL once both workers answer."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSERVE_", "PROMETHEUS_"))}
    metrics_dir.mkdir()
    env |= {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MODELSERVE_FEEDBACK_SECRET": SECRET}
    command = [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port)]
    command += [
        "--model-repository",
        str(repository),
        "--state-dir",
        str(state_dir),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        workers: set[str] = set()
        while len(workers) < 2:  # each worker's request ids start with its own random prefix
            assert time.monotonic() < deadline, "workers did not start"
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                response = httpx.get(f"{base}/v2/health/ready")
                if response.status_code == 200:
                    workers.add(worker_of(response))
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        if process.stdout:
            process.stdout.close()


def worker_of(response: httpx.Response) -> str:
    """Which worker answered: the random per-process prefix of the request id it made."""
    return response.headers["x-request-id"][:16]


def predict_each(base: str, rows: np.ndarray) -> list[tuple[dict[str, Any], str]]:
    """One request per row on a fresh connection (so both workers answer some): (prediction, worker)."""
    answers = []
    for row in rows:
        response = httpx.post(f"{base}/predict", json={"model": "digits", "inputs": [row.tolist()]})
        assert response.status_code == 200, response.text
        answers.append((response.json()["predictions"][0], worker_of(response)))
    return answers


def feedback_each(base: str, items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """One item per request on a fresh connection: (answer, worker)."""
    answers = []
    for item in items:
        response = httpx.post(f"{base}/feedback", json={"items": [item]})
        assert response.status_code == 200, response.text
        answers.append((response.json(), worker_of(response)))
    return answers


def quality_from_each_worker(base: str, drift_rows: int) -> list[tuple[dict[str, Any], str]]:
    """`/models/digits/quality` from fresh connections until both workers answered, once each worker's
    pending drift rows are written (a second at most after its last prediction): (report, worker)."""
    deadline = time.monotonic() + 30
    reports: dict[str, dict[str, Any]] = {}
    while len(reports) < 2 or any(r["drift"]["rows"] != drift_rows for r in reports.values()):
        assert time.monotonic() < deadline, reports
        response = httpx.get(f"{base}/models/digits/quality")
        assert response.status_code == 200, response.text
        reports[worker_of(response)] = response.json()
        time.sleep(0.05)
    answers = []
    for _ in range(6):  # fresh connections: both workers answer, from the same shared state
        response = httpx.get(f"{base}/models/digits/quality")
        assert response.status_code == 200, response.text
        answers.append((response.json(), worker_of(response)))
    return answers


def drift_window_rows_gauge(base: str) -> float:
    """`modelserve_drift_window_rows{model="digits"}` as the server exports it (one merged series)."""
    values = [
        sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
        for sample in family.samples
        if sample.name == "modelserve_drift_window_rows" and sample.labels["model"] == "digits"
    ]
    assert len(values) == 1, values
    return values[0]


def feedback_counters(base: str) -> Counter[tuple[int, int]]:
    """`sum by (true, predicted) (modelserve_feedback_total{model="digits"})` of one server."""
    counts: Counter[tuple[int, int]] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == "modelserve_feedback_total" and sample.labels["model"] == "digits":
                counts[(int(sample.labels["true"]), int(sample.labels["predicted"]))] += int(sample.value)
    return counts


@pytest.mark.timeout(240)
def score_gauges(base: str, name: str) -> dict[str, float]:
    """The values of a score gauge of digits version 1 (merged across the workers), by metric."""
    return {
        sample.labels["metric"]: sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
        for sample in family.samples
        if sample.name == name and sample.labels["model"] == "digits" and sample.labels["version"] == "1"
    }


def wait_for_live_accuracy(base: str, expected: float) -> None:
    """Wait until the live accuracy gauge shows `expected` (refreshed within a second of new feedback)."""
    deadline = time.monotonic() + 10
    while (live := score_gauges(base, "modelserve_live_score").get("accuracy")) != expected:
        assert time.monotonic() < deadline, f"live accuracy {live}, expected {expected}"
        time.sleep(0.1)


def test_two_workers_and_a_restart_score_feedback_like_scikit_learn(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    copy_model(REPOSITORY, "digits", repository)
    state = tmp_path / "state"
    digits = load_digits()
    images = digits.data.astype(np.float32).reshape(-1, 1, 8, 8)
    truth = digits.target
    rows = np.random.default_rng(0).choice(len(truth), size=60, replace=False)

    with two_workers(repository, state, tmp_path / "metrics-1") as base:
        first = predict_each(base, images[rows[:40]])
        assert len({worker for _, worker in first}) == 2, "both workers issued ids"
        # feedback now for the first 25; the other 15 ids are kept for after the restart
        items = [
            {"id": p["id"], "label": str(truth[row])}
            for (p, _), row in zip(first[:25], rows[:25], strict=True)
        ]
        answers = feedback_each(base, items)
        assert all(answer == {"counted": 1, "errors": []} for answer, _ in answers)
        issued_by = [worker for _, worker in first[:25]]
        counted_by = [worker for _, worker in answers]
        assert any(a != b for a, b in zip(issued_by, counted_by, strict=True)), "an id crossed workers"
        counters_before_restart = feedback_counters(base)

    with two_workers(repository, state, tmp_path / "metrics-2") as base:
        second = predict_each(base, images[rows[40:]])
        items = [
            {"id": p["id"], "label": int(truth[row])}  # class indices this time
            for (p, _), row in zip(first[25:] + second, rows[25:], strict=True)
        ]
        answer = httpx.post(f"{base}/feedback", json={"items": items}).json()
        assert answer == {"counted": 35, "errors": []}, "ids issued before the restart are still genuine"
        duplicates = httpx.post(
            f"{base}/feedback", json={"items": [*items[:3], {"id": first[0][0]["id"], "label": "1"}]}
        )
        assert duplicates.json()["counted"] == 0
        assert all("already counted" in error["error"] for error in duplicates.json()["errors"])
        reports = quality_from_each_worker(base, drift_rows=60)
        assert drift_window_rows_gauge(base) == 60
        counters_after_restart = feedback_counters(base)
        wait_for_live_accuracy(base, reports[0][0]["accuracy"])  # the gauge every worker agrees on
        card_accuracy = score_gauges(base, "modelserve_card_test_score")["accuracy"]

    assert len({worker for _, worker in reports}) == 2
    assert all(report == reports[0][0] for report, _ in reports)
    report = reports[0][0]
    predicted = np.array([p["index"] for p, _ in first + second])
    expected_truth = truth[rows]
    assert (report["count"], report["n"]) == (60, 60)
    assert report["accuracy"] == pytest.approx(accuracy_score(expected_truth, predicted), abs=1e-12)
    labels = list(range(10))
    for average in ("micro", "macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            expected_truth, predicted, labels=labels, average=average, zero_division=0
        )
        assert report["precision"][average] == pytest.approx(precision, abs=1e-12), average
        assert report["recall"][average] == pytest.approx(recall, abs=1e-12), average
        assert report["f1"][average] == pytest.approx(f1, abs=1e-12), average
    matrix = confusion_matrix(expected_truth, predicted, labels=labels)
    assert report["confusion_matrix"] == {"labels": LABELS, "matrix": matrix.tolist()}
    assert set(report["training"]) >= {"accuracy", "f1_macro"}
    assert card_accuracy == report["training"]["accuracy"]
    assert report["difference"]["accuracy"] == pytest.approx(
        report["accuracy"] - report["training"]["accuracy"]
    )
    drift = report["drift"]
    assert (drift["rows"], drift["sampled_share"]) == (60, 1.0)  # every row served, by both workers
    assert drift["predictions"]["shares"] == pytest.approx(
        {label: float(np.mean(predicted == int(label))) for label in LABELS}, abs=1e-6
    )

    # The counters of both server lives, summed as Prometheus sums the series of replicas.
    summed = counters_before_restart + counters_after_restart
    assert sum(counters_before_restart.values()) == 25
    exported = np.zeros((10, 10), dtype=int)
    for (true, guess), count in summed.items():
        exported[true, guess] = count
    assert exported.tolist() == matrix.tolist()
