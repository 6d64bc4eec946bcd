"""Export: onnxruntime agrees with torch for every architecture, preprocessing is inside the graph,
the card is valid, and the repository is written atomically."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard, sha256_of
from trainer import export as export_module
from trainer.config import TrainConfig
from trainer.errors import ExportError
from trainer.export import export_model
from trainer.fit import TrainResult, train_and_evaluate

from .helpers import random_sequences, session, tiny_config, torch_outputs

ATOL = 1e-5  # tighter than the export's own tolerance: these graphs are tiny


@dataclass(frozen=True)
class Exported:
    config: TrainConfig
    result: TrainResult
    version_dir: Path


def train_and_export(config: TrainConfig, output: Path) -> Exported:
    result = train_and_evaluate(config, progress=False)
    return Exported(config, result, export_model(result, config, output))


CASES = {
    "mlp": ("wine", "mlp"),
    "cnn": ("digits", "cnn"),
    "gru": ("waves", "gru"),
    "lstm": ("waves", "lstm"),
    "transformer": ("waves", "transformer"),
    "regression": ("diabetes", "mlp"),
}


_EXPORTED: dict[str, Exported] = {}


def exported_case(case: str, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Train (1 epoch) and export one case once per session; later tests reuse it read-only."""
    if case not in _EXPORTED:
        source, architecture = CASES[case]
        config = tiny_config(source, epochs=1, model={"architecture": architecture})
        _EXPORTED[case] = train_and_export(config, tmp_path_factory.mktemp(case))
    return _EXPORTED[case]


