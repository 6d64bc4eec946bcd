"""`--quantize int8`: a sibling model `<name>-int8/<version>/` that onnxruntime runs, the server serves, and
whose card records its scores (scikit-learn's, on the test split) and changes against the float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
)

from app.main import create_app
from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard, sha256_of
from app.settings import Settings
from trainer import export as export_module
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.data import Split
from trainer.errors import ExportError
from trainer.export import export_model
from trainer.fit import prepare_data, train_and_evaluate
from trainer.quantize import LATENCY_RUNS

from .helpers import REPO_ROOT, session, tiny_config

# Dynamic int8 rounds each weight to 1/127 of its tensor's largest magnitude and each activation to 1/255
# of its batch's range: on the wine MLP that moves a probability by 1e-3 to 1.5e-2 (measured on each split,
# after 1 epoch and after full training), so the gap between the two best classes moves by at most ~0.03.
# A row whose float gap is wider than NEAR_TIE_MARGIN (over 3x that) must keep its class; rows closer to
# a tie may flip, and they are few enough that MIN_AGREEMENT of the test rows keep their class even after
# one epoch (every row did in the measurements; 0.9 allows 3 of wine's 36 test rows to flip).
NEAR_TIE_MARGIN = 0.1
MIN_AGREEMENT = 0.9


def fit_quantized(config: str, output: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    argv = ["-q", "fit", str(REPO_ROOT / config), "--output", str(output), "--epochs", "1"]
    assert main([*argv, "--quantize", "int8", "--no-progress", "--threads", "1"]) == 0
    float_dir, quantized_dir = (Path(line) for line in capsys.readouterr().out.splitlines())
    return float_dir, quantized_dir


def rebuilt_test_split(card: ModelCard) -> Split:
    """The card's test split, rebuilt from its config (the split is seeded)."""
    _, splits = prepare_data(TrainConfig.model_validate(card.training["config"]))
    return splits.test


