"""ONNX export, the onnxruntime parity check, the model card and the atomic move into the repository."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from app.model_card import (
    CARD_FILENAME,
    FEATURES_INPUT,
    IMAGE_INPUT,
    INPUT_NAMES,
    LABEL_INDEX_OUTPUT,
    MASK_INPUT,
    ONNX_FILENAME,
    PROBABILITIES_OUTPUT,
    REGRESSION_OUTPUT,
    SEQUENCE_INPUT,
    CardMetrics,
    DatasetInfo,
    FloatModel,
    ModelCard,
    OnnxInfo,
    PreprocessingStep,
    QuantizationInfo,
    SplitInfo,
    TensorSpec,
    sha256_of,
    summarize_training_split,
)
from trainer.config import TrainConfig
from trainer.data import Split, Splits
from trainer.errors import ExportError
from trainer.fit import TrainResult, score_split
from trainer.metrics import confusion
from trainer.models import GraphModule, Pipeline
from trainer.quantize import (
    Comparison,
    check_quantization,
    compare,
    quantize_int8,
    quantized_name,
    quantized_version_dir,
    single_thread_session,
)
from trainer.report import plot_confusion, plot_curves, plot_predictions

log = logging.getLogger(__name__)

# Parity: |onnxruntime - torch| <= PARITY_ATOL + PARITY_RTOL * |torch| for every float output element.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
PARITY_BATCH_SIZES = (1, 7, 512)
EXAMPLE_ROWS = 3
HISTORY_FILENAME = "history.json"
CURVES_FILENAME = "curves.png"
CONFUSION_FILENAME = "confusion_matrix.png"
PREDICTIONS_FILENAME = "predictions.png"
RESERVED_FILENAMES = frozenset(
    {
        ONNX_FILENAME,
        CARD_FILENAME,
        HISTORY_FILENAME,
        CURVES_FILENAME,
        CONFUSION_FILENAME,
        PREDICTIONS_FILENAME,
    }
)
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "numpy", "scikit-learn")

TENSOR_DESCRIPTIONS = {
    FEATURES_INPUT: "raw feature values, one row per example",
    IMAGE_INPUT: "raw pixel values [channels, height, width]",
    SEQUENCE_INPUT: "raw samples [steps, channels], right-padded with zeros",
    MASK_INPUT: "true on real steps, false on padding",
    PROBABILITIES_OUTPUT: "class probabilities, rows sum to 1",
    LABEL_INDEX_OUTPUT: "index of the most probable class into labels",
    REGRESSION_OUTPUT: "predicted target value",
}


def export_onnx(
    model: Pipeline, example: dict[str, np.ndarray], path: Path, metadata_map: dict[str, str]
) -> None:
    """Export `model` as one self-contained ONNX file with dynamic batch (and sequence) axes."""
    graph = GraphModule(model).eval()
    names = INPUT_NAMES[model.modality]
    batch = torch.export.Dim("batch")
    # Dynamic axes of each input, by position: the batch, and for sequences also the steps.
    if model.modality == "sequence":
        steps = torch.export.Dim("steps")
        dynamic: tuple[dict[int, torch.export.Dim], ...] = ({0: batch, 1: steps}, {0: batch, 1: steps})
    else:
        dynamic = ({0: batch},)
    args = tuple(torch.from_numpy(example[name]) for name in names)
    with warnings.catch_warnings(), _quiet_exporter_logs():
        _ignore_exporter_warnings()
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamo=True,
            input_names=list(names),
            output_names=list(model.output_names()),
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    _strip_stack_traces(proto.graph)
    for key, value in metadata_map.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _strip_stack_traces(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node Python stack traces: they hold absolute build paths and line
    numbers, so the shipped file would change with every edit of the source and leak the build tree."""
    for node in graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attribute in node.attribute:  # control-flow bodies (Loop, Scan, If) are graphs too
            if attribute.HasField("g"):
                _strip_stack_traces(attribute.g)
            for subgraph in attribute.graphs:
                _strip_stack_traces(subgraph)


# Warnings torch 2.13's exporter raises about its own internals (checked harmless: parity still holds).
EXPORTER_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),  # its own pytree deprecation
    (FutureWarning, r"_check_is_size will be removed"),  # its own symbolic-shape helper
    (
        UserWarning,
        r"The tensor attributes .*_flat_weights.* were assigned during export",
    ),  # nn.GRU/LSTM internals
    (UserWarning, r"# The axis name: .* will not be used"),  # one Dim shared by sequence and mask
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf"),  # dynamo probing RNN weights
)


