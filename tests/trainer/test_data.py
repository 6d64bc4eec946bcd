"""Data sources and the split: disjoint, complete, stratified, seeded; user CSV/NPZ and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.config import DataConfig, SplitConfig, WavesConfig
from trainer.data import Dataset, generate_waves, load_csv, load_dataset, load_npz, split_dataset
from trainer.errors import DataError


@pytest.mark.parametrize("source", ["digits", "iris", "wine", "breast_cancer", "diabetes", "waves"])
def test_split_is_disjoint_complete_and_seeded(source: str) -> None:
    dataset = load_dataset(DataConfig(source=source, waves=WavesConfig(n_samples=200)), seed=0)
    splits = split_dataset(dataset, SplitConfig(), seed=3)
    parts = [splits.train.indices, splits.validation.indices, splits.test.indices]
    assert all(part is not None for part in parts)
    joined = np.concatenate(parts)  # type: ignore[arg-type]
    assert len(joined) == len(set(joined.tolist())) == len(dataset)
    assert abs(len(splits.test) - 0.15 * len(dataset)) <= 1
    again = split_dataset(dataset, SplitConfig(), seed=3)
    assert np.array_equal(again.test.indices, splits.test.indices)  # type: ignore[arg-type]
    other = split_dataset(dataset, SplitConfig(), seed=4)
    assert not np.array_equal(other.test.indices, splits.test.indices)  # type: ignore[arg-type]


def test_classification_split_is_stratified() -> None:
    dataset = load_dataset(DataConfig(source="digits"), seed=0)
    splits = split_dataset(dataset, SplitConfig(train=0.6, validation=0.2, test=0.2), seed=0)
    overall = np.bincount(dataset.y) / len(dataset)
    for part in (splits.train, splits.validation, splits.test):
        share = np.bincount(part.y, minlength=10) / len(part)
        # Stratified: each class within one row of its overall share.
        assert np.all(np.abs(share - overall) * len(part) <= 1.0 + 1e-9)
    assert splits.stratified


def test_builtin_shapes_and_raw_units() -> None:
    digits = load_dataset(DataConfig(source="digits"), seed=0)
    assert digits.x.shape[1:] == (1, 8, 8)
    assert digits.x.dtype == np.float32
    assert digits.x.max() == 16  # raw pixels; scaling happens in the graph
    assert digits.labels == [str(i) for i in range(10)]
    diabetes = load_dataset(DataConfig(source="diabetes"), seed=0)
    assert diabetes.task == "regression"
    assert diabetes.y.dtype == np.float32
    assert diabetes.x[:, 0].max() > 10  # age in years, not sklearn's pre-scaled values


def test_waves_are_variable_length_right_padded_and_seeded() -> None:
    config = WavesConfig(n_samples=64, min_length=10, max_length=40)
    waves = generate_waves(config, seed=1)
    assert waves.x.shape == (64, 40, 1)
    assert waves.lengths is not None
    assert waves.lengths.min() >= 10
    assert waves.lengths.max() <= 40
    assert len(set(waves.lengths.tolist())) > 5
    for row, length in zip(waves.x, waves.lengths, strict=True):
        assert np.all(row[length:] == 0)
        assert np.any(row[:length] != 0)
    assert np.bincount(waves.y).tolist() == [16, 16, 16, 16]
    assert np.array_equal(generate_waves(config, seed=1).x, waves.x)
    assert not np.array_equal(generate_waves(config, seed=2).x, waves.x)


def test_too_small_to_split() -> None:
    tiny = Dataset(
        "t",
        "t",
        "classification",
        "tabular",
        np.zeros((4, 2), np.float32),
        np.array([0, 1, 0, 1]),
        ["a", "b"],
    )
    with pytest.raises(DataError, match="has 4 rows: too small to split"):
        split_dataset(tiny, SplitConfig(), seed=0)
    two = Dataset("t", "t", "regression", "tabular", np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(DataError, match="too small to split"):
        split_dataset(two, SplitConfig(), seed=0)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv(tmp_path: Path) -> None:
    rows = ["a,b,species"] + [f"{i},{i % 7 * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(40)]
    dataset = load_csv(
        write_csv(tmp_path / "pets.csv", "\n".join(rows)), label="species", task="classification"
    )
    assert dataset.x.shape == (40, 2)
    assert dataset.labels == ["cat", "dog"]
    assert dataset.feature_names == ["a", "b"]
    assert dataset.y[:2].tolist() == [1, 0]
    numeric = load_csv(
        write_csv(tmp_path / "n.csv", "x,y\n1,3\n2,1\n3,3\n"), label="y", task="classification"
    )
    assert numeric.labels == ["1", "3"]
    reg = load_csv(write_csv(tmp_path / "r.csv", "x,y\n1,0.5\n2,1.5\n"), label="y", task="regression")
    assert reg.y.tolist() == [0.5, 1.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n", r"label column 'y' is not in the header \(columns: a, b\)"),
        ("a,y\n1,0\nfoo,1\n", r"column 'a' row 3: 'foo' is not a number"),
        ("a,y\n1,0\nnan,1\n", r"column 'a' row 3: 'nan' is not a finite number"),
        ("a,y\n1,0\n2\n", r"row 3 has 1 fields, the header has 2"),
        ("a,y\n", r"header but no rows"),
        ("", r"empty"),
        ("a,y\n1,0\n2,0\n", r"at least 2 classes"),
    ],
)
def test_bad_csv_is_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_csv(write_csv(tmp_path / "bad.csv", text), label="y", task="classification")


def test_user_npz_tabular_image_sequence(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tab.npz", X=rng.random((30, 3)), y=np.arange(30) % 3)
    tab = load_npz(
        tmp_path / "tab.npz", features_key="X", label="y", task="classification", class_names=["a", "b", "c"]
    )
    assert tab.modality == "tabular"
    assert tab.labels == ["a", "b", "c"]
    np.savez(tmp_path / "img.npz", X=rng.random((30, 3, 5, 5)), y=np.arange(30) % 2)
    assert (
        load_npz(tmp_path / "img.npz", features_key="X", label="y", task="classification").modality == "image"
    )
    np.savez(tmp_path / "seq.npz", X=rng.random((30, 9, 2)), y=rng.random(30), lengths=np.full(30, 4))
    seq = load_npz(tmp_path / "seq.npz", features_key="X", label="y", task="regression")
    assert seq.modality == "sequence"
    assert seq.lengths is not None
    assert seq.lengths.tolist() == [4] * 30


def test_bad_npz_is_explained(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", X=np.zeros((4, 2)), labels=np.arange(4))
    with pytest.raises(DataError, match=r"no array 'y' \(arrays: X, labels\)"):
        load_npz(tmp_path / "a.npz", features_key="X", label="y", task="classification")
    np.savez(tmp_path / "s.npz", X=np.array([["a", "b"], ["c", "d"]]), y=np.arange(2))
    with pytest.raises(DataError, match=r"dtype <U1, features must be real numbers"):
        load_npz(tmp_path / "s.npz", features_key="X", label="y", task="classification")
    np.savez(tmp_path / "n.npz", X=np.array([[1.0], [np.inf]]), y=np.arange(2))
    with pytest.raises(DataError, match="row 1 has a non-finite value"):
        load_npz(tmp_path / "n.npz", features_key="X", label="y", task="classification")
    with pytest.raises(DataError, match="cannot read NPZ"):
        load_npz(tmp_path / "missing.npz", features_key="X", label="y", task="classification")
