"""Input drift: the card's training summary, the PSI of served rows against it, through the real server.

The oracle of the PSI is a plain loop over bins; the drift tests send rows over HTTP to a real onnxruntime
model whose card summarises a known training distribution, then shift some features.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_wine

from app.main import create_app
from app.model_card import CARD_FILENAME, ModelCard, TrainingSummary, row_statistics, summarize_training_split
from app.quality import drift
from app.quality.drift import MIN_ROWS, PSI_EPSILON, WINDOW_SEGMENTS, DriftMonitor
from app.quality.store import FILENAME, DriftStore
from app.settings import Settings
from tests.factories import (
    copy_repository,
    image_classifier,
    reference_outputs,
    sequence_classifier,
    tabular_classifier,
    write_model,
)

SHIPPED = Path(__file__).resolve().parents[2] / "models"
MEANS = np.array([0.0, 1.0, -1.0, 0.5])
SCALES = np.array([1.0, 2.0, 0.5, 3.0])
FEATURE_NAMES = ["f0", "f1", "f2", "f3"]


@pytest.fixture(autouse=True)
def every_row_binned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact row counts: no sampling, however fast the tests send rows (one test sets its own rate)."""
    monkeypatch.setattr(drift, "SAMPLED_ROWS_PER_SECOND", 10**12)


def training_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return (MEANS + SCALES * rng.standard_normal((n, 4))).astype(np.float32)


def with_summary(folder: Path, summary: TrainingSummary) -> None:
    """Give the card of a version folder a training summary (validated like any card)."""
    card = ModelCard.read(folder / CARD_FILENAME)
    ModelCard.model_validate(card.model_dump() | {"training_summary": summary.model_dump()}).write(
        folder / CARD_FILENAME
    )


@pytest.fixture(scope="module")
def drift_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`steady` and `shifted` (the same classifier and summary), `plain` (a card with no summary)."""
    root = tmp_path_factory.mktemp("drift-models")
    train = training_rows(np.random.default_rng(0), 5000)
    for name in ("steady", "shifted", "plain"):
        folder = write_model(root, name, 1, tabular_classifier(seed=0))
        if name == "plain":
            continue
        # The classes the model gives the training rows stand for their labels: in-distribution traffic
        # then predicts the classes in the training proportions.
        labels = reference_outputs(root, name, 1, {"features": train})["label_index"]
        card = ModelCard.read(folder / CARD_FILENAME)
        summary = summarize_training_split(
            "tabular", {"features": train}, feature_names=FEATURE_NAMES, labels=card.labels, targets=labels
        )
        with_summary(folder, summary)
    return root


@pytest.fixture(scope="module")
def drift_client(drift_repository: Path) -> Iterator[TestClient]:
    app = create_app(
        Settings(
            model_repository=drift_repository,
            access_log=False,
            drift_window_rows=5000,
            state_dir=drift_repository.parent / "drift-state",
        )
    )
    with TestClient(app) as client:
        yield client


def predict_in_requests(client: TestClient, model: str, rows: np.ndarray, rng: np.random.Generator) -> None:
    """Send `rows` to /predict in requests of 1 to 64 rows."""
    start = 0
    while start < len(rows):
        size = int(rng.integers(1, 65))
        response = client.post(
            "/predict", json={"model": model, "inputs": rows[start : start + size].tolist()}
        )
        assert response.status_code == 200, response.text
        start += size


@contextlib.asynccontextmanager
async def drift_store(state_dir: Path) -> AsyncIterator[DriftStore]:
    """The drift store of one worker process, closed at the end."""
    store = DriftStore(state_dir)
    try:
        yield store
    finally:
        await store.close()


def drift_of(client: TestClient, model: str) -> dict[str, Any]:
    """The `drift` of the model's live quality report."""
    response = client.get(f"/models/{model}/quality")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()["drift"]
    assert report is not None
    return report


# ------------------------------------------------------------------------------------------ the oracle
def reference_psi(edges: list[float], expected: list[float], values: np.ndarray) -> float:
    """PSI by a loop over bins: bin i holds edges[i-1] <= x < edges[i]; shares floored at PSI_EPSILON."""
    bounds = [-np.inf, *edges, np.inf]
    total = 0.0
    for i, training_share in enumerate(expected):
        served = np.mean((values >= bounds[i]) & (values < bounds[i + 1]))
        served, training_share = max(served, PSI_EPSILON), max(training_share, PSI_EPSILON)
        total += (served - training_share) * np.log(served / training_share)
    return total