def _ignore_exporter_warnings() -> None:
    for category, message in EXPORTER_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Silence the exporter's INFO chatter (optimizer passes) and its torchvision notice for one export."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@torch.no_grad()
def check_parity(model: Pipeline, path: Path, split: Split) -> float:
    """Run batches of 1, 7 and 512 test rows through onnxruntime and torch; return the largest difference.

    Raises:
        ExportError: a float output differs by more than the tolerance, or a label index differs
            where torch's top two probabilities are not tied.
    """
    session = single_thread_session(path)
    worst = 0.0
    model.eval()
    for size in PARITY_BATCH_SIZES:
        rows = np.arange(size) % len(split)
        feeds = split.graph_feeds(rows)
        expected = [t.numpy() for t in model.outputs(*(torch.from_numpy(v) for v in feeds.values()))]
        actual = session.run(list(model.output_names()), feeds)
        for name, want, got in zip(model.output_names(), expected, actual, strict=True):
            if got.shape != want.shape:
                raise ExportError(
                    f"parity check: output '{name}' has shape {got.shape}, torch gives {want.shape}"
                )
            if name == LABEL_INDEX_OUTPUT:
                _check_labels(want, got, expected[0], size)
                continue
            diff = np.abs(got.astype(np.float64) - want)
            worst = max(worst, float(diff.max()))
            if np.any(diff > PARITY_ATOL + PARITY_RTOL * np.abs(want)):
                raise ExportError(
                    f"parity check failed: output '{name}' differs from torch by {float(diff.max()):.3g} "
                    f"on a batch of {size} (tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g}·|value|)"
                )
    return worst


def _check_labels(want: np.ndarray, got: np.ndarray, probabilities: np.ndarray, size: int) -> None:
    top_two = np.sort(probabilities, axis=1)[:, -2:] if probabilities.shape[1] > 1 else None
    tied = np.zeros(len(want), bool) if top_two is None else (top_two[:, 1] - top_two[:, 0]) <= PARITY_ATOL
    if np.any((want != got) & ~tied):
        raise ExportError(
            f"parity check failed: {LABEL_INDEX_OUTPUT!r} differs from torch on a batch of {size}"
        )


def _tensor_specs(values: Any) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
        specs.append(
            TensorSpec(
                name=value.name, dtype=dtype, shape=shape, description=TENSOR_DESCRIPTIONS.get(value.name, "")
            )
        )
    return specs


def _opset(proto: onnx.ModelProto) -> int:
    return int(next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")))


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that trained and exported the model."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_card(
    result: TrainResult,
    config: TrainConfig,
    onnx_path: Path,
    parity: float,
    test_metrics: dict[str, float],
    training_info: dict[str, Any] | None,
) -> ModelCard:
    """The model card for an exported graph (inputs/outputs read back from the graph itself)."""
    proto = onnx.load(str(onnx_path))
    dataset, splits = result.dataset, result.splits
    arch_params = {"mlp": config.model.mlp, "cnn": config.model.cnn, "gru": config.model.rnn}
    arch_params |= {"lstm": config.model.rnn, "transformer": config.model.transformer}
    hyperparameters = {
        "architecture": result.architecture,
        result.architecture: arch_params[result.architecture].model_dump(mode="json"),
        "optim": config.optim.model_dump(mode="json"),
        "preprocessing": config.preprocessing.model_dump(mode="json"),
        "seed": config.seed,
    }
    training = {
        "epochs_run": result.epochs_run,
        "max_epochs": config.optim.epochs,
        "best_epoch": result.best_epoch,
        "selection_metric": result.selection_metric,
        "train_seconds": round(result.train_seconds, 2),
        "device": "cpu",
        "world_size": 1,
        **result.distributed,  # world_size, backend, device, batch_size_per_process under torchrun
        "config": config.model_dump(mode="json"),
        **(training_info or {}),
    }
    return ModelCard(
        name=config.name,
        version=config.version,
        task=config.task,
        modality=dataset.modality,
        architecture=result.architecture,
        description=config.description,
        inputs=_tensor_specs(proto.graph.input),
        outputs=_tensor_specs(proto.graph.output),
        labels=dataset.labels if config.task == "classification" else None,
        preprocessing=[PreprocessingStep(kind=s["kind"], params=s["params"]) for s in result.preprocessing]
        + (
            [PreprocessingStep(kind="pad_mask", params={"padding": "right", "mask_input": MASK_INPUT})]
            if dataset.modality == "sequence"
            else []
        ),
        dataset=DatasetInfo(
            name=dataset.name,
            source=dataset.source,
            n_samples=len(dataset),
            n_features=dataset.n_features,
            split=SplitInfo(
                seed=splits.seed,
                stratified=splits.stratified,
                train=len(splits.train),
                validation=len(splits.validation),
                test=len(splits.test),
            ),
        ),
        hyperparameters=hyperparameters,
        training=training,
        metrics=CardMetrics(validation=_rounded(result.validation_metrics), test=_rounded(test_metrics)),
        onnx=OnnxInfo(
            sha256=sha256_of(onnx_path),
            size_bytes=onnx_path.stat().st_size,
            opset=_opset(proto),
            parity_max_abs_diff=parity,
        ),
        # The inputs as clients send them (the graph's feeds), the reference of the server's drift report.
        training_summary=summarize_training_split(
            dataset.modality,
            splits.train.graph_feeds(np.arange(len(splits.train))),
            feature_names=dataset.feature_names,
            labels=dataset.labels if config.task == "classification" else None,
            targets=splits.train.y if config.task == "classification" else None,
        ),
        library_versions=library_versions(),
        created_at=datetime.now(UTC),
    )


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in scores.items()}


