"""`modelserve evaluate`: remote (streamed to a live server) and local scoring give the same report."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from app.cli import main
from tests.factories import CLASSIFIER_LABELS, reference_outputs

RNG = np.random.default_rng(11)
X = RNG.normal(size=(400, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 400)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    csv = tmp_path / "set.csv"
    lines = ["a,b,c,d,species"] + [
        ",".join([*(repr(float(v)) for v in row), CLASSIFIER_LABELS[y]]) for row, y in zip(X, Y, strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n")
    npz = tmp_path / "set.npz"
    np.savez(npz, inputs=X, labels=Y)
    ndjson = tmp_path / "set.ndjson"
    ndjson.write_text(
        "\n".join(json.dumps({"input": row.tolist(), "label": int(y)}) for row, y in zip(X, Y, strict=True))
    )
    doc = tmp_path / "set.json"
    doc.write_text(json.dumps({"inputs": X.tolist(), "labels": Y.tolist()}))
    return {"csv": csv, "npz": npz, "ndjson": ndjson, "json": doc}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["evaluate", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_remote_and_local_agree_with_sklearn(
    live_server: str, model_repository: Path, data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pred = reference_outputs(model_repository, "clf", 2, {"features": X})["label_index"]
    reports = []
    for fmt, path in data.items():
        extra = ["--label-column", "species"] if fmt == "csv" else []
        reports.append(run_json(capsys, str(path), "--model", "clf", "--url", live_server, *extra))
        reports.append(
            run_json(capsys, str(path), "--model", "clf", "--model-repository", str(model_repository), *extra)
        )
    first = dict(reports[0])
    first_log_loss = first.pop("log_loss")
    for report in reports:
        # counts are exact whatever the chunking; the log-loss sum may differ in its last bit
        assert abs(report.pop("log_loss") - first_log_loss) <= 1e-14
        assert report == first
    assert (
        reports[0]["confusion_matrix"]["matrix"] == skm.confusion_matrix(Y, pred, labels=[0, 1, 2]).tolist()
    )
    assert abs(reports[0]["f1"]["macro"] - skm.f1_score(Y, pred, average="macro")) < 1e-12


def test_tables_and_plot(
    model_repository: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "cm.png"
    code = main(
        [
            "evaluate",
            str(data["npz"]),
            "--model",
            "clf",
            "--model-repository",
            str(model_repository),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    assert "confusion matrix" in out
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_is_a_clear_error(
    model_repository: Path,
    data: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(
        [
            "evaluate",
            str(data["npz"]),
            "--model",
            "clf",
            "--model-repository",
            str(model_repository),
            "--plot",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 1
    assert "pip install 'modelserve[plot]'" in capsys.readouterr().err


def test_errors_are_messages(
    live_server: str, model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,d,label\n1,2,3,4,setosa\n1,2,3,setosa\n")
    assert main(["evaluate", str(bad), "--model", "clf", "--url", live_server]) == 1
    assert "row 2: 4 columns, but the header has 5" in capsys.readouterr().err
    assert main(["evaluate", str(bad), "--model", "clf", "--model-repository", str(model_repository)]) == 1
    assert "row 2: 4 columns" in capsys.readouterr().err
    assert main(["evaluate", str(bad), "--model", "nope", "--model-repository", str(model_repository)]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "data.txt"), "--model", "clf"]) == 1
    assert "--format" in capsys.readouterr().err


def test_big_streamed_upload_with_early_error_gets_the_answer(
    live_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the error is in row 2 of a ~6 MB upload: the server answers before reading it all
    path = tmp_path / "big.csv"
    buffer = io.StringIO()
    buffer.write("a,b,c,d,label\n1,2,3,4,setosa\n1,2,3,4,rose\n")
    buffer.write("1.5,2.5,3.5,4.5,setosa\n" * 250_000)
    path.write_text(buffer.getvalue())
    assert main(["evaluate", str(path), "--model", "clf", "--url", live_server]) == 1
    assert "row 2: label 'rose'" in capsys.readouterr().err


def test_sequence_model_local_and_remote_from_npz_and_ndjson(
    live_server: str, model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lengths = RNG.integers(1, 7, 50)
    padded = np.zeros((50, 6, 2), dtype=np.float32)
    for i, n in enumerate(lengths):
        padded[i, :n] = RNG.normal(size=(n, 2))
    labels = RNG.integers(0, 2, 50)
    npz = tmp_path / "seq.npz"
    np.savez(npz, inputs=padded, lengths=lengths, labels=labels)
    ndjson = tmp_path / "seq.ndjson"
    ndjson.write_text(
        "\n".join(
            json.dumps({"input": padded[i, :n].tolist(), "label": int(y)})
            for i, (n, y) in enumerate(zip(lengths, labels, strict=True))
        )
    )
    pred = [
        int(
            reference_outputs(
                model_repository, "seq", 1, {"sequence": padded[i : i + 1, :n], "mask": np.ones((1, n), bool)}
            )["label_index"][0]
        )
        for i, n in enumerate(lengths)
    ]
    expected = skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist()
    for path in (npz, ndjson):
        for where in (["--url", live_server], ["--model-repository", str(model_repository)]):
            report = run_json(capsys, str(path), "--model", "seq", *where)
            assert report["confusion_matrix"]["matrix"] == expected
