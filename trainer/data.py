"""Datasets and the seeded train/validation/test split.

Every source becomes a `Dataset` of numpy arrays in raw units (what a client will send):

* tabular  `x` float32 [N, F]
* image    `x` float32 [N, C, H, W] (digits: 1×8×8, pixel values 0–16)
* sequence `x` float32 [N, T, K] right-padded with zeros, plus `lengths` int64 [N]

Classification targets are int64 class indices into `labels`; regression targets are float32.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from app.model_card import FEATURES_INPUT, IMAGE_INPUT, MASK_INPUT, SEQUENCE_INPUT, Modality, Task
from trainer.config import BUILTIN_SOURCES, DataConfig, SplitConfig, WavesConfig
from trainer.errors import DataError

WAVE_KINDS = ("sine", "square", "sawtooth", "triangle")


@dataclass(frozen=True)
class Dataset:
    """All rows of one data source, before splitting."""

    name: str
    source: str
    task: Task
    modality: Modality
    x: np.ndarray
    y: np.ndarray
    labels: list[str] | None = None
    feature_names: list[str] | None = None
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n_features(self) -> int:
        """Features per row (tabular), pixels per image, or channels per sequence step."""
        if self.modality == "sequence":
            return int(self.x.shape[2])
        return math.prod(self.x.shape[1:])


@dataclass(frozen=True)
class Split:
    """One part of the data (raw inputs, targets and sequence lengths)."""

    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def mask(self) -> np.ndarray | None:
        """Boolean [N, T] mask, true on real steps (sequences only)."""
        if self.lengths is None:
            return None
        return np.arange(self.x.shape[1])[None, :] < self.lengths[:, None]

    def graph_feeds(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of an exported graph for these rows (sequences trimmed to the longest among them)."""
        x = self.x[rows]
        mask = self.mask()
        if mask is None:
            name = IMAGE_INPUT if x.ndim == 4 else FEATURES_INPUT
            return {name: np.ascontiguousarray(x, dtype=np.float32)}
        mask = mask[rows]
        steps = max(1, int(mask.sum(axis=1).max()))
        return {
            SEQUENCE_INPUT: np.ascontiguousarray(x[:, :steps], dtype=np.float32),
            MASK_INPUT: mask[:, :steps].copy(),
        }


@dataclass(frozen=True)
class Splits:
    """Train, validation and test parts; `indices` of each refer to rows of the dataset."""

    train: Split
    validation: Split
    test: Split
    seed: int
    stratified: bool


# -------------------------------------------------------------------------------------------- load


def load_dataset(config: DataConfig, *, seed: int) -> Dataset:
    """Load (or generate, seeded) the rows a data config names.

    Raises:
        DataError: the file is missing or unreadable, the label is absent, a feature is not a number.
    """
    if config.source == "waves":
        return generate_waves(config.waves, seed=seed)
    if config.source in BUILTIN_SOURCES:
        return _load_builtin(config.source)
    assert config.path is not None  # the config validator guarantees it
    if config.source == "csv":
        assert config.label is not None
        return load_csv(
            config.path, label=config.label, task=config.resolved_task, class_names=config.class_names
        )
    return load_npz(
        config.path,
        features_key=config.features_key,
        label=config.label or "y",
        task=config.resolved_task,
        class_names=config.class_names,
    )


def _load_builtin(name: str) -> Dataset:
    if name == "digits":
        bunch = sk_datasets.load_digits()
        images = bunch.images.astype(np.float32)[:, None, :, :]
        labels = [str(int(t)) for t in bunch.target_names]
        return Dataset(
            name, "builtin:digits", "classification", "image", images, bunch.target.astype(np.int64), labels
        )
    if name == "diabetes":
        # Unscaled features: the model takes the raw clinical values and standardizes them in the graph.
        bunch = sk_datasets.load_diabetes(scaled=False)
        return Dataset(
            name,
            "builtin:diabetes",
            "regression",
            "tabular",
            bunch.data.astype(np.float32),
            bunch.target.astype(np.float32),
            feature_names=list(bunch.feature_names),
        )
    loader = {"iris": sk_datasets.load_iris, "wine": sk_datasets.load_wine}.get(
        name, sk_datasets.load_breast_cancer
    )
    bunch = loader()
    return Dataset(
        name,
        f"builtin:{name}",
        "classification",
        "tabular",
        bunch.data.astype(np.float32),
        bunch.target.astype(np.int64),
        labels=[str(t) for t in bunch.target_names],
        feature_names=[str(f) for f in bunch.feature_names],
    )