def _check_extra_files(extra_files: dict[str, bytes]) -> None:
    for name in extra_files:
        if name in RESERVED_FILENAMES or Path(name).name != name or name.startswith(".") or not name:
            raise ExportError(f"extra file name {name!r} is not allowed (a plain, non-reserved file name)")


def _move_into_place(staging: Path, target: Path, replace: bool) -> None:
    """Rename the finished staging folder to the version folder (atomic on one filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if target.exists():
        if not replace:
            raise ExportError(f"{target} already exists; use --replace to overwrite it")
        retired = target.parent / f".retired-{target.name}-{uuid.uuid4().hex[:8]}"
        target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        if retired is not None:  # put the old version back rather than lose it
            retired.rename(target)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
        folder.rmdir()


def _staging_folder(output_dir: Path, name: str) -> Path:
    """A fresh hidden folder inside the repository (the server skips names starting with a dot)."""
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=output_dir))
    os.chmod(staging, 0o755)  # noqa: S103 - mkdtemp makes it private; the server may run as another user
    return staging


def build_quantized_card(
    float_card: ModelCard, float_path: Path, quantized_path: Path, comparison: Comparison
) -> ModelCard:
    """The card of a float model's int8 sibling: the float card's data, training and labels, with the
    quantized graph's file and scores and a `quantization` section saying how it was made and what changed."""
    proto = onnx.load(str(quantized_path))
    float_size, size = float_path.stat().st_size, quantized_path.stat().st_size
    parent = f"{float_card.name}/{float_card.version}"
    quantization = QuantizationInfo(
        method="dynamic",
        weight_type="int8",
        float_model=FloatModel(
            name=float_card.name,
            version=float_card.version,
            sha256=float_card.onnx.sha256,
            size_bytes=float_size,
        ),
        float_test_metrics=_rounded(comparison.float_test),
        test_metrics_change=_rounded(
            {name: value - comparison.float_test[name] for name, value in comparison.test.items()}
        ),
        test_label_agreement=(
            None if comparison.label_agreement is None else round(comparison.label_agreement, 6)
        ),
        size_ratio=round(size / float_size, 4),
        latency=comparison.latency,
    )
    return ModelCard(
        **dict(float_card)
        | {
            "name": quantized_name(float_card.name),
            "description": f"int8 dynamic quantization of {parent}"
            + (f": {float_card.description}" if float_card.description else ""),
            "inputs": _tensor_specs(proto.graph.input),
            "outputs": _tensor_specs(proto.graph.output),
            "metrics": CardMetrics(
                validation=_rounded(comparison.validation), test=_rounded(comparison.test)
            ),
            "onnx": OnnxInfo(sha256=sha256_of(quantized_path), size_bytes=size, opset=_opset(proto)),
            "quantization": quantization,
            "created_at": datetime.now(UTC),
        }
    )


