"""Tiny real ONNX models (built with onnx.helper), valid model cards, and model repositories for tests.

Every graph follows the tensor conventions of `app/model_card.py`, so the server treats them exactly like
the shipped models. Weights come from a seeded generator: `reference_outputs` gives what a direct
onnxruntime call returns, the oracle for end-to-end tests.
"""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
from onnx import TensorProto, helper, numpy_helper

from app.model_card import (
    CARD_FILENAME,
    ONNX_FILENAME,
    CardMetrics,
    DatasetInfo,
    ModelCard,
    OnnxInfo,
    SplitInfo,
    TensorSpec,
    sha256_of,
)

OPSET = 17
IR_VERSION = 8
CLASSIFIER_LABELS = ("setosa", "versicolor", "virginica")


@dataclass(frozen=True)
class BuiltModel:
    """A graph and what its card needs to say about it."""

    proto: onnx.ModelProto
    task: str
    modality: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str] | None = None


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _classifier_head(logits: str, nodes: list[onnx.NodeProto]) -> None:
    nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
    nodes.append(helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=1, keepdims=0))


def _classifier_outputs(n_classes: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
        helper.make_tensor_value_info("label_index", TensorProto.INT64, ["N"]),
    ]


def _specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    names = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool"}
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        specs.append(TensorSpec(name=value.name, dtype=names[tensor.elem_type], shape=shape))
    return specs


def tabular_classifier(
    n_features: int = 4, labels: Sequence[str] = CLASSIFIER_LABELS, seed: int = 0
) -> BuiltModel:
    """`features` [N, F] → softmax(x W + b): `probabilities` [N, C], `label_index` [N]."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_features, len(labels))).astype(np.float32)
    bias = rng.normal(size=len(labels)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
    ]
    _classifier_head("logits", nodes)
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])]
    outputs = _classifier_outputs(len(labels))
    graph = helper.make_graph(nodes, "classifier", inputs, outputs, [_const("W", weights), _const("b", bias)])
    return BuiltModel(
        _finish(graph), "classification", "tabular", _specs(inputs), _specs(outputs), list(labels)
    )


def mlp_classifier(n_features: int, hidden: Sequence[int], n_classes: int = 10, seed: int = 5) -> BuiltModel:
    """`features` [N, F] → (MatMul, Add, Relu) per hidden layer → MatMul, Add → softmax.

    Weights are He-scaled so activations keep their size through the layers (the benchmark's models).
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current, width = "features", n_features
    for layer, size in enumerate([*hidden, n_classes]):
        weights = (rng.normal(size=(width, size)) * np.sqrt(2 / width)).astype(np.float32)
        bias = (rng.normal(size=size) * 0.1).astype(np.float32)
        initializers += [_const(f"W{layer}", weights), _const(f"b{layer}", bias)]
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"xw{layer}"]))
        nodes.append(helper.make_node("Add", [f"xw{layer}", f"b{layer}"], [f"z{layer}"]))
        current, width = f"z{layer}", size
        if layer < len(hidden):
            nodes.append(helper.make_node("Relu", [current], [f"h{layer}"]))
            current = f"h{layer}"
    _classifier_head(current, nodes)
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])]
    outputs = _classifier_outputs(n_classes)
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, initializers)
    labels = [str(i) for i in range(n_classes)]
    return BuiltModel(_finish(graph), "classification", "tabular", _specs(inputs), _specs(outputs), labels)


