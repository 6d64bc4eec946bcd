"""`modeltrain fit` end to end (a real subprocess); bad input: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard, sha256_of
from trainer.cli import main

from .helpers import REPO_ROOT, session

MODELTRAIN = Path(sys.executable).parent / "modeltrain"


def modeltrain(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [str(MODELTRAIN)] if MODELTRAIN.exists() else [sys.executable, "-m", "trainer.cli"]
    return subprocess.run(
        [*command, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False
    )


def test_fit_digits_for_two_epochs_writes_a_servable_model(tmp_path: Path) -> None:
    output = tmp_path / "repo"
    done = modeltrain("fit", "configs/digits.yaml", "--output", output, "--epochs", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr
    version_dir = output / "digits" / "1"
    assert done.stdout.strip() == str(version_dir)
    assert "Traceback" not in done.stderr
    assert "Warning" not in done.stderr
    card = ModelCard.read(version_dir / CARD_FILENAME)
    assert card.onnx.sha256 == sha256_of(version_dir / ONNX_FILENAME)
    assert card.training["epochs_run"] == 2
    assert card.labels == [str(i) for i in range(10)]
    ort_session = session(version_dir / ONNX_FILENAME)
    rng = np.random.default_rng(0)
    for batch in (1, 100):
        pixels = rng.integers(0, 17, size=(batch, 1, 8, 8)).astype(np.float32)
        probabilities, label_index = ort_session.run(["probabilities", "label_index"], {"image": pixels})
        assert probabilities.shape == (batch, 10)
        assert label_index.shape == (batch,)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in output.iterdir()) == ["digits"]  # no staging folder left

    again = modeltrain("fit", "configs/digits.yaml", "--output", output, "--epochs", "1")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"modeltrain: error: {version_dir} already exists; use --replace to overwrite it"
    ]


def test_bad_config_in_a_subprocess_is_one_line_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "name: x\ndata: {source: wine}\noptim: {lr: 0.1, learning_rate: 0.1}\n", encoding="utf-8"
    )
    done = modeltrain("fit", config, "--output", tmp_path / "repo")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"modeltrain: error: {config}: optim.learning_rate: unknown key"
    ]
    assert not (tmp_path / "repo").exists()


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


GOOD_ROWS = [f"{i % 5},{(i * 7) % 11},{'a' if i % 2 else 'b'}" for i in range(40)]
WINE = {"source": "wine"}
CSV = {"source": "csv", "label": "y"}
BAD_SPACE = {"space": {"optim.lr": {"type": "float", "low": 1, "high": 0}}}
BAD_INPUTS = {
    "wrong-type": (
        {"data": WINE, "optim": {"epochs": "two"}},
        None,
        r"optim\.epochs: Input should be a valid",
    ),
    "unknown-key": ({"data": WINE, "modle": {}}, None, r"modle: unknown key"),
    "wrong-architecture": (
        {"data": WINE, "model": {"architecture": "cnn"}},
        None,
        r"'cnn' does not fit tabular",
    ),
    "missing-label": (
        {"data": {**CSV, "label": "kind"}},
        GOOD_ROWS,
        r"label column 'kind' is not in the header",
    ),
    "non-numeric": (
        {"data": CSV},
        [*GOOD_ROWS[:5], "1,oops,a", *GOOD_ROWS[5:]],
        r"column 'f2' row 7: 'oops' is not a number",
    ),
    "too-small": ({"data": CSV}, GOOD_ROWS[:4], r"4 rows: too small to split"),
    "bad-space": (
        {"data": WINE, "search": BAD_SPACE},
        None,
        r"search\.space\.optim\.lr.*low \(1\.0\) must be below",
    ),
}


@pytest.mark.parametrize(("config", "csv_rows", "message"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_and_nothing_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config: dict[str, Any],
    csv_rows: list[str] | None,
    message: str,
) -> None:
    config = {"name": "bad", **json.loads(json.dumps(config))}
    if csv_rows is not None:
        config["data"]["path"] = str(write_csv(tmp_path / "data.csv", "f1,f2,y", csv_rows))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    output = tmp_path / "repo"
    assert main(["-q", "fit", str(path), "--output", str(output), "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modeltrain: error: ")
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert not output.exists()


def test_fit_user_csv_and_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)) * [1, 10, 100]
    labels = np.where(x[:, 0] + x[:, 1] / 10 > 0, "yes", "no")
    csv_path = write_csv(
        tmp_path / "rows.csv",
        "a,b,c,answer",
        [f"{a},{b},{c},{y}" for (a, b, c), y in zip(x, labels, strict=False)],
    )
    np.savez(tmp_path / "rows.npz", X=x, target=x @ [1.0, 0.1, 0.01])
    configs: dict[str, dict[str, Any]] = {
        "from-csv": {"source": "csv", "path": str(csv_path), "label": "answer"},
        "from-npz": {
            "source": "npz",
            "path": str(tmp_path / "rows.npz"),
            "label": "target",
            "task": "regression",
        },
    }
    output = tmp_path / "repo"
    configs["from-npz"]["task"] = "regression"
    for name, data in configs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "data": data, "optim": {"epochs": 2}}), encoding="utf-8")
        assert main(["-q", "fit", str(path), "--output", str(output), "--no-progress"]) == 0
    csv_card = ModelCard.read(output / "from-csv" / "1" / CARD_FILENAME)
    assert csv_card.labels == ["no", "yes"]
    assert csv_card.dataset.source == str(csv_path)
    assert csv_card.inputs[0].shape == [-1, 3]
    npz_card = ModelCard.read(output / "from-npz" / "1" / CARD_FILENAME)
    assert npz_card.task == "regression"
    assert npz_card.labels is None
    value = session(output / "from-npz" / "1" / ONNX_FILENAME).run(
        ["value"], {"features": x[:5].astype(np.float32)}
    )
    assert value[0].shape == (5,)
    assert capsys.readouterr().out.splitlines() == [str(output / n / "1") for n in configs]
