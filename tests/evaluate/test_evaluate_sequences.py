"""`/evaluate` of sequence models (`sequence` + `mask` inputs) with ragged rows, as `/predict` takes them.

The oracle is scikit-learn on the predictions `/predict` gives for the same rows: the shipped `waves` GRU
(labelled waves from the trainer's numpy generator) and the fixture `seq` model (two channels).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from sklearn import metrics as skm

from app.main import create_app
from app.settings import Settings
from tests.factories import copy_repository, npz_body
from trainer.config import WavesConfig
from trainer.data import generate_waves

SHIPPED = Path(__file__).resolve().parents[2] / "models"
WAVES = generate_waves(WavesConfig(n_samples=120), seed=123)
WAVE_LABELS = list(WAVES.labels or [])
assert WAVES.lengths is not None
WAVE_LENGTHS = WAVES.lengths
WAVE_ROWS: list[list[Any]] = [
    # one channel: a step is a number, or a list of one number (both forms /predict takes)
    WAVES.x[i, :n, 0].tolist() if i % 2 else WAVES.x[i, :n].tolist()
    for i, n in enumerate(WAVE_LENGTHS.tolist())
]
WAVE_NAMES = [WAVE_LABELS[i] for i in WAVES.y.tolist()]

RNG = np.random.default_rng(11)
SEQ_LABELS = ["calm", "stormy"]
SEQ_LENGTHS = RNG.integers(1, 9, 70)
SEQ_ROWS = [RNG.normal(size=(n, 2)).round(4).tolist() for n in SEQ_LENGTHS.tolist()]
SEQ_Y = RNG.integers(0, 2, 70)


@pytest.fixture(scope="module")
def repo(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture repository (with `seq`) plus the shipped `waves` model."""
    root = copy_repository(model_repository, tmp_path_factory.mktemp("seq-models") / "models")
    return copy_repository(SHIPPED, root, ["waves"])


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[TestClient]:
    """Batches of 16 rows: an evaluation spans many batches, padded to different lengths."""
    settings = Settings(
        model_repository=repo, max_batch_delay_seconds=0.001, max_batch_rows=16, access_log=False
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def predicted(
    client: TestClient, model: str, rows: list[Any], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """`/predict` on the ragged rows (in a few requests): label indices and every class probability."""
    indices, probabilities = [], []
    for start in range(0, len(rows), 25):
        response = client.post(
            "/predict", json={"model": model, "inputs": rows[start : start + 25], "top_k": n_classes}
        )
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            indices.append(prediction["index"])
            row = np.zeros(n_classes)
            for entry in prediction["top_k"]:
                row[entry["index"]] = entry["score"]
            probabilities.append(row)
    return np.array(indices), np.array(probabilities)


def assert_matches_sklearn(
    report: dict[str, Any], y: np.ndarray, pred: np.ndarray, proba: np.ndarray
) -> None:
    labels = list(range(proba.shape[1]))
    assert report["n"] == len(y)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, average=average, zero_division=0
        )
        assert report["precision"][average] == pytest.approx(p, abs=1e-12)
        assert report["recall"][average] == pytest.approx(r, abs=1e-12)
        assert report["f1"][average] == pytest.approx(f, abs=1e-12)
    _, _, f, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert [row["support"] for row in report["per_class"]] == support.tolist()
    assert [row["f1"] for row in report["per_class"]] == pytest.approx(f.tolist(), abs=1e-12)
    assert report["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    # probabilities travel through JSON as float32 values: the log loss agrees to float32 precision
    assert report["log_loss"] == pytest.approx(
        skm.log_loss(y, proba.astype(np.float32), labels=labels), rel=1e-5
    )


def padded(rows: list[list[Any]], channels: int) -> np.ndarray:
    out = np.full((len(rows), max(map(len, rows)) + 3, channels), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = np.asarray(row, dtype=np.float32).reshape(len(row), channels)
    return out


def test_waves_every_format_equals_sklearn_on_predict(client: TestClient) -> None:
    y = WAVES.y
    pred, proba = predicted(client, "waves", WAVE_ROWS, 4)
    assert skm.accuracy_score(y, pred) > 0.8  # the shipped model recognises the trainer's waves
    x = padded(WAVE_ROWS, 1)  # padding NaN: never looked at, it is zeroed like /predict's
    responses = {
        "json": client.post("/evaluate", json={"model": "waves", "inputs": WAVE_ROWS, "labels": WAVE_NAMES}),
        "json by input name": client.post(
            "/evaluate", json={"model": "waves", "inputs": {"sequence": WAVE_ROWS}, "labels": y.tolist()}
        ),
        "ndjson": client.post(
            "/evaluate?model=waves",
            content=b"\n".join(
                orjson.dumps({"input": row, "label": name})
                for row, name in zip(WAVE_ROWS, WAVE_NAMES, strict=True)
            ),
            headers={"content-type": "application/x-ndjson"},
        ),
        "npz lengths": client.post(
            "/evaluate?model=waves",
            content=npz_body(inputs=x, lengths=WAVE_LENGTHS, labels=y),
            headers={"content-type": "application/x-npz"},
        ),
        "npz mask, [N, steps]": client.post(
            "/evaluate?model=waves",
            content=npz_body(
                inputs=x[:, :, 0],
                mask=np.arange(x.shape[1]) < WAVE_LENGTHS[:, None],
                labels=np.array(WAVE_NAMES),
            ),
            headers={"content-type": "application/x-npz"},
        ),
    }
    for what, response in responses.items():
        assert response.status_code == 200, (what, response.text)
        assert_matches_sklearn(response.json(), y, pred, proba)


def test_fixture_sequence_model_two_channels(client: TestClient) -> None:
    pred, proba = predicted(client, "seq", SEQ_ROWS, 2)
    names = [SEQ_LABELS[i] for i in SEQ_Y]
    ndjson = b"\n".join(
        orjson.dumps({"input": {"sequence": row} if i % 3 else row, "label": name})
        for i, (row, name) in enumerate(zip(SEQ_ROWS, names, strict=True))
    )
    equal = np.ones((70, 8), dtype=bool)  # every step real: an NPZ of equal-length sequences needs no mask
    for response in (
        client.post("/evaluate", json={"model": "seq", "inputs": SEQ_ROWS, "labels": names, "top_k": 1}),
        client.post("/evaluate?model=seq", content=ndjson, headers={"content-type": "application/x-ndjson"}),
        client.post(
            "/evaluate?model=seq",
            content=npz_body(
                sequence=padded(SEQ_ROWS, 2), lengths=SEQ_LENGTHS.astype(np.float64), labels=SEQ_Y
            ),
            headers={"content-type": "application/x-npz"},
        ),
    ):
        assert response.status_code == 200, response.text
        assert_matches_sklearn(response.json(), SEQ_Y, pred, proba)
    full = np.asarray(RNG.normal(size=(70, 8, 2)), dtype=np.float32)
    alone = client.post(
        "/evaluate?model=seq",
        content=npz_body(inputs=full, labels=SEQ_Y),
        headers={"content-type": "application/x-npz"},
    )
    masked = client.post(
        "/evaluate?model=seq",
        content=npz_body(inputs=full, mask=equal.astype(np.int64), labels=SEQ_Y),
        headers={"content-type": "application/x-npz"},
    )
    pred, proba = predicted(client, "seq", full.tolist(), 2)
    for response in (alone, masked):
        assert response.status_code == 200, response.text
        assert_matches_sklearn(response.json(), SEQ_Y, pred, proba)


def npz(**arrays: Any) -> tuple[str, str, bytes]:
    return "application/x-npz", "?model=seq", npz_body(**arrays)


def json_body(inputs: Any, labels: Any) -> tuple[str, str, bytes]:
    return "application/json", "", orjson.dumps({"model": "seq", "inputs": inputs, "labels": labels})


X3 = np.zeros((3, 4, 2), dtype=np.float32)
BAD = [
    (("text/csv", "?model=seq", b"a,b,label\n1,2,calm\n"), "CSV cannot carry variable-length sequences.*NPZ"),
    (json_body([[[1, 2]], [[1, 2], [3]]], [0, 1]), "row 2: every step needs the same number of values"),
    (json_body([[[1, 2]], [[1, 2, 3]]], [0, 1]), r"row 2: expected steps of 2 value\(s\)"),
    (json_body([[[1, 2]], []], [0, 1]), "row 2: expected a non-empty list of steps"),
    (json_body([[[1, 2]], [["a", "b"]]], [0, 1]), "row 2: steps must be numbers"),
    (
        json_body([[[1, 2]], [[1e39, 0]]], [0, 1]),
        r"row 2: input 'sequence'\[0\]\[0\]: 1e\+39 is out of range for float32",
    ),
    (json_body({"sequence": [[[1, 2]]], "extra": [1]}, [0]), "unknown.*extra"),
    (
        (
            "application/x-ndjson",
            "?model=seq",
            b'{"input": [[1, 2]], "label": 0}\n{"input": {"sequence": [[1, 2]], "mask": [true]}, "label": 0}',
        ),
        "row 2: a sequence model takes each row as a list of steps",
    ),
    (
        npz(inputs=X3, lengths=np.array([1, 5, 2]), labels=[0, 1, 0]),
        r"row 2: length 5 is not between 1 and 4",
    ),
    (
        npz(inputs=X3, lengths=np.array([1, 0, 2]), labels=[0, 1, 0]),
        r"row 2: length 0 is not between 1 and 4",
    ),
    (
        npz(inputs=X3, lengths=np.array([1.5, 1, 2]), labels=[0, 1, 0]),
        r"row 1: length 1.5 is not a whole number",
    ),
    (
        npz(inputs=X3, lengths=np.array([1, 2]), labels=[0, 1, 0]),
        r"'lengths' has shape \[2\], expected \[3\]",
    ),
    (
        npz(inputs=X3, mask=np.ones((3, 4), bool), lengths=[1, 1, 1], labels=[0, 1, 0]),
        "both 'lengths' and 'mask'",
    ),
    (
        npz(inputs=X3, mask=np.arange(4) < np.array([[2], [4], [0]]), labels=[0, 1, 0]),
        "row 3: the mask marks no real step",
    ),
    (
        npz(inputs=X3, mask=np.full((3, 4), 2), labels=[0, 1, 0]),
        r"row 1: input 'mask'\[0\]: 2 is not true/false \(or 0/1\)",
    ),
    (
        npz(inputs=X3.astype(str), labels=[0, 1, 0]),
        r"row 1: input 'sequence'\[0\]\[0\]: '0.0' is not a number",
    ),
    (npz(inputs=np.zeros((3, 4, 3), np.float32), labels=[0, 1, 0]), r"shape \[3, 4, 3\].*\[N, steps, 2\]"),
    (npz(inputs=np.zeros((3, 4), np.float32), labels=[0, 1, 0]), r"shape \[3, 4\]"),
    (npz(features=X3, labels=[0, 1, 0]), "no 'inputs' array"),
    (npz(inputs=X3, labels=[0, 1]), r"different lengths \(3 vs 2\)"),
]


@pytest.mark.parametrize(("request_parts", "pattern"), BAD)
def test_bad_sequence_input_is_a_400_naming_the_row(
    client: TestClient, request_parts: tuple[str, str, bytes], pattern: str
) -> None:
    media, query, body = request_parts
    response = client.post(f"/evaluate{query}", content=body, headers={"content-type": media})
    assert response.status_code == 400, response.text
    assert re.search(pattern, response.json()["error"]), response.json()