def wave(kind: str, phase: NDArray[np.float64]) -> NDArray[np.float64]:
    """One period-1 waveform of amplitude 1 evaluated at `phase` (in cycles)."""
    frac = np.mod(phase, 1.0)
    if kind == "sine":
        return np.sin(2 * np.pi * frac)
    if kind == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if kind == "sawtooth":
        return 2.0 * frac - 1.0
    if kind == "triangle":
        return 1.0 - 4.0 * np.abs(frac - 0.5)
    raise ValueError(f"unknown wave kind {kind!r}")


def generate_waves(config: WavesConfig, *, seed: int) -> Dataset:
    """Variable-length noisy waveforms, one class per shape (balanced, seeded)."""
    rng = np.random.default_rng(seed)
    n = config.n_samples
    classes = np.arange(n) % len(WAVE_KINDS)
    rng.shuffle(classes)
    lengths = rng.integers(config.min_length, config.max_length + 1, size=n)
    x = np.zeros((n, config.max_length, 1), dtype=np.float32)
    for i in range(n):
        length = int(lengths[i])
        # Short sequences get fewer cycles: a period of 3 samples cannot tell a sine from a triangle.
        max_cycles = max(config.min_cycles, min(config.max_cycles, length / config.min_steps_per_cycle))
        cycles = rng.uniform(config.min_cycles, max_cycles)
        amplitude = rng.uniform(config.min_amplitude, config.max_amplitude)
        phase = rng.uniform(0.0, 1.0) + np.arange(length) * cycles / length
        signal = wave(WAVE_KINDS[classes[i]], phase) + config.noise_std * rng.standard_normal(length)
        x[i, :length, 0] = amplitude * signal
    return Dataset(
        "waves",
        "generated:waves",
        "classification",
        "sequence",
        x,
        classes.astype(np.int64),
        labels=list(WAVE_KINDS),
        lengths=lengths.astype(np.int64),
    )


def _encode_targets(
    raw: np.ndarray, task: Task, class_names: list[str] | None, where: str
) -> tuple[np.ndarray, list[str] | None]:
    """Class names → indices (numeric labels sort numerically), or regression targets → float32."""
    if task == "regression":
        try:
            values = raw.astype(np.float64)
        except ValueError:
            raise DataError(f"{where}: regression labels must be numbers") from None
        if not np.all(np.isfinite(values)):
            raise DataError(f"{where}: regression labels must be finite numbers")
        return values.astype(np.float32), None
    try:
        numeric = raw.astype(np.float64)
        order = sorted(set(numeric.tolist()))
        names = [f"{v:g}" for v in order]
        index = {v: i for i, v in enumerate(order)}
        y = np.array([index[v] for v in numeric.tolist()], dtype=np.int64)
    except ValueError:
        text = raw.astype(str)
        names = sorted(set(text.tolist()))
        index = {v: i for i, v in enumerate(names)}
        y = np.array([index[v] for v in text.tolist()], dtype=np.int64)
    if class_names is not None:
        if len(class_names) != len(names):
            raise DataError(
                f"{where}: data.class_names has {len(class_names)} names, the data {len(names)} classes"
            )
        names = list(class_names)
    if len(names) < 2:
        raise DataError(f"{where}: classification needs at least 2 classes, found {len(names)}")
    return y, names


