"""The model card: the contract between `trainer/` (which writes it) and `app/` (which validates it).

A card sits beside every exported graph as `models/<name>/<version>/model.json`. The server refuses a
model whose `onnx.sha256` does not match the file, and takes class labels, the task and the recorded
test metrics from here.

Tensor conventions every exported model follows (the server relies on them):

* classification: outputs `probabilities` (float32, `[-1, n_classes]`, rows sum to 1) and
  `label_index` (int64, `[-1]`); `labels[i]` names class `i`.
* regression: output `value` (float32, `[-1]`).
* tabular input `features` (float32, `[-1, n_features]`); image input `image` (float32,
  `[-1, channels, height, width]`, raw pixels); sequence inputs `sequence` (float32,
  `[-1, -1, n_channels]`, right-padded) and `mask` (bool, `[-1, -1]`, true on real steps).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_FILENAME = "model.json"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
ONNX_FILENAME = "model.onnx"
SCHEMA_VERSION = 1

Task = Literal["classification", "regression"]
Modality = Literal["tabular", "image", "sequence"]

# Names of the tensors the conventions above fix: the trainer writes graphs with them, the server reads them.
FEATURES_INPUT = "features"
IMAGE_INPUT = "image"
SEQUENCE_INPUT = "sequence"
MASK_INPUT = "mask"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_INDEX_OUTPUT = "label_index"
REGRESSION_OUTPUT = "value"

# The graph inputs of each modality and the graph outputs of each task, in order.
INPUT_NAMES: dict[Modality, tuple[str, ...]] = {
    "tabular": (FEATURES_INPUT,),
    "image": (IMAGE_INPUT,),
    "sequence": (SEQUENCE_INPUT, MASK_INPUT),
}
OUTPUT_NAMES: dict[Task, tuple[str, ...]] = {
    "classification": (PROBABILITIES_OUTPUT, LABEL_INDEX_OUTPUT),
    "regression": (REGRESSION_OUTPUT,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output."""

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32, int64, bool")
    shape: list[int] = Field(description="dimensions with the batch axis first; -1 marks a variable axis")
    description: str = ""


class PreprocessingStep(_Strict):
    """One transform applied to raw input; `in_graph` says it is folded into the ONNX graph."""

    kind: str = Field(description="standardize | minmax | grayscale | binarize | denoise | pad_mask | ...")
    params: dict[str, Any] = Field(default_factory=dict)
    in_graph: bool = True


class SplitInfo(_Strict):
    """How the data was divided; sizes are row counts."""

    seed: int
    stratified: bool
    train: int = Field(ge=1)
    validation: int = Field(ge=1)
    test: int = Field(ge=1)


class DatasetInfo(_Strict):
    """Where the data came from."""

    name: str
    source: str = Field(description="builtin:<name>, generated:<name>, or the path of a user file")
    n_samples: int = Field(ge=1)
    n_features: int | None = None
    split: SplitInfo


class OnnxInfo(_Strict):
    """The exported graph file."""

    file: str = ONNX_FILENAME
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1)
    opset: int = Field(ge=1)
    parity_max_abs_diff: float | None = Field(
        default=None, description="largest |onnxruntime - torch| seen in the export parity check"
    )


class CardMetrics(_Strict):
    """The card's scores: on the validation (selection) and test (reported once) splits."""

    validation: dict[str, Any] = Field(default_factory=dict)
    test: dict[str, Any] = Field(default_factory=dict)


class FloatModel(_Strict):
    """The float model a quantized graph was made from."""

    name: str
    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1)


class LatencyChange(_Strict):
    """Median time per row at one batch size: the float and the quantized graph in the same onnxruntime
    CPU session options (one intra-op thread), measured alternately on the same test rows."""

    batch_size: int = Field(ge=1)
    float_us_per_row: float = Field(gt=0)
    quantized_us_per_row: float = Field(gt=0)
    speedup: float = Field(gt=0, description="float time / quantized time: above 1 is faster, below 1 slower")


class QuantizationInfo(_Strict):
    """How a quantized graph was made from a float model and what it changed, measured on the test split
    with onnxruntime (the float graph scored the same way, so the changes are the quantization's alone)."""

    method: Literal["dynamic"] = Field(
        description="weights quantized ahead of time; activations quantized (uint8) per batch at run time"
    )
    weight_type: Literal["int8"]
    float_model: FloatModel
    float_test_metrics: dict[str, float] = Field(description="the float graph's test scores")
    test_metrics_change: dict[str, float] = Field(description="quantized minus float, per test metric")
    test_label_agreement: float | None = Field(
        default=None, ge=0, le=1, description="classification: share of test rows given the same class"
    )
    size_ratio: float = Field(gt=0, description="quantized file size / float file size")
    latency: list[LatencyChange] = Field(default_factory=list)