def test_psi_matches_a_loop_over_bins(drift_repository: Path, tmp_path: Path) -> None:
    card = ModelCard.read(drift_repository / "steady" / "1" / CARD_FILENAME)
    summary = card.training_summary
    assert summary is not None
    assert summary.class_priors is not None
    rng = np.random.default_rng(1)
    served = training_rows(rng, 3000) * np.array([1.0, 1.5, 1.0, 1.0], dtype=np.float32) + np.float32(0.3)
    predicted = reference_outputs(drift_repository, "steady", 1, {"features": served})

    async def observe_and_report() -> drift.DriftReport:
        async with drift_store(tmp_path) as store:
            monitor = DriftMonitor(card, summary, window_rows=100_000, metrics=None, store=store)
            for start in range(0, len(served), 37):  # requests of 37 rows, in several flushes
                piece = slice(start, start + 37)
                monitor.observe({"features": served[piece]}, {k: v[piece] for k, v in predicted.items()})
            return await monitor.report()

    report = asyncio.run(observe_and_report())
    assert report.rows == len(served)
    for j, feature in enumerate(summary.features):
        want = reference_psi(feature.edges, feature.fractions, served[:, j].astype(np.float64))
        assert report.features[j].psi == pytest.approx(want, abs=1e-5)
    assert report.predictions is not None
    labels = card.labels or []
    priors = [summary.class_priors[label] for label in labels]
    class_edges = [i + 0.5 for i in range(len(labels) - 1)]  # integer class indices, one bin each
    want = reference_psi(class_edges, priors, predicted["label_index"].astype(np.float64))
    assert report.predictions.psi == pytest.approx(want, abs=1e-5)
    shares = np.bincount(predicted["label_index"], minlength=len(labels)) / len(served)
    assert report.predictions.shares == pytest.approx(dict(zip(labels, shares, strict=True)), abs=1e-6)


def test_row_statistics_of_images_and_sequences_match_plain_loops() -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 4, size=(5, 2, 3, 3)).astype(np.float32)
    image_summary = summarize_training_split("image", {"image": images})
    values = row_statistics(image_summary.features, "image", {"image": images})
    assert [f.name for f in image_summary.features] == ["mean", "std", "nonzero_fraction"]
    for row, image in enumerate(images):
        pixels = image.ravel().astype(np.float64)
        assert values[row] == pytest.approx([pixels.mean(), pixels.std(), np.mean(pixels != 0)])
    sequences = rng.normal(size=(4, 6, 2)).astype(np.float32)
    lengths = np.array([1, 6, 3, 4])
    mask = np.arange(6)[None, :] < lengths[:, None]
    sequences[~mask] = 0.0
    feeds = {"sequence": sequences, "mask": mask}
    sequence_summary = summarize_training_split("sequence", feeds)
    values = row_statistics(sequence_summary.features, "sequence", feeds)
    assert [f.name for f in sequence_summary.features] == ["length", "mean", "std"]
    for row, length in enumerate(lengths):
        real = sequences[row, :length].ravel().astype(np.float64)
        assert values[row] == pytest.approx([length, real.mean(), real.std()])


def test_summary_bins_of_constant_and_discrete_columns() -> None:
    rows = np.zeros((1000, 3), dtype=np.float32)
    rows[:, 1] = np.arange(1000) % 4 == 0  # 25 % ones
    rows[:, 2] = np.arange(1000)  # continuous: ten even bins
    summary = summarize_training_split("tabular", {"features": rows})
    constant, discrete, continuous = summary.features
    assert [f.name for f in summary.features] == ["feature_0", "feature_1", "feature_2"]
    assert (constant.edges, constant.fractions) == ([0.0], [0.0, 1.0])
    assert (discrete.edges, discrete.fractions) == ([0.0, 1.0], [0.0, 0.75, 0.25])
    assert len(continuous.edges) == 9
    assert continuous.fractions == pytest.approx([0.1] * 10)
    assert summary.class_priors is None