def run(version_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    graph = session(version_dir / ONNX_FILENAME)
    names = [output.name for output in graph.get_outputs()]
    return dict(zip(names, graph.run(names, feeds), strict=True))


def test_fit_wine_quantized_is_recorded_scored_and_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "repo"
    float_dir, quantized_dir = fit_quantized("configs/wine.yaml", output, capsys)
    assert (float_dir, quantized_dir) == (output / "wine" / "1", output / "wine-int8" / "1")
    assert sorted(p.name for p in output.iterdir()) == ["wine", "wine-int8"]  # no staging folder left
    assert sorted(p.name for p in quantized_dir.iterdir()) == [CARD_FILENAME, ONNX_FILENAME]

    float_card = ModelCard.read(float_dir / CARD_FILENAME)
    card = ModelCard.read(quantized_dir / CARD_FILENAME)
    quantization = card.quantization
    assert quantization is not None
    assert float_card.quantization is None
    assert (card.name, card.version) == ("wine-int8", 1)
    assert card.onnx.sha256 == sha256_of(quantized_dir / ONNX_FILENAME)
    assert card.onnx.size_bytes == (quantized_dir / ONNX_FILENAME).stat().st_size
    assert (card.inputs, card.outputs, card.labels) == (
        float_card.inputs,
        float_card.outputs,
        float_card.labels,
    )
    assert (quantization.method, quantization.weight_type) == ("dynamic", "int8")
    assert quantization.float_model.model_dump() == {
        "name": "wine",
        "version": 1,
        "sha256": sha256_of(float_dir / ONNX_FILENAME),
        "size_bytes": (float_dir / ONNX_FILENAME).stat().st_size,
    }
    assert quantization.size_ratio == pytest.approx(
        card.onnx.size_bytes / float_card.onnx.size_bytes, abs=1e-4
    )

    test = rebuilt_test_split(card)
    feeds = test.graph_feeds(np.arange(len(test)))
    float_out, quantized_out = run(float_dir, feeds), run(quantized_dir, feeds)
    float_labels, labels = float_out["label_index"], quantized_out["label_index"]

    # The recorded scores are scikit-learn's on each graph's test predictions (6 decimals kept);
    # the changes are their differences.
    def sklearn_scores(predictions: np.ndarray) -> dict[str, float]:
        macro = {"labels": list(range(3)), "average": "macro", "zero_division": 0}
        return {
            "accuracy": accuracy_score(test.y, predictions),
            "precision_macro": precision_score(test.y, predictions, **macro),
            "recall_macro": recall_score(test.y, predictions, **macro),
            "f1_macro": f1_score(test.y, predictions, **macro),
        }

    assert card.metrics.test == pytest.approx(sklearn_scores(labels), abs=1e-6)
    assert quantization.float_test_metrics == pytest.approx(sklearn_scores(float_labels), abs=1e-6)
    for name in card.metrics.test:
        change = card.metrics.test[name] - quantization.float_test_metrics[name]
        assert quantization.test_metrics_change[name] == pytest.approx(change, abs=2e-6)
    # onnxruntime's float graph scores as torch did (the float card) on every metric both have.
    for name, value in quantization.float_test_metrics.items():
        assert float_card.metrics.test[name] == pytest.approx(value, abs=1e-6)

    agreement = float(np.mean(labels == float_labels))
    assert quantization.test_label_agreement == pytest.approx(agreement, abs=1e-6)
    assert agreement >= MIN_AGREEMENT
    top_two = np.sort(float_out["probabilities"], axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > NEAR_TIE_MARGIN
    np.testing.assert_array_equal(labels[clear], float_labels[clear])
    np.testing.assert_allclose(quantized_out["probabilities"].sum(axis=1), 1.0, atol=1e-5)

    assert [t.batch_size for t in quantization.latency] == list(LATENCY_RUNS)
    for timing in quantization.latency:
        assert timing.float_us_per_row > 0
        assert timing.quantized_us_per_row > 0
        assert timing.speedup == pytest.approx(
            timing.float_us_per_row / timing.quantized_us_per_row, rel=1e-2
        )

    for batch in (1, 300):  # beyond the test split's size: rows repeat
        rows = test.graph_feeds(np.arange(batch) % len(test))
        out = run(quantized_dir, rows)
        assert out["probabilities"].shape == (batch, 3)
        assert out["label_index"].shape == (batch,)

    settings = Settings(model_repository=output, access_log=False)
    with TestClient(create_app(settings)) as client:
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert {name: models[name]["state"] for name in ("wine", "wine-int8")} == {
            "wine": "ready",
            "wine-int8": "ready",
        }
        answer = client.post("/predict", json={"model": "wine-int8", "inputs": feeds["features"].tolist()})
        assert answer.status_code == 200, answer.text
        served = [prediction["index"] for prediction in answer.json()["predictions"]]
        assert served == labels.tolist()


def test_fit_diabetes_quantized_records_regression_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    float_dir, quantized_dir = fit_quantized("configs/diabetes.yaml", tmp_path, capsys)
    card = ModelCard.read(quantized_dir / CARD_FILENAME)
    assert card.quantization is not None
    assert card.quantization.test_label_agreement is None
    test = rebuilt_test_split(card)
    feeds = test.graph_feeds(np.arange(len(test)))
    values = run(quantized_dir, feeds)["value"].reshape(-1)
    float_values = run(float_dir, feeds)["value"].reshape(-1)
    # int8 moves a prediction by a little of the target's spread (measured: at most 1.8 against a std of 68).
    assert np.abs(values - float_values).max() < 0.05 * test.y.std()
    mse = mean_squared_error(test.y, values)
    expected = {
        "mse": mse,
        "rmse": np.sqrt(mse),
        "mae": mean_absolute_error(test.y, values),
        "r2": r2_score(test.y, values),
    }
    assert card.metrics.test == pytest.approx(expected, rel=1e-6, abs=1e-6)  # the card keeps 6 decimals


def test_tune_exports_the_quantized_sibling_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-q", "tune", str(REPO_ROOT / "configs/wine.yaml"), "--output", str(tmp_path), "--epochs", "1"]
    argv += ["--strategy", "random", "--trials", "1", "--quantize", "int8", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "wine" / "1"),
        str(tmp_path / "wine-int8" / "1"),
    ]
    card = ModelCard.read(tmp_path / "wine-int8" / "1" / CARD_FILENAME)
    assert card.quantization is not None
    assert card.training["tuning"]["trials"] == 1


def test_a_failed_quantization_leaves_neither_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("wine", epochs=1)
    result = train_and_evaluate(config, progress=False)

    def changed_outputs(float_path: Path, quantized_path: Path, name: str) -> None:
        """A valid graph that onnxruntime runs, with its first output renamed."""
        proto = onnx.load(float_path)
        old = proto.graph.output[0].name
        for node in proto.graph.node:
            node.input[:] = ["renamed" if value == old else value for value in node.input]
            node.output[:] = ["renamed" if value == old else value for value in node.output]
        proto.graph.output[0].name = "renamed"
        onnx.save(proto, quantized_path)

    monkeypatch.setattr(export_module, "quantize_int8", changed_outputs)
    output = tmp_path / "repo"
    with pytest.raises(ExportError, match="changed the graph's inputs or outputs"):
        export_model(result, config, output, quantize="int8")
    assert not output.exists()


def test_bad_quantize_value_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fit", str(REPO_ROOT / "configs/wine.yaml"), "--output", str(tmp_path / "repo")]
    assert main([*argv, "--quantize", "int4"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "modeltrain: error: --quantize: 'int4' is not supported; use int8"
    ]
    assert not (tmp_path / "repo").exists()


def test_existing_quantized_version_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "wine-int8" / "1").mkdir(parents=True)
    argv = ["fit", str(REPO_ROOT / "configs/wine.yaml"), "--output", str(tmp_path), "--quantize", "int8"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"modeltrain: error: {tmp_path / 'wine-int8' / '1'} already exists; use --replace to overwrite it"
    ]
    assert not (tmp_path / "wine").exists()


def test_a_name_too_long_for_the_suffix_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "long.yaml"
    config.write_text(f"name: {'w' * 62}\ndata: {{source: wine}}\n", encoding="utf-8")
    assert main(["fit", str(config), "--output", str(tmp_path / "repo"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert f"name {'w' * 62!r} is too long for --quantize" in err[0]
    assert not (tmp_path / "repo").exists()
