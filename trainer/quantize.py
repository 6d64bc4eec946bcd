"""int8 dynamic quantization of an exported graph, and how it compares with the float graph.

The quantized graph is served as a model of its own, `<name>-int8`, with the float model's version:
the server serves the highest version of each name, so a quantized graph filed as another version of
`<name>` would hide the float one (or be hidden by it). As a sibling model both are served side by
side, a client picks one by name, `/evaluate` scores both on the same data, and the shared version
number ties the int8 model to the float model it was made from.

Dynamic quantization stores the weights of matrix products, convolutions and LSTMs as int8 (GRUs stay
float) and quantizes activations to uint8 per batch at run time. It needs no calibration data, but it
does not always run faster: the card records the measured latency rather than assuming a speed-up.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from app.model_card import (
    LABEL_INDEX_OUTPUT,
    MODEL_NAME_PATTERN,
    REGRESSION_OUTPUT,
    LatencyChange,
    Task,
)
from trainer.data import Split
from trainer.errors import ConfigError
from trainer.fit import EVAL_BATCH_SIZE
from trainer.metrics import classification_scores, regression_scores

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
QUANTIZED_SUFFIX = "-int8"
# Runs of each graph per batch size: enough for a stable median, short enough for every export.
LATENCY_RUNS = {1: 300, 512: 20}
WARM_UP_RUNS = 3


def check_quantization(value: str | None) -> None:
    """Raises `ConfigError` unless `value` is None or a supported quantization."""
    if value is not None and value not in QUANTIZATIONS:
        raise ConfigError(f"--quantize: {value!r} is not supported; use {', '.join(QUANTIZATIONS)}")


def quantized_name(name: str) -> str:
    """The repository name of a model's int8 sibling (`wine` → `wine-int8`).

    Raises:
        ConfigError: the name is too long to take the suffix.
    """
    quantized = f"{name}{QUANTIZED_SUFFIX}"
    if not re.fullmatch(MODEL_NAME_PATTERN, quantized):
        raise ConfigError(
            f"name {name!r} is too long for --quantize: {quantized!r} must match {MODEL_NAME_PATTERN}"
        )
    return quantized


def quantized_version_dir(output_dir: Path, name: str, version: int) -> Path:
    """Where the int8 sibling of `<name>/<version>` goes in a model repository."""
    return output_dir / quantized_name(name) / str(version)


def single_thread_session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session with one intra-op and one inter-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Drop the quantizer's notice that the graph was not pre-processed (shape inference and graph
    fusion before quantizing): the exported graph is quantized as it is, so the notice is only noise."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()  # the quantizer logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_int8(float_path: Path, quantized_path: Path, name: str) -> None:
    """Write the dynamic int8 quantization of the graph at `float_path` as one self-contained file.

    `name` replaces the `name` entry of the graph's metadata (the version and labels stay).
    """
    with _without_preprocessing_advice():
        quantize_dynamic(float_path, quantized_path, weight_type=QuantType.QInt8)
    proto = onnx.load(str(quantized_path))
    for prop in proto.metadata_props:
        if prop.key == "name":
            prop.value = name
    onnx.save(proto, str(quantized_path))


def predict(session: ort.InferenceSession, split: Split, task: Task) -> np.ndarray:
    """Predicted class indices (classification) or values (regression) for every row of a split."""
    output = LABEL_INDEX_OUTPUT if task == "classification" else REGRESSION_OUTPUT
    chunks = []
    for start in range(0, len(split), EVAL_BATCH_SIZE):
        rows = np.arange(start, min(start + EVAL_BATCH_SIZE, len(split)))
        (values,) = session.run([output], split.graph_feeds(rows))
        chunks.append(values.reshape(len(rows)))
    return np.concatenate(chunks)


def scores(task: Task, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """The card's test scores of a task, computed from predictions (no loss: a graph has no logits)."""
    if task == "classification":
        return classification_scores(y_true, y_pred, n_classes)
    return regression_scores(y_true, y_pred)


def measure_latency(
    float_session: ort.InferenceSession, quantized_session: ort.InferenceSession, split: Split
) -> list[LatencyChange]:
    """Median time per row of both graphs at each batch size of `LATENCY_RUNS`, on rows of `split`.

    The two graphs run alternately, so a machine that gets busier or quieter meanwhile slows both alike.
    """
    changes = []
    for batch_size, runs in LATENCY_RUNS.items():
        feeds = split.graph_feeds(np.arange(batch_size) % len(split))
        sessions = (float_session, quantized_session)
        for session in sessions:
            for _ in range(WARM_UP_RUNS):
                session.run(None, feeds)
        seconds: tuple[list[float], list[float]] = ([], [])
        for _ in range(runs):
            for session, times in zip(sessions, seconds, strict=True):
                started = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - started)
        float_us, quantized_us = (statistics.median(times) / batch_size * 1e6 for times in seconds)
        changes.append(
            LatencyChange(
                batch_size=batch_size,
                float_us_per_row=round(float_us, 4),
                quantized_us_per_row=round(quantized_us, 4),
                speedup=round(float_us / quantized_us, 3),
            )
        )
    return changes


@dataclass(frozen=True)
class Comparison:
    """The quantized graph against the float graph, both run by onnxruntime on the same rows.

    Attributes:
        float_test: the float graph's test scores.
        test: the quantized graph's test scores.
        validation: the quantized graph's validation scores.
        label_agreement: classification: share of test rows both graphs give the same class; else None.
        latency: median time per row of both graphs at batch 1 and at a large batch.
    """

    float_test: dict[str, float]
    test: dict[str, float]
    validation: dict[str, float]
    label_agreement: float | None
    latency: list[LatencyChange]


def compare(
    float_path: Path, quantized_path: Path, task: Task, n_classes: int, validation: Split, test: Split
) -> Comparison:
    """Score both graphs on the test split (and the quantized one on the validation split) and time them."""
    float_session = single_thread_session(float_path)
    quantized_session = single_thread_session(quantized_path)
    float_predictions = predict(float_session, test, task)
    quantized_predictions = predict(quantized_session, test, task)
    agreement = None
    if task == "classification":
        agreement = float(np.mean(float_predictions == quantized_predictions))
    return Comparison(
        float_test=scores(task, test.y, float_predictions, n_classes),
        test=scores(task, test.y, quantized_predictions, n_classes),
        validation=scores(task, validation.y, predict(quantized_session, validation, task), n_classes),
        label_agreement=agreement,
        latency=measure_latency(float_session, quantized_session, test),
    )