def test_a_card_rejects_a_summary_that_does_not_fit_it(drift_repository: Path) -> None:
    card = ModelCard.read(drift_repository / "steady" / "1" / CARD_FILENAME)
    assert card.training_summary is not None
    dumped = card.model_dump()
    wide = summarize_training_split("tabular", {"features": np.ones((10, 5), dtype=np.float32)})
    with pytest.raises(ValueError, match="column 4 of 4"):
        ModelCard.model_validate(dumped | {"training_summary": wide.model_dump()})
    images = summarize_training_split("image", {"image": np.ones((10, 1, 2, 2), dtype=np.float32)})
    with pytest.raises(ValueError, match="cannot track 'mean'"):
        ModelCard.model_validate(dumped | {"training_summary": images.model_dump()})
    renamed = [spec.model_dump() | {"name": "counts"} for spec in card.inputs]
    with pytest.raises(ValueError, match=r"needs the inputs \['features'\]"):
        ModelCard.model_validate(dumped | {"inputs": renamed})
    priors = card.training_summary.model_dump() | {"class_priors": {"a": 1.0}}
    with pytest.raises(ValueError, match="one share per label"):
        ModelCard.model_validate(dumped | {"training_summary": priors})


# ------------------------------------------------------------------------------ through the real server
def test_training_rows_give_psi_near_zero_and_shifted_features_cross_the_alarm(
    drift_client: TestClient,
) -> None:
    rng = np.random.default_rng(3)
    predict_in_requests(drift_client, "steady", training_rows(rng, 4000), rng)
    steady = drift_of(drift_client, "steady")
    assert steady["rows"] == 4000
    assert all(feature["psi"] < 0.05 for feature in steady["features"]), steady["features"]
    assert steady["predictions"]["psi"] < 0.05

    shifted_rows = training_rows(rng, 4000)
    shifted_rows[:, 0] += 1.0 * SCALES[0]  # offset by one training standard deviation
    shifted_rows[:, 1] = MEANS[1] + (shifted_rows[:, 1] - MEANS[1]) * 2.0  # spread twice as wide
    predict_in_requests(drift_client, "shifted", shifted_rows, rng)
    shifted = {feature["name"]: feature["psi"] for feature in drift_of(drift_client, "shifted")["features"]}
    assert min(shifted["f0"], shifted["f1"]) > 0.2, shifted
    assert max(shifted["f2"], shifted["f3"]) < 0.05, shifted


def test_v2_infer_counts_and_evaluate_does_not(drift_client: TestClient) -> None:
    rows = training_rows(np.random.default_rng(4), 50)
    before = drift_of(drift_client, "steady")["rows"]
    body = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [50, 4], "data": rows.ravel().tolist()}]
    }
    assert drift_client.post("/v2/models/steady/infer", json=body).status_code == 200
    assert drift_of(drift_client, "steady")["rows"] == before + 50
    evaluated = drift_client.post(
        "/evaluate", json={"model": "steady", "inputs": rows.tolist(), "labels": [0] * 50}
    )
    assert evaluated.status_code == 200, evaluated.text
    assert drift_of(drift_client, "steady")["rows"] == before + 50


def test_gauges_show_each_tracked_feature_and_class(drift_client: TestClient) -> None:
    rng = np.random.default_rng(5)
    predict_in_requests(drift_client, "steady", training_rows(rng, MIN_ROWS), rng)
    drift_of(drift_client, "steady")  # a report bins what is pending and sets the gauges
    text = drift_client.get("/metrics").text
    lines = [line for line in text.splitlines() if 'model="steady"' in line]
    psi = [line for line in lines if line.startswith("modelserve_drift_psi{")]
    assert sorted(line.split('feature="')[1].split('"')[0] for line in psi) == FEATURE_NAMES
    assert all(float(line.rsplit(" ", 1)[1]) < 0.2 for line in psi)
    assert any(line.startswith("modelserve_prediction_psi{") for line in lines)
    shares = [line for line in lines if line.startswith("modelserve_prediction_class_share{")]
    assert len(shares) == 3
    assert sum(float(line.rsplit(" ", 1)[1]) for line in shares) == pytest.approx(1.0)
    rows = next(line for line in lines if line.startswith("modelserve_drift_window_rows{"))
    assert float(rows.rsplit(" ", 1)[1]) >= MIN_ROWS
    assert not [line for line in text.splitlines() if "drift" in line and 'model="plain"' in line]


def test_a_card_without_a_summary_reports_no_drift(drift_client: TestClient) -> None:
    response = drift_client.post("/predict", json={"model": "plain", "inputs": [[0.0, 1.0, 2.0, 3.0]]})
    assert response.status_code == 200
    assert drift_client.get("/models/plain/quality").json()["drift"] is None


