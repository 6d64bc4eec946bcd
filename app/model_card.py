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
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

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
        return self

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
