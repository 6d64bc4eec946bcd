"""`POST /evaluate` over HTTP: every format, sklearn on the model's own predictions as the oracle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from sklearn import metrics as skm

from app.main import create_app
from app.settings import Settings
from tests.factories import (
    CLASSIFIER_LABELS,
    copy_repository,
    csv_body,
    ndjson_body,
    npz_body,
    reference_outputs,
    tabular_classifier,
    write_model,
)

LABELS = list(CLASSIFIER_LABELS)
RNG = np.random.default_rng(7)
X = RNG.normal(size=(300, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 300)
Y_NAMES = [LABELS[i] for i in Y]


@pytest.fixture(scope="module")
def repo(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared fixture repository plus a two-class model `bin` (for ROC AUC)."""
    root = copy_repository(model_repository, tmp_path_factory.mktemp("eval-models") / "models")
    write_model(root, "bin", 1, tabular_classifier(labels=("neg", "pos"), seed=5))
    return root


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[TestClient]:
    """A client over every version of `repo` (tests name `clf` version 1) with a batch of 16 rows, so
    evaluations span many batches."""
    settings = Settings(
        model_repository=repo,
        max_batch_delay_seconds=0.001,
        max_batch_rows=16,
        access_log=False,
        served_versions=0,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def oracle(repo: Path, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The served (highest) version's outputs from a direct onnxruntime call."""
    return reference_outputs(repo, name, 2 if name == "clf" else 1, {"features": x})


def close(a: float, b: float, tol: float = 1e-12) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_json_classification_equals_sklearn(client: TestClient, repo: Path) -> None:
    response = client.post(
        "/evaluate", json={"model": "clf", "inputs": X.tolist(), "labels": Y_NAMES, "top_k": 2}
    )
    assert response.status_code == 200, response.text
    report = response.json()
    out = oracle(repo, "clf", X)
    pred = out["label_index"]
    assert report["n"] == 300
    assert report["model"] == "clf"
    assert report["version"] == 2
    assert close(report["accuracy"], skm.accuracy_score(Y, pred))
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            Y, pred, labels=[0, 1, 2], average=average, zero_division=0
        )
        assert close(report["precision"][average], p)
        assert close(report["recall"][average], r)
        assert close(report["f1"][average], f)
    p, r, f, s = skm.precision_recall_fscore_support(Y, pred, labels=[0, 1, 2], zero_division=0)
    assert [row["label"] for row in report["per_class"]] == LABELS
    assert [row["support"] for row in report["per_class"]] == s.tolist()
    assert all(close(row["f1"], f[i]) for i, row in enumerate(report["per_class"]))
    assert report["confusion_matrix"] == {
        "labels": LABELS,
        "matrix": skm.confusion_matrix(Y, pred, labels=[0, 1, 2]).tolist(),
    }
    assert report["top_k_accuracy"]["k"] == 2
    assert close(report["top_k_accuracy"]["value"], skm.top_k_accuracy_score(Y, out["probabilities"], k=2))
    assert close(report["log_loss"], skm.log_loss(Y, out["probabilities"], labels=[0, 1, 2]), 1e-6)
    assert "roc_auc" not in report
    # the card's test metrics beside the new ones
    assert report["training"] == {"accuracy": 0.9}
    assert close(report["difference"]["accuracy"], report["accuracy"] - 0.9)


def test_every_format_gives_the_same_report(client: TestClient) -> None:
    expected = client.post("/evaluate", json={"model": "clf", "inputs": X.tolist(), "labels": Y_NAMES}).json()
    streamed = [
        client.post(
            "/evaluate?model=clf",
            content=ndjson_body(X, Y_NAMES),
            headers={"content-type": "application/x-ndjson"},
        ),
        client.post(
            "/evaluate?model=clf", content=csv_body(X, Y_NAMES), headers={"content-type": "text/csv"}
        ),
        client.post(
            "/evaluate?model=clf&label_column=y",
            content=csv_body(X, Y.tolist(), "y"),
            headers={"content-type": "text/csv"},
        ),
        client.post(
            "/evaluate?model=clf",
            content=npz_body(inputs=X, labels=Y),
            headers={"content-type": "application/x-npz"},
        ),
        client.post(
            "/evaluate?model=clf&version=2",
            content=npz_body(inputs=X, labels=np.array(Y_NAMES)),
            headers={"content-type": "application/octet-stream"},
        ),
        client.post("/evaluate", json={"model": "clf", "inputs": X.tolist(), "labels": Y.tolist()}),
    ]
    for response in streamed:
        assert response.status_code == 200, response.text
        report = response.json()
        # counts are exact whatever the chunking; the log-loss sum may differ in its last bit
        assert close(report.pop("log_loss"), expected["log_loss"], 1e-14)
        assert report == {k: v for k, v in expected.items() if k != "log_loss"}


def test_version_and_zero_division(client: TestClient, repo: Path) -> None:
    # two rows only: most classes get no prediction, so zero_division decides their precision
    body = {
        "model": "clf",
        "version": 1,
        "inputs": X[:2].tolist(),
        "labels": Y_NAMES[:2],
        "zero_division": "nan",
    }
    report = client.post("/evaluate", json=body).json()
    assert report["version"] == 1
    pred = reference_outputs(repo, "clf", 1, {"features": X[:2]})["label_index"]
    p, _, f, _ = skm.precision_recall_fscore_support(
        Y[:2], pred, labels=[0, 1, 2], average="macro", zero_division=np.nan
    )
    assert close(report["precision"]["macro"], p)
    assert close(report["f1"]["macro"], f)
    for row in report["per_class"]:
        assert row["support"] > 0 or row["recall"] is None  # NaN travels as null


def test_regression_equals_sklearn(client: TestClient, repo: Path) -> None:
    x = X[:, :3]
    y = RNG.normal(size=300)
    pred = reference_outputs(repo, "reg", 1, {"features": x})["value"].astype(np.float64)
    for response in (
        client.post("/evaluate", json={"model": "reg", "inputs": x.tolist(), "labels": y.tolist()}),
        client.post(
            "/evaluate?model=reg&label_column=target",
            content=csv_body(x, [repr(float(v)) for v in y], "target"),
            headers={"content-type": "text/csv"},
        ),
    ):
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["task"] == "regression"
        assert close(report["mse"], skm.mean_squared_error(y, pred), 1e-9)
        assert close(report["rmse"], skm.root_mean_squared_error(y, pred), 1e-9)
        assert close(report["mae"], skm.mean_absolute_error(y, pred), 1e-9)
        assert close(report["r2"], skm.r2_score(y, pred), 1e-9)
        assert close(report["max_error"], skm.max_error(y, pred), 1e-9)
        assert report["training"] == {"r2": 0.5}
        assert close(report["difference"]["r2"], report["r2"] - 0.5)


def test_binary_roc_auc_with_pos_label(client: TestClient, repo: Path) -> None:
    y = (X[:, 0] + RNG.normal(size=300) > 0).astype(int)
    proba = oracle(repo, "bin", X)["probabilities"]
    default = client.post(
        "/evaluate", json={"model": "bin", "inputs": X.tolist(), "labels": y.tolist()}
    ).json()
    assert default["roc_auc"]["pos_label"] == "pos"
    assert close(default["roc_auc"]["value"], skm.roc_auc_score(y, proba[:, 1]))
    neg = client.post(
        "/evaluate?model=bin&pos_label=neg",
        content=npz_body(inputs=X, labels=y),
        headers={"content-type": "application/x-npz"},
    ).json()
    assert neg["roc_auc"]["pos_label"] == "neg"
    assert close(neg["roc_auc"]["value"], skm.roc_auc_score(1 - y, proba[:, 0]))


def test_multi_input_and_image_models(client: TestClient, repo: Path) -> None:
    a, b = RNG.normal(size=(20, 2)).astype(np.float32), RNG.normal(size=(20, 3)).astype(np.float32)
    y = RNG.normal(size=20)
    body = b"\n".join(
        orjson.dumps({"input": {"a": ra.tolist(), "b": rb.tolist()}, "label": float(t)})
        for ra, rb, t in zip(a, b, y, strict=True)
    )
    report = client.post(
        "/evaluate?model=multi", content=body, headers={"content-type": "application/x-ndjson"}
    ).json()
    pred = reference_outputs(repo, "multi", 1, {"a": a, "b": b})["value"].astype(np.float64)
    assert close(report["mse"], skm.mean_squared_error(y, pred), 1e-9)
    images = RNG.normal(size=(30, 16)).astype(np.float32)
    labels = RNG.integers(0, 3, 30)
    report = client.post(
        "/evaluate?model=img", content=csv_body(images, labels.tolist()), headers={"content-type": "text/csv"}
    ).json()
    pred = reference_outputs(repo, "img", 1, {"image": images.reshape(30, 1, 4, 4)})["label_index"]
    assert close(report["accuracy"], skm.accuracy_score(labels, pred))


BAD = [
    (
        "application/json",
        "",
        orjson.dumps({"model": "clf", "inputs": X[:3].tolist(), "labels": ["setosa", "rose", "setosa"]}),
        400,
        "row 2: label 'rose' is not among",
    ),
    (
        "application/json",
        "",
        orjson.dumps({"model": "clf", "inputs": X[:3].tolist(), "labels": ["setosa", 1, 0]}),
        400,
        "row 2: .*mixed label types",
    ),
    (
        "application/json",
        "",
        orjson.dumps({"model": "clf", "inputs": X[:3].tolist(), "labels": [0, 1]}),
        400,
        r"different lengths \(3 vs 2\): row 3 has no label",
    ),
    ("application/json", "", orjson.dumps({"model": "clf", "inputs": [], "labels": []}), 400, "empty"),
    (
        "application/json",
        "",
        orjson.dumps({"model": "nope", "inputs": [[1, 2, 3, 4]], "labels": [0]}),
        404,
        "nope",
    ),
    (
        "text/csv",
        "?model=clf",
        b"f0,f1,f2,f3,label\n1,2,3,4,setosa\n1,2,3,setosa\n",
        400,
        "row 2: 4 columns, but the header has 5",
    ),
    (
        "text/csv",
        "?model=clf",
        b"f0,f1,f2,f3,label\n1,2,3,4,setosa\n1,2,x,4,setosa\n",
        400,
        "row 2: column 'f2': 'x' is not a number",
    ),
    (
        "text/csv",
        "?model=clf&label_column=species",
        b"f0,f1,f2,f3,label\n1,2,3,4,setosa\n",
        400,
        "no label column 'species'",
    ),
    ("text/csv", "", b"f0,f1,f2,f3,label\n1,2,3,4,setosa\n", 400, r"POST /evaluate\?model="),
    (
        "text/csv",
        "?model=clf&colour=red",
        b"f0,f1,f2,f3,label\n1,2,3,4,setosa\n",
        400,
        "unknown query parameter",
    ),
    (
        "application/x-ndjson",
        "?model=clf",
        b'{"input": [1,2,3,4], "label": 0}\n{"input": [1,2,3,4], "label": 7}\n',
        400,
        "row 2: label 7 is not among",
    ),
    ("application/x-npz", "?model=clf", b"PK not really", 400, "not an NPZ archive"),
    ("text/plain", "?model=clf", b"hello", 415, "not supported"),
    (
        "application/json",
        "",
        orjson.dumps({"model": "reg", "inputs": [[1, 2, 3]], "labels": [1.0], "top_k": 2}),
        400,
        "apply to classifiers",
    ),
    (
        "application/json",
        "",
        orjson.dumps({"model": "clf", "inputs": [[1, 2, 3, 4]], "labels": [0], "pos_label": "setosa"}),
        400,
        "two-class models",
    ),
]


@pytest.mark.parametrize(("media", "query", "body", "status", "pattern"), BAD)
def test_bad_input_is_an_error_with_the_row(
    client: TestClient, media: str, query: str, body: bytes, status: int, pattern: str
) -> None:
    import re

    response = client.post(f"/evaluate{query}", content=body, headers={"content-type": media})
    assert response.status_code == status, response.text
    assert re.search(pattern, response.json()["error"]), response.json()


def test_big_chunked_csv_spans_many_chunks(client: TestClient, repo: Path) -> None:
    x = RNG.normal(size=(5000, 4)).astype(np.float32)
    y = RNG.integers(0, 3, 5000)
    response = client.post(
        "/evaluate?model=clf", content=iter([csv_body(x, y.tolist())]), headers={"content-type": "text/csv"}
    )
    assert response.status_code == 200, response.text
    pred = oracle(repo, "clf", x)["label_index"]
    assert (
        response.json()["confusion_matrix"]["matrix"]
        == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    )


def test_prometheus_gauge_is_set(client: TestClient) -> None:
    report = client.post("/evaluate", json={"model": "clf", "inputs": X.tolist(), "labels": Y_NAMES}).json()
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("modelserve_evaluation_score{")]
    accuracy = [line for line in lines if 'metric="accuracy"' in line and 'model="clf"' in line]
    assert accuracy, lines
    assert close(float(accuracy[0].rsplit(" ", 1)[1]), report["accuracy"])
    assert any('metric="f1_macro"' in line for line in lines)


def test_openapi_documents_evaluate(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/evaluate"]["post"]
    assert operation["operationId"] == "evaluate"
    assert "text/csv" in operation["requestBody"]["content"]


def test_api_key_is_required(repo: Path) -> None:
    settings = Settings(model_repository=repo, api_key="s3cret", access_log=False)
    body = {"model": "clf", "inputs": X[:5].tolist(), "labels": Y_NAMES[:5]}
    with TestClient(create_app(settings)) as keyed:
        assert keyed.post("/evaluate", json=body).status_code == 401
        answer = keyed.post("/evaluate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200, answer.text