def test_a_window_of_zero_rows_turns_tracking_off(drift_repository: Path) -> None:
    app = create_app(Settings(model_repository=drift_repository, access_log=False, drift_window_rows=0))
    with TestClient(app) as client:
        assert client.post(
            "/predict", json={"model": "steady", "inputs": [[0.0, 5.0, -2.0, 10.0]]}
        ).is_success
        assert client.get("/models/steady/quality").json()["drift"] is None
        assert "modelserve_drift_psi{" not in client.get("/metrics").text


def test_the_window_keeps_about_the_latest_window_rows(drift_repository: Path, tmp_path: Path) -> None:
    card = ModelCard.read(drift_repository / "steady" / "1" / CARD_FILENAME)
    summary = card.training_summary
    assert summary is not None
    rng = np.random.default_rng(6)
    outputs = {"label_index": np.zeros(50, dtype=np.int64)}

    async def observe_and_report() -> drift.DriftReport:
        async with drift_store(tmp_path) as store:
            monitor = DriftMonitor(card, summary, window_rows=1000, metrics=None, store=store)
            for _ in range(40):  # 2000 in-distribution rows...
                monitor.observe({"features": training_rows(rng, 50)}, outputs)
            for _ in range(40):  # ...then 2000 shifted ones: the window forgets the first
                monitor.observe({"features": training_rows(rng, 50) + np.float32(3.0)}, outputs)
            return await monitor.report()

    report = asyncio.run(observe_and_report())
    segment = 1000 // WINDOW_SEGMENTS
    assert 1000 - segment <= report.rows <= 1000
    assert all(feature.psi is not None and feature.psi > 1.0 for feature in report.features)


def test_workers_share_one_window_that_outlives_a_restart(drift_repository: Path, tmp_path: Path) -> None:
    """Two monitors with their own stores on one state directory, as two worker processes of a server."""
    card = ModelCard.read(drift_repository / "steady" / "1" / CARD_FILENAME)
    summary = card.training_summary
    assert summary is not None
    rng = np.random.default_rng(10)
    steady = training_rows(rng, 500)
    shifted = training_rows(rng, 1200) + np.float32(10.0)
    outputs = {"label_index": np.zeros(500, dtype=np.int64)}

    def observe(monitor: DriftMonitor, rows: np.ndarray) -> None:
        for start in range(0, len(rows), 30):
            piece = rows[start : start + 30]
            monitor.observe({"features": piece}, {"label_index": outputs["label_index"][: len(piece)]})

    def segments_stored() -> int:
        with contextlib.closing(sqlite3.connect(tmp_path / FILENAME)) as connection:
            count: int = connection.execute("SELECT count(*) FROM drift_segments").fetchone()[0]
        return count

    async def scenario() -> None:
        async with drift_store(tmp_path) as first_store, drift_store(tmp_path) as second_store:
            first = DriftMonitor(card, summary, window_rows=1000, metrics=None, store=first_store)
            second = DriftMonitor(card, summary, window_rows=1000, metrics=None, store=second_store)
            observe(first, steady[:300])
            observe(second, steady[300:])
            await second.report()  # its pending rows written
            together = await first.report()
            assert together == await second.report()
            assert together.rows == 500
            for j, feature in enumerate(summary.features):
                want = reference_psi(feature.edges, feature.fractions, steady[:, j].astype(np.float64))
                assert together.features[j].psi == pytest.approx(want, abs=1e-5)

            observe(first, shifted[:600])  # the window now holds only shifted rows, from both workers
            observe(second, shifted[600:])
            await second.report()
            report = await first.report()
            assert report == await second.report()
            assert 1000 - 1000 // WINDOW_SEGMENTS <= report.rows <= 1000
            assert all(feature.psi is not None and feature.psi > 1.0 for feature in report.features), report
            # Whole segments of a tenth of the window, and each worker's open one: older ones are deleted.
            assert segments_stored() <= WINDOW_SEGMENTS + 2
        async with drift_store(tmp_path) as restarted_store:
            restarted = DriftMonitor(card, summary, window_rows=1000, metrics=None, store=restarted_store)
            assert await restarted.report() == report

    asyncio.run(scenario())