def export_quantized(
    float_card: ModelCard, float_path: Path, splits: Splits, n_classes: int, staging: Path
) -> ModelCard:
    """Write the int8 dynamic quantization of the float graph and its card into `staging`.

    Raises:
        ExportError: the float graph's inputs or outputs did not survive quantization.
    """
    quantized_path = staging / ONNX_FILENAME
    quantize_int8(float_path, quantized_path, quantized_name(float_card.name))
    comparison = compare(
        float_path, quantized_path, float_card.task, n_classes, splits.validation, splits.test
    )
    card = build_quantized_card(float_card, float_path, quantized_path, comparison)
    if (card.inputs, card.outputs) != (float_card.inputs, float_card.outputs):
        raise ExportError("int8 quantization changed the graph's inputs or outputs")
    card.write(staging / CARD_FILENAME)
    quantization = card.quantization
    assert quantization is not None  # build_quantized_card sets it
    log.info(
        "int8: test %s; size %.2fx; time per row %s",
        ", ".join(
            f"{k} {v:.4f} ({quantization.test_metrics_change[k]:+.4f})" for k, v in card.metrics.test.items()
        ),
        quantization.size_ratio,
        ", ".join(
            f"batch {t.batch_size} {t.float_us_per_row:.2f} -> {t.quantized_us_per_row:.2f} us"
            for t in quantization.latency
        ),
    )
    return card


def export_model(
    result: TrainResult,
    config: TrainConfig,
    output_dir: Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    training_info: dict[str, Any] | None = None,
    replace: bool = False,
    quantize: str | None = None,
) -> Path:
    """Score the test split once, export ONNX + card + report into `output_dir/<name>/<version>/`.

    Everything is written to a staging folder inside `output_dir` and moved into place only when
    complete, so a failure leaves no half-written version behind. With `quantize="int8"` the int8
    dynamic quantization of the graph is staged too (see `trainer.quantize`) and moved into
    `output_dir/<name>-int8/<version>/` right after the float model.

    Args:
        result: the trained run.
        config: the config it was trained from (recorded in the card).
        output_dir: the model repository.
        extra_files: more files to put beside the model (e.g. `{"trials.csv": ...}`); plain names only.
        training_info: merged into the card's `training` section (e.g. a tuning summary).
        replace: overwrite an existing version instead of refusing.
        quantize: `int8` to also export the quantized sibling model; None for the float model alone.

    Returns:
        The version directory of the float model.

    Raises:
        ConfigError: an unknown `quantize`, or a name too long for the `-int8` suffix.
        ExportError: a version exists (without `replace`), a file name is not allowed, or the
            onnxruntime/torch parity check fails.
    """
    extra_files = extra_files or {}
    _check_extra_files(extra_files)
    check_quantization(quantize)
    target = output_dir / config.name / str(config.version)
    targets = [target]
    if quantize is not None:
        targets.append(quantized_version_dir(output_dir, config.name, config.version))
    for folder in targets:
        if folder.exists() and not replace:
            raise ExportError(f"{folder} already exists; use --replace to overwrite it")
    model, splits = result.model, result.splits
    n_classes = len(result.dataset.labels or ())
    test_metrics, test_predictions = score_split(model, splits.test, n_classes)
    log.info("test metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))

    created_output_dir = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    stagings = [_staging_folder(output_dir, config.name)]
    staging = stagings[0]
    try:
        onnx_path = staging / ONNX_FILENAME
        labels_meta = {"labels": json.dumps(result.dataset.labels)} if result.dataset.labels else {}
        # A batch of one would let the exporter specialise the batch axis to 1: always trace several rows.
        example = splits.train.graph_feeds(np.arange(EXAMPLE_ROWS) % len(splits.train))
        export_onnx(
            model, example, onnx_path, {"name": config.name, "version": str(config.version), **labels_meta}
        )
        parity = check_parity(model, onnx_path, splits.test)
        log.info("exported %s (parity max |diff| %.2g)", onnx_path.name, parity)
        card = build_card(result, config, onnx_path, parity, test_metrics, training_info)
        card.write(staging / CARD_FILENAME)
        (staging / HISTORY_FILENAME).write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
        plot_curves(result.history, result.selection_metric, result.best_epoch, staging / CURVES_FILENAME)
        if config.task == "classification":
            matrix = confusion(splits.test.y, test_predictions, n_classes)
            plot_confusion(matrix, result.dataset.labels or [], staging / CONFUSION_FILENAME)
        else:
            plot_predictions(splits.test.y, test_predictions, staging / PREDICTIONS_FILENAME)
        for name, content in extra_files.items():
            (staging / name).write_bytes(content)
        if quantize is not None:
            stagings.append(_staging_folder(output_dir, quantized_name(config.name)))
            export_quantized(card, onnx_path, splits, n_classes, stagings[1])
        for folder, destination in zip(stagings, targets, strict=True):
            _move_into_place(folder, destination, replace)
    except BaseException:
        for folder in stagings:
            shutil.rmtree(folder, ignore_errors=True)
        if created_output_dir:
            _remove_if_empty(output_dir)
        raise
    for folder in targets:
        log.info("wrote %s", folder)
    return target