@pytest.fixture(params=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return exported_case(request.param, tmp_path_factory)


def raw_batches(item: Exported, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Raw inputs at batch sizes 1, 7 and 300; sequences with a different padded length each time."""
    test = item.result.splits.test
    if item.result.dataset.modality == "sequence":
        return [random_sequences(rng, size, steps) for size, steps in ((1, 3), (7, 45), (300, 30))]
    name = "image" if test.x.ndim == 4 else "features"
    batches = []
    for size in (1, 7, 300):
        rows = test.x[np.arange(size) % len(test)]
        batches.append({name: (rows * rng.uniform(0.5, 1.5, rows.shape)).astype(np.float32)})
    return batches


def test_onnxruntime_matches_torch_at_batch_1_7_300(exported: Exported) -> None:
    ort_session = session(exported.version_dir / ONNX_FILENAME)
    names = [output.name for output in ort_session.get_outputs()]
    for feeds in raw_batches(exported, np.random.default_rng(0)):
        expected = torch_outputs(exported.result.model, feeds)
        actual = ort_session.run(names, feeds)
        batch = next(iter(feeds.values())).shape[0]
        for name, want, got in zip(names, expected, actual, strict=True):
            assert got.shape == want.shape
            assert got.shape[0] == batch
            if name == "label_index":
                assert got.dtype == np.int64
                assert np.array_equal(got, want)
            else:
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
        if "probabilities" in names:
            np.testing.assert_allclose(actual[0].sum(axis=1), 1.0, atol=1e-5)
            assert np.array_equal(actual[1], actual[0].argmax(axis=1))


def test_card_is_valid_and_matches_the_graph(exported: Exported) -> None:
    card = ModelCard.read(exported.version_dir / CARD_FILENAME)
    onnx_path = exported.version_dir / ONNX_FILENAME
    assert card.onnx.sha256 == sha256_of(onnx_path)
    assert card.onnx.size_bytes == onnx_path.stat().st_size
    assert card.onnx.parity_max_abs_diff is not None
    assert card.onnx.parity_max_abs_diff < 1e-4
    assert not list(exported.version_dir.glob("*.data"))  # self-contained: no external data
    assert b"site-packages" not in onnx_path.read_bytes()  # no build paths (exporter stack traces) shipped
    assert card.architecture == exported.config.model.architecture
    inputs = {spec.name: (spec.dtype, spec.shape) for spec in card.inputs}
    outputs = {spec.name: (spec.dtype, spec.shape) for spec in card.outputs}
    if card.modality == "sequence":
        assert inputs == {"sequence": ("float32", [-1, -1, 1]), "mask": ("bool", [-1, -1])}
    elif card.modality == "image":
        assert inputs == {"image": ("float32", [-1, 1, 8, 8])}
    else:
        assert inputs == {"features": ("float32", [-1, card.dataset.n_features])}
    if card.task == "classification":
        assert card.labels is not None
        assert outputs == {
            "probabilities": ("float32", [-1, len(card.labels)]),
            "label_index": ("int64", [-1]),
        }
        assert set(card.metrics.test) == {"accuracy", "precision_macro", "recall_macro", "f1_macro", "loss"}
        assert (exported.version_dir / "confusion_matrix.png").stat().st_size > 1000
    else:
        assert outputs == {"value": ("float32", [-1])}
        assert set(card.metrics.test) == {"mse", "rmse", "mae", "r2", "loss"}
    split = card.dataset.split
    assert split.train + split.validation + split.test == card.dataset.n_samples
    assert card.metrics.validation == pytest.approx(exported.result.validation_metrics, rel=1e-5)
    assert {"torch", "onnx", "onnxruntime"} <= set(card.library_versions)
    history = json.loads((exported.version_dir / "history.json").read_text(encoding="utf-8"))
    assert [row["epoch"] for row in history] == [1]
    assert (exported.version_dir / "curves.png").stat().st_size > 1000
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata["name"] == card.name
    if card.labels:
        assert json.loads(metadata["labels"]) == card.labels


def test_card_summarises_the_training_split_as_clients_send_it(exported: Exported) -> None:
    """The training summary bins the raw training rows (the graph's inputs), one share per bin."""
    card = ModelCard.read(exported.version_dir / CARD_FILENAME)
    summary = card.training_summary
    assert summary is not None
    train, dataset = exported.result.splits.train, exported.result.dataset
    assert summary.rows == len(train)
    if card.modality == "tabular":
        assert [f.name for f in summary.features] == dataset.feature_names
        assert [f.column for f in summary.features] == list(range(train.x.shape[1]))
        values = train.x.astype(np.float64)
    elif card.modality == "image":
        assert [f.name for f in summary.features] == ["mean", "std", "nonzero_fraction"]
        pixels = train.x.reshape(len(train), -1).astype(np.float64)
        values = np.stack([pixels.mean(axis=1), pixels.std(axis=1), (pixels != 0).mean(axis=1)], axis=1)
    else:
        assert [f.name for f in summary.features] == ["length", "mean", "std"]
        assert train.lengths is not None
        real = [train.x[i, :length].astype(np.float64) for i, length in enumerate(train.lengths)]
        values = np.array([[len(r), r.mean(), r.std()] for r in real])
    for j, feature in enumerate(summary.features):
        # Raw units: every edge lies within the raw training values (a standardized copy would not).
        assert values[:, j].min() <= feature.edges[0] <= feature.edges[-1] <= values[:, j].max()
        bounds = [-np.inf, *feature.edges, np.inf]
        by_hand = [
            np.mean((values[:, j] >= lo) & (values[:, j] < hi)) for lo, hi in itertools.pairwise(bounds)
        ]
        np.testing.assert_allclose(feature.fractions, by_hand, atol=1e-6)
    if card.task == "classification":
        assert card.labels is not None
        shares = np.bincount(train.y, minlength=len(card.labels)) / len(train)
        assert summary.class_priors == pytest.approx(dict(zip(card.labels, shares, strict=True)), abs=1e-6)
    else:
        assert summary.class_priors is None


@pytest.mark.parametrize("architecture", ["gru", "lstm", "transformer"])
def test_padding_does_not_change_a_sequence_result(
    architecture: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Through ONNX: each row of a padded batch equals the same sequence run alone, unpadded."""
    item = exported_case(architecture, tmp_path_factory)
    ort_session = session(item.version_dir / ONNX_FILENAME)
    feeds = random_sequences(np.random.default_rng(1), 6, 25)
    padded_probabilities = ort_session.run(["probabilities"], feeds)[0]
    empty = {"sequence": feeds["sequence"][:2], "mask": np.stack([feeds["mask"][0], np.zeros(25, bool)])}
    assert np.all(
        np.isfinite(ort_session.run(["probabilities"], empty)[0])
    )  # an all-padding row stays finite
    for row, length in enumerate(feeds["mask"].sum(axis=1)):
        alone = {
            "sequence": feeds["sequence"][row : row + 1, :length],
            "mask": feeds["mask"][row : row + 1, :length],
        }
        np.testing.assert_allclose(
            ort_session.run(["probabilities"], alone)[0][0], padded_probabilities[row], atol=1e-5
        )


@pytest.mark.parametrize("scaler", ["standardize", "minmax"])
def test_scaler_is_folded_and_fitted_on_train_only(
    scaler: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if scaler == "standardize":  # the default: the shared MLP case already uses it
        item = exported_case("mlp", tmp_path_factory)
    else:
        item = train_and_export(tiny_config("wine", epochs=1, preprocessing={"scaler": scaler}), tmp_path)
    train = item.result.splits.train.x.astype(np.float64)
    if scaler == "standardize":
        shift, scale = train.mean(axis=0), train.std(axis=0)
    else:
        shift, scale = train.min(axis=0), train.max(axis=0) - train.min(axis=0)
    raw = item.result.splits.test.x
    # The network alone on inputs scaled by hand with training-split statistics...
    with torch.no_grad():
        logits = item.result.model.network(torch.from_numpy(((raw - shift) / scale).astype(np.float32)))
    by_hand = torch.softmax(logits, dim=1).numpy()
    # ...equals the exported graph on raw inputs.
    from_graph = session(item.version_dir / ONNX_FILENAME).run(["probabilities"], {"features": raw})[0]
    np.testing.assert_allclose(from_graph, by_hand, atol=1e-5)
    card = ModelCard.read(item.version_dir / CARD_FILENAME)
    assert [step.kind for step in card.preprocessing] == [scaler]
    assert all(step.in_graph for step in card.preprocessing)


def test_image_steps_are_folded(tmp_path: Path) -> None:
    """Colour images through grayscale + gaussian denoise + binarize + standardize, all in the graph."""
    rng = np.random.default_rng(0)
    gray = rng.uniform(0, 16, size=(90, 1, 6, 6))
    colour = np.concatenate([gray * 1.1, gray, gray * 0.8], axis=1).astype(np.float32)
    labels = (gray.mean(axis=(1, 2, 3)) > 8).astype(np.int64)
    np.savez(tmp_path / "colour.npz", X=colour, y=labels)
    config = tiny_config(
        "digits",
        epochs=1,
        data={"source": "npz", "path": str(tmp_path / "colour.npz"), "label": "y"},
        preprocessing={
            "scaler": "standardize",
            "image": {"grayscale": True, "denoise": "gaussian", "binarize_threshold": 6.0},
            "augmentation": {"rotation_degrees": 15, "horizontal_flip": True, "noise_std": 0.5},
        },
    )
    item = train_and_export(config, tmp_path / "repo")
    card = ModelCard.read(item.version_dir / CARD_FILENAME)
    assert [step.kind for step in card.preprocessing] == ["grayscale", "denoise", "binarize", "standardize"]
    assert card.inputs[0].shape == [-1, 3, 6, 6]  # clients send raw colour pixels
    raw = (colour[:40] * rng.uniform(0.8, 1.2, size=(40, 3, 6, 6))).astype(np.float32)
    expected = torch_outputs(item.result.model, {"image": raw})[0]
    actual = session(item.version_dir / ONNX_FILENAME).run(["probabilities"], {"image": raw})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    # The steps are graph nodes: replicate padding + conv for the filter, a comparison for binarize.
    ops = {node.op_type for node in onnx.load(str(item.version_dir / ONNX_FILENAME)).graph.node}
    assert {"Pad", "Conv", "Greater"} <= ops


def test_existing_version_is_refused_then_replaced(tmp_path: Path) -> None:
    config = tiny_config("wine", epochs=1)
    result = train_and_evaluate(config, progress=False)
    first = export_model(result, config, tmp_path, extra_files={"trials.csv": b"number,value\n0,1.0\n"})
    assert (first / "trials.csv").read_bytes() == b"number,value\n0,1.0\n"
    before = sha256_of(first / ONNX_FILENAME)
    with pytest.raises(ExportError, match="already exists; use --replace"):
        export_model(result, config, tmp_path)
    assert sha256_of(first / ONNX_FILENAME) == before
    again = export_model(result, config, tmp_path, replace=True, training_info={"tuning": {"trials": 3}})
    assert again == first
    assert not (again / "trials.csv").exists()
    assert ModelCard.read(again / CARD_FILENAME).training["tuning"] == {"trials": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-wine"]  # no staging left over
    assert sorted(p.name for p in (tmp_path / "tiny-wine").iterdir()) == ["1"]
    with pytest.raises(ExportError, match="not allowed"):
        export_model(result, config, tmp_path, replace=True, extra_files={"model.onnx": b""})
    with pytest.raises(ExportError, match="not allowed"):
        export_model(result, config, tmp_path, replace=True, extra_files={"../x.csv": b""})


def test_failed_parity_check_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("wine", epochs=1)
    result = train_and_evaluate(config, progress=False)
    monkeypatch.setattr(export_module, "PARITY_ATOL", -1.0)  # no difference can pass
    output = tmp_path / "repo"
    with pytest.raises(ExportError, match="parity check failed"):
        export_model(result, config, output)
    assert not output.exists()