def load_csv(path: Path, *, label: str, task: Task, class_names: list[str] | None = None) -> Dataset:
    """A CSV file with a header row: every column but `label` is a numeric feature."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read CSV {path}: {getattr(err, 'strerror', None) or err}") from None
    if not rows:
        raise DataError(f"{path}: the CSV file is empty")
    header = [column.strip() for column in rows[0]]
    if label not in header:
        raise DataError(f"{path}: label column '{label}' is not in the header (columns: {', '.join(header)})")
    label_at = header.index(label)
    feature_columns = [i for i in range(len(header)) if i != label_at]
    if not feature_columns:
        raise DataError(f"{path}: no feature columns besides the label '{label}'")
    features = np.empty((len(rows) - 1, len(feature_columns)), dtype=np.float32)
    targets = []
    for row_number, row in enumerate(rows[1:], start=2):  # row 1 is the header
        if len(row) != len(header):
            raise DataError(f"{path}: row {row_number} has {len(row)} fields, the header has {len(header)}")
        for j, column in enumerate(feature_columns):
            features[row_number - 2, j] = _parse_number(row[column], path, header[column], row_number)
        targets.append(row[label_at].strip())
    if not targets:
        raise DataError(f"{path}: the CSV file has a header but no rows")
    y, names = _encode_targets(np.array(targets), task, class_names, f"{path} column '{label}'")
    return Dataset(
        path.stem, str(path), task, "tabular", features, y, names, [header[i] for i in feature_columns]
    )


def _parse_number(text: str, path: Path, column: str, row_number: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{path}: column '{column}' row {row_number}: {text.strip()!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataError(
            f"{path}: column '{column}' row {row_number}: {text.strip()!r} is not a finite number"
        )
    return value


def load_npz(
    path: Path, *, features_key: str, label: str, task: Task, class_names: list[str] | None = None
) -> Dataset:
    """An NPZ file with a feature array ([N, F] tabular, [N, C, H, W] images, [N, T, K] sequences) and labels.

    Sequences may come with an int array `lengths` (right padding); without it every step is real.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read NPZ {path}: {err}") from None
    for key in (features_key, label):
        if key not in arrays:
            raise DataError(f"{path}: no array '{key}' (arrays: {', '.join(sorted(arrays))})")
    x, raw_y = arrays[features_key], arrays[label]
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: array '{features_key}' has dtype {x.dtype}, features must be real numbers")
    modalities: dict[int, Modality] = {2: "tabular", 3: "sequence", 4: "image"}
    if x.ndim not in modalities:
        raise DataError(f"{path}: array '{features_key}' must be 2-D, 3-D or 4-D, not {x.ndim}-D")
    modality = modalities[x.ndim]
    if raw_y.ndim != 1 or len(raw_y) != len(x):
        raise DataError(f"{path}: '{label}' must be 1-D with one label per row of '{features_key}'")
    x = x.astype(np.float32)
    bad = np.argwhere(~np.isfinite(x.reshape(len(x), -1)))
    if len(bad):
        raise DataError(f"{path}: array '{features_key}' row {bad[0][0]} has a non-finite value")
    lengths = None
    if modality == "sequence":
        lengths = arrays.get("lengths", np.full(len(x), x.shape[1])).astype(np.int64)
        if lengths.shape != (len(x),) or lengths.min() < 1 or lengths.max() > x.shape[1]:
            raise DataError(f"{path}: 'lengths' must hold one length in 1..{x.shape[1]} per sequence")
    y, names = _encode_targets(raw_y, task, class_names, f"{path} array '{label}'")
    return Dataset(path.stem, str(path), task, modality, x, y, names, lengths=lengths)


# ------------------------------------------------------------------------------------------- split


def split_dataset(dataset: Dataset, fractions: SplitConfig, *, seed: int) -> Splits:
    """Seeded train/validation/test split, stratified by class for classification.

    Raises:
        DataError: too few rows (or too few of some class) to give every split its share.
    """
    n = len(dataset)
    n_test = max(1, round(n * fractions.test))
    n_validation = max(1, round(n * fractions.validation))
    stratified = dataset.task == "classification"
    shares = f"{fractions.train:g}/{fractions.validation:g}/{fractions.test:g}"
    if n - n_test - n_validation < 1:
        raise DataError(
            f"dataset '{dataset.name}' has {n} rows: too small to split into train/validation/test {shares}"
        )
    indices = np.arange(n)
    try:
        rest, test = train_test_split(
            indices, test_size=n_test, random_state=seed, stratify=dataset.y if stratified else None
        )
        train, validation = train_test_split(
            rest, test_size=n_validation, random_state=seed, stratify=dataset.y[rest] if stratified else None
        )
    except ValueError as err:
        raise DataError(
            f"dataset '{dataset.name}' has {n} rows: too small to split into train/validation/test {shares} "
            f"(stratified: {err})"
        ) from None
    return Splits(
        train=_take(dataset, np.sort(train)),
        validation=_take(dataset, np.sort(validation)),
        test=_take(dataset, np.sort(test)),
        seed=seed,
        stratified=stratified,
    )


def _take(dataset: Dataset, rows: np.ndarray) -> Split:
    lengths = None if dataset.lengths is None else dataset.lengths[rows]
    return Split(dataset.x[rows], dataset.y[rows], lengths, rows)