SUMMARY_BINS = 10
"""Quantile bins per tracked quantity of a training summary (fewer where quantiles coincide)."""
MAX_SUMMARY_FEATURES = 64
"""Most quantities a training summary tracks: a wider tabular input has its first 64 columns tracked."""

Statistic = Literal["value", "mean", "std", "nonzero_fraction", "length"]
# The per-row quantities tracked for images and sequences (tabular rows are tracked column by column).
ROW_STATISTICS: dict[Modality, tuple[Statistic, ...]] = {
    "image": ("mean", "std", "nonzero_fraction"),
    "sequence": ("length", "mean", "std"),
}


class BinnedFeature(_Strict):
    """One quantity computed per input row, and how the training split's rows spread over its bins."""

    name: str = Field(min_length=1, max_length=128, description="the column's name, or the statistic's")
    statistic: Statistic = Field(
        description="value: one column of `features`; mean | std | nonzero_fraction: over a row's values "
        "(a sequence's real steps only); length: a sequence's real steps"
    )
    column: int | None = Field(default=None, ge=0, description="the column of a `value` quantity")
    edges: list[float] = Field(
        description="interior bin edges, increasing: bin 0 is below edges[0], bin i holds "
        "edges[i-1] <= x < edges[i], the last bin is from edges[-1] up"
    )
    fractions: list[float] = Field(description="share of the training rows in each bin (one more than edges)")

    @model_validator(mode="after")
    def _consistent(self) -> BinnedFeature:
        if (self.statistic == "value") != (self.column is not None):
            raise ValueError("a 'column' is given exactly for the 'value' statistic")
        if not all(math.isfinite(edge) for edge in self.edges) or any(
            low >= high for low, high in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise ValueError("'edges' must be finite and strictly increasing")
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError("'fractions' needs one share per bin: one more than 'edges'")
        if any(not 0 <= share <= 1 for share in self.fractions) or abs(sum(self.fractions) - 1) > 1e-3:
            raise ValueError("'fractions' must be shares in [0, 1] that sum to 1")
        return self


class TrainingSummary(_Strict):
    """A compact picture of the training split's inputs (and classes), the reference of input drift."""

    rows: int = Field(ge=1, description="training rows summarised")
    features: list[BinnedFeature] = Field(min_length=1, max_length=MAX_SUMMARY_FEATURES)
    class_priors: dict[str, float] | None = Field(
        default=None, description="classification: share of each label among the training rows"
    )


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bin of each value (see `BinnedFeature.edges`)."""
    return np.searchsorted(edges, values, side="right")


def row_statistics(
    features: Sequence[BinnedFeature], modality: Modality, inputs: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Each tracked quantity of each row of a model's graph inputs: float64 `[rows, len(features)]`."""
    data = np.asarray(inputs[INPUT_NAMES[modality][0]])
    if modality == "tabular":  # `value` quantities only (the card checks it): the columns themselves
        columns = [feature.column or 0 for feature in features]
        return data[:, columns].astype(np.float64)
    flat = data.reshape(len(data), -1).astype(np.float64)
    steps = np.asarray(inputs[MASK_INPUT], dtype=bool) if modality == "sequence" else None
    if steps is None:
        count: Any = flat.shape[1]
    else:  # only the real steps count: padding is zeroed (each step's channels are consecutive in `flat`)
        weights = np.repeat(steps, flat.shape[1] // max(steps.shape[1], 1), axis=1)
        flat *= weights
        count = np.maximum(weights.sum(axis=1), 1)
    mean = flat.sum(axis=1) / count
    out = np.empty((len(data), len(features)))
    for j, feature in enumerate(features):
        if feature.statistic == "mean":
            out[:, j] = mean
        elif feature.statistic == "std":
            out[:, j] = np.sqrt(np.maximum(np.einsum("ij,ij->i", flat, flat) / count - mean * mean, 0.0))
        elif feature.statistic == "nonzero_fraction":
            out[:, j] = np.count_nonzero(flat, axis=1) / count
        elif feature.statistic == "length" and steps is not None:
            out[:, j] = steps.sum(axis=1)
        else:
            raise ValueError(f"a {modality} input has no per-row {feature.statistic!r}")
    return out


def summarize_training_split(
    modality: Modality,
    inputs: Mapping[str, np.ndarray],
    *,
    feature_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
) -> TrainingSummary:
    """The training summary of a split, from its graph inputs (what clients send) and class targets.

    Tabular rows are tracked per column (the first `MAX_SUMMARY_FEATURES`), named by `feature_names` when
    those are unique and complete; images and sequences by the quantities of `ROW_STATISTICS`.
    """
    if modality == "tabular":
        width = int(inputs[FEATURES_INPUT].shape[1])
        names = list(feature_names or [])
        if len(names) != width or len(set(names)) != width:
            names = [f"feature_{i}" for i in range(width)]
        shells = [
            BinnedFeature(name=names[i], statistic="value", column=i, edges=[], fractions=[1.0])
            for i in range(min(width, MAX_SUMMARY_FEATURES))
        ]
    else:
        shells = [
            BinnedFeature(name=statistic, statistic=statistic, edges=[], fractions=[1.0])
            for statistic in ROW_STATISTICS[modality]
        ]
    values = row_statistics(shells, modality, inputs)
    rows = len(values)
    quantiles = np.linspace(0, 1, SUMMARY_BINS + 1)[1:-1]
    features = []
    for j, shell in enumerate(shells):
        # Rounded for a compact card; the training shares are counted against the rounded edges.
        edges = np.unique([float(f"{q:.6g}") for q in np.quantile(values[:, j], quantiles)])
        counts = np.bincount(bin_index(edges, values[:, j]), minlength=len(edges) + 1)
        shares = [round(float(c) / rows, 6) for c in counts]
        features.append(shell.model_copy(update={"edges": edges.tolist(), "fractions": shares}))
    priors = None
    if labels is not None and targets is not None:
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(labels))
        priors = {label: round(float(c) / len(targets), 6) for label, c in zip(labels, counts, strict=True)}
    return TrainingSummary(rows=rows, features=features, class_priors=priors)


class ModelCard(_Strict):
    """Everything needed to serve, audit and reproduce one model version."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1)
    task: Task
    modality: Modality
    architecture: str
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] | None = None
    preprocessing: list[PreprocessingStep] = Field(default_factory=list)
    dataset: DatasetInfo
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(
        default_factory=dict, description="epochs run, best epoch, tuning summary, distributed world size"
    )
    metrics: CardMetrics
    onnx: OnnxInfo
    quantization: QuantizationInfo | None = Field(
        default=None, description="present on a quantized graph: how it was made and what it changed"
    )
    training_summary: TrainingSummary | None = Field(
        default=None, description="the training split's inputs binned, the reference of input drift"
    )
    library_versions: dict[str, str] = Field(default_factory=dict)
    created_at: datetime

    @model_validator(mode="after")
    def _labels_match_task(self) -> ModelCard:
        if self.task == "classification":
            if not self.labels:
                raise ValueError("a classification card needs a non-empty 'labels' list")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("'labels' must not repeat a class name")
        elif self.labels:
            raise ValueError("a regression card must not carry 'labels'")
        if self.training_summary is not None:
            self._check_summary(self.training_summary)
        return self

    def _check_summary(self, summary: TrainingSummary) -> None:
        names = [feature.name for feature in summary.features]
        if len(set(names)) != len(names):
            raise ValueError("'training_summary' must not repeat a feature name")
        missing = set(INPUT_NAMES[self.modality]) - {spec.name for spec in self.inputs}
        if missing:
            raise ValueError(
                f"'training_summary' of a {self.modality} card needs the inputs {sorted(missing)}"
            )
        allowed = ("value",) if self.modality == "tabular" else ROW_STATISTICS[self.modality]
        width = next((spec.shape[1] for spec in self.inputs if spec.name == FEATURES_INPUT), -1)
        for feature in summary.features:
            if feature.statistic not in allowed:
                raise ValueError(
                    f"'training_summary' of a {self.modality} card cannot track {feature.statistic!r}"
                )
            if feature.column is not None and width > 0 and feature.column >= width:
                raise ValueError(f"'training_summary' tracks column {feature.column} of {width} features")
        priors = summary.class_priors
        if priors is not None and set(priors) != set(self.labels or ()):
            raise ValueError(
                "'training_summary.class_priors' needs one share per label (classification only)"
            )

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Parse and validate a card file (raises `pydantic.ValidationError` or `OSError`)."""
        return cls.model_validate_json(path.read_bytes())

    def write(self, path: Path) -> None:
        """Write the card as indented JSON."""
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