def test_images_and_sequences_are_tracked_through_the_server(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 4, size=(2000, 1, 4, 4)).astype(np.float32)
    lengths = rng.integers(2, 12, size=2000)
    mask = np.arange(12)[None, :] < lengths[:, None]
    sequences = np.where(mask[:, :, None], rng.normal(size=(2000, 12, 2)), 0.0).astype(np.float32)
    with_summary(
        write_model(tmp_path, "img", 1, image_classifier()),
        summarize_training_split("image", {"image": images}),
    )
    with_summary(
        write_model(tmp_path, "seq", 1, sequence_classifier()),
        summarize_training_split("sequence", {"sequence": sequences, "mask": mask}),
    )
    app = create_app(Settings(model_repository=tmp_path, access_log=False, state_dir=tmp_path / "state"))
    with TestClient(app) as client:
        for start in range(0, 600, 20):
            assert client.post(
                "/predict", json={"model": "img", "inputs": images[start : start + 20].tolist()}
            ).is_success
            # Ragged rows: each request is padded to its own longest sequence.
            ragged = [sequences[i, : lengths[i]].tolist() for i in range(start, start + 20)]
            assert client.post("/predict", json={"model": "seq", "inputs": ragged}).is_success
        for name in ("img", "seq"):
            report = drift_of(client, name)
            assert report["rows"] == 600
            assert all(feature["psi"] < 0.1 for feature in report["features"]), report
        brighter = (images[:300] * 2).tolist()
        assert client.post("/predict", json={"model": "img", "inputs": brighter}).is_success
        longer = np.tile(sequences[:300], (1, 2, 1)).tolist()  # 24 steps, all real: longer than any trained
        assert client.post("/predict", json={"model": "seq", "inputs": longer}).is_success
        image_psi = {f["name"]: f["psi"] for f in drift_of(client, "img")["features"]}
        sequence_psi = {f["name"]: f["psi"] for f in drift_of(client, "seq")["features"]}
        assert image_psi["mean"] > 0.2, image_psi
        assert sequence_psi["length"] > 0.2, sequence_psi


def test_the_shipped_wine_model_sees_its_own_data_as_steady_and_a_shift_as_drift(tmp_path: Path) -> None:
    """The shipped card carries the summary of its training split: the whole scikit-learn wine set stays
    below the moderate level; the same rows with alcohol raised by 1 % vol cross the alarm on alcohol only."""
    root = copy_repository(SHIPPED, tmp_path / "models", ["wine"])
    wine = load_wine()
    rng = np.random.default_rng(8)
    rows = wine.data[rng.integers(0, len(wine.data), 2000)].astype(np.float32)
    app = create_app(
        Settings(
            model_repository=root, access_log=False, drift_window_rows=2000, state_dir=tmp_path / "state"
        )
    )
    with TestClient(app) as client:
        predict_in_requests(client, "wine", rows, rng)
        steady = {f["name"]: f["psi"] for f in drift_of(client, "wine")["features"]}
        assert list(steady) == list(wine.feature_names)
        assert max(steady.values()) < 0.1, steady
        shifted = rows.copy()
        shifted[:, 0] += 1.0
        predict_in_requests(client, "wine", shifted, rng)  # the window now holds only these rows
        drifted = {f["name"]: f["psi"] for f in drift_of(client, "wine")["features"]}
        assert drifted.pop("alcohol") > 0.2
        assert max(drifted.values()) < 0.1, drifted


def test_heavy_traffic_is_sampled(
    drift_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = ModelCard.read(drift_repository / "steady" / "1" / CARD_FILENAME)
    summary = card.training_summary
    assert summary is not None
    clock = [1000.0]
    monkeypatch.setattr(drift.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(drift, "SAMPLED_ROWS_PER_SECOND", 500)
    rng = np.random.default_rng(9)
    outputs = {"label_index": np.zeros(50, dtype=np.int64)}

    async def observe_and_report() -> drift.DriftReport:
        async with drift_store(tmp_path) as store:
            monitor = DriftMonitor(card, summary, window_rows=100_000, metrics=None, store=store)
            for _ in range(10):  # ten seconds of 5000 rows each, in requests of 50
                for _ in range(100):
                    monitor.observe({"features": training_rows(rng, 50)}, outputs)
                clock[0] += 1.0
            return await monitor.report()

    report = asyncio.run(observe_and_report())
    assert report.sampled_share == pytest.approx(0.1)
    # The first second is binned whole (no rate known yet), then about 500 rows a second.
    assert 5000 + 9 * 500 * 0.7 < report.rows < 5000 + 9 * 500 * 1.3
    assert all(feature.psi is not None and feature.psi < 0.05 for feature in report.features)