def tabular_regressor(n_features: int = 3, seed: int = 1) -> BuiltModel:
    """`features` [N, F] → `value` [N] = x w + b."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_features, 1)).astype(np.float32)
    bias = rng.normal(size=1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["v2"]),
        helper.make_node("Reshape", ["v2", "flat"], ["value"]),
    ]
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])]
    outputs = [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"])]
    initializers = [_const("W", weights), _const("b", bias), _const("flat", np.array([-1], dtype=np.int64))]
    graph = helper.make_graph(nodes, "regressor", inputs, outputs, initializers)
    return BuiltModel(_finish(graph), "regression", "tabular", _specs(inputs), _specs(outputs))


def multi_input_regressor(seed: int = 2) -> BuiltModel:
    """Inputs `a` [N, 2] and `b` [N, 3] → `value` [N] = concat(a, b) w."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(5, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
        helper.make_node("MatMul", ["ab", "W"], ["v2"]),
        helper.make_node("Reshape", ["v2", "flat"], ["value"]),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
    ]
    outputs = [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"])]
    graph = helper.make_graph(
        nodes,
        "multi",
        inputs,
        outputs,
        [_const("W", weights), _const("flat", np.array([-1], dtype=np.int64))],
    )
    return BuiltModel(_finish(graph), "regression", "tabular", _specs(inputs), _specs(outputs))


def image_classifier(channels: int = 1, size: int = 4, n_classes: int = 3, seed: int = 3) -> BuiltModel:
    """`image` [N, C, H, W] → flatten → linear → softmax."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(channels * size * size, n_classes)).astype(np.float32) / 10
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
    ]
    _classifier_head("logits", nodes)
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])]
    outputs = _classifier_outputs(n_classes)
    graph = helper.make_graph(nodes, "image", inputs, outputs, [_const("W", weights)])
    labels = [f"class_{i}" for i in range(n_classes)]
    return BuiltModel(_finish(graph), "classification", "image", _specs(inputs), _specs(outputs), labels)


def integer_classifier(
    n_features: int = 3, labels: Sequence[str] = ("low", "high"), seed: int = 5
) -> BuiltModel:
    """`counts` [N, F] int64 → cast to float → linear → softmax: a model whose input takes integers."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_features, len(labels))).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["counts"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
    ]
    _classifier_head("logits", nodes)
    inputs = [helper.make_tensor_value_info("counts", TensorProto.INT64, ["N", n_features])]
    outputs = _classifier_outputs(len(labels))
    graph = helper.make_graph(nodes, "integers", inputs, outputs, [_const("W", weights)])
    return BuiltModel(
        _finish(graph), "classification", "tabular", _specs(inputs), _specs(outputs), list(labels)
    )


def sequence_classifier(channels: int = 2, n_classes: int = 2, seed: int = 4) -> BuiltModel:
    """`sequence` [N, T, K] + `mask` [N, T] → masked mean over steps → linear → softmax.

    Padding steps (mask false) do not change a row's output, as with the trainer's GRU/Transformer.
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(channels, n_classes)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["sequence", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["total", "safe"], ["mean"]),
        helper.make_node("MatMul", ["mean", "W"], ["logits"]),
    ]
    _classifier_head("logits", nodes)
    inputs = [
        helper.make_tensor_value_info("sequence", TensorProto.FLOAT, ["N", "T", channels]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "T"]),
    ]
    outputs = _classifier_outputs(n_classes)
    initializers = [
        _const("W", weights),
        _const("axis1", np.array([1], dtype=np.int64)),
        _const("axis2", np.array([2], dtype=np.int64)),
        _const("one", np.array([1.0], dtype=np.float32)),
    ]
    graph = helper.make_graph(nodes, "sequence", inputs, outputs, initializers)
    labels = ["calm", "stormy"][:n_classes] if n_classes <= 2 else [f"class_{i}" for i in range(n_classes)]
    return BuiltModel(_finish(graph), "classification", "sequence", _specs(inputs), _specs(outputs), labels)


def write_model(root: Path, name: str, version: int, built: BuiltModel) -> Path:
    """Write `root/name/version/model.onnx` and a valid card with its sha256; returns the version folder."""
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_FILENAME
    onnx.save_model(built.proto, onnx_path)
    card = ModelCard(
        name=name,
        version=version,
        task=built.task,  # type: ignore[arg-type]
        modality=built.modality,  # type: ignore[arg-type]
        architecture="test fixture",
        inputs=built.inputs,
        outputs=built.outputs,
        labels=built.labels,
        dataset=DatasetInfo(
            name="synthetic",
            source="generated:tests",
            n_samples=30,
            split=SplitInfo(seed=0, stratified=False, train=10, validation=10, test=10),
        ),
        metrics=CardMetrics(test={"accuracy": 0.9} if built.task == "classification" else {"r2": 0.5}),
        onnx=OnnxInfo(sha256=sha256_of(onnx_path), size_bytes=onnx_path.stat().st_size, opset=OPSET),
        library_versions={"onnx": onnx.__version__},
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    card.write(folder / CARD_FILENAME)
    return folder


# The fixture repository: name → (version → model builder).
FIXTURE_MODELS: dict[str, dict[int, Any]] = {
    "clf": {1: lambda: tabular_classifier(seed=10), 2: lambda: tabular_classifier(seed=0)},
    "reg": {1: tabular_regressor},
    "multi": {1: multi_input_regressor},
    "img": {1: image_classifier},
    "seq": {1: sequence_classifier},
}


def build_repository(root: Path) -> Path:
    """A model repository with a classifier (two versions), a regressor, a two-input model, an image model
    and a sequence model; returns `root`."""
    for name, versions in FIXTURE_MODELS.items():
        for version, build in versions.items():
            write_model(root, name, version, build())
    return root


def copy_model(source: Path, name: str, destination: Path, new_name: str | None = None) -> None:
    """Copy every version of model `name` of repository `source` into repository `destination`, under
    `new_name` if given (its cards then say that name)."""
    target = destination / (new_name or name)
    shutil.copytree(source / name, target)
    if new_name is not None:
        for card in target.glob(f"*/{CARD_FILENAME}"):
            card.write_text(card.read_text().replace(f'"name": "{name}"', f'"name": "{new_name}"'))


def copy_repository(source: Path, destination: Path, names: Sequence[str] | None = None) -> Path:
    """A writable copy of repository `source` (every model, or only `names`) at `destination`; returns it.

    The session's `model_repository` is shared: a test that adds or changes models works on a copy.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else sorted(p.name for p in source.iterdir() if p.is_dir()):
        copy_model(source, name, destination)
    return destination


def reseal_card(folder: Path) -> None:
    """Make the card of a version folder match whatever its model.onnx now holds (sha256 and size)."""
    card = ModelCard.read(folder / CARD_FILENAME)
    onnx_path = folder / ONNX_FILENAME
    onnx_info = card.onnx.model_copy(
        update={"sha256": sha256_of(onnx_path), "size_bytes": onnx_path.stat().st_size}
    )
    card.model_copy(update={"onnx": onnx_info}).write(folder / CARD_FILENAME)


@functools.cache
def _reference_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference_outputs(
    root: Path, name: str, version: int, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What a direct, unbatched onnxruntime call on the model file returns: the oracle."""
    session = _reference_session(root / name / str(version) / ONNX_FILENAME)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


# ------------------------------------------------------------------------------------ /evaluate bodies
def csv_body(
    rows: Any, labels: Sequence[Any], label_column: str = "label", *, label_first: bool = False
) -> bytes:
    """A labelled CSV: header `f0,f1,...` and the label column (last, or first), one line per row."""
    x = np.asarray(rows)
    names = [f"f{j}" for j in range(x.shape[1])]
    header = [label_column, *names] if label_first else [*names, label_column]
    lines = [",".join(header)]
    for row, label in zip(x.tolist(), labels, strict=True):
        values = [repr(v) if isinstance(v, float) else str(v) for v in row]
        lines.append(",".join([str(label), *values] if label_first else [*values, str(label)]))
    return ("\n".join(lines) + "\n").encode()


def ndjson_body(rows: Sequence[Any], labels: Sequence[Any]) -> bytes:
    """One `{"input": row, "label": label}` per line (rows as lists, or arrays)."""
    return b"\n".join(
        orjson.dumps({"input": row, "label": label}, option=orjson.OPT_SERIALIZE_NUMPY)
        for row, label in zip(rows, labels, strict=True)
    )


def npz_body(**arrays: Any) -> bytes:
    """An NPZ archive of the arrays, as `numpy.savez` writes it."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- live server
def free_socket() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a free port (passed to uvicorn: no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


@contextlib.contextmanager
def serve_in_thread(app: Any, timeout_seconds: float = 30.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a thread; yields its base URL (`http://127.0.0.1:<port>`)."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    # Tests open hundreds of connections before a burst; on a loaded machine uvicorn's 5 s idle limit could
    # close some of them before they are used.
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_seconds)
        sock.close()


def without_ids(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`/predict` predictions without their `id` (unique per row, so two answers never share one)."""
    return [{key: value for key, value in prediction.items() if key != "id"} for prediction in predictions]
