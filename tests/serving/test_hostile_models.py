"""Hostile model folders: each version is refused with a clear reason in `GET /models` before onnxruntime runs
it, and the good models of the same repository keep answering.

The attacker controls one folder of the repository: symlinks out of it, FIFOs, oversized files, external-data
references anywhere in the graph (initializers, sparse initializers, attribute tensors, subgraphs, functions),
truncated or corrupt bytes under a matching sha256, and absurd declared shapes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from app.main import create_app
from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard
from app.repository import MAX_DECLARED_VALUES, LoadedModel, _onnxruntime_message
from app.session import _NESTED, inspect_graph_file
from app.settings import Settings
from tests.factories import OPSET, copy_model, copy_repository, reseal_card, without_ids

WEIGHTS = np.array([[0.5], [-1.0], [2.0]], dtype=np.float32)
EXTERNAL = "the graph keeps weights in an external data file"


# ------------------------------------------------------------------------------------ graphs with weights
def _regressor(
    weight_nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto] | None = None,
    sparse_initializers: list[onnx.SparseTensorProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
) -> onnx.ModelProto:
    """`features` [N, 3] → `value` [N] = features @ W, with `W` made by `weight_nodes` or an initializer."""
    nodes = [
        *weight_nodes,
        helper.make_node("MatMul", ["features", "W"], ["xw"]),
        helper.make_node("Reshape", ["xw", "flat"], ["value"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"])],
        [*(initializers or []), numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")],
        sparse_initializer=sparse_initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("local", 1)] if functions else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=functions)


def _sparse_weights() -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(WEIGHTS.ravel(), "W")
    return helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(3, dtype=np.int64)), [3, 1])


def _weights_branch() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["W_branch"], ["W"])],
        "branch",
        [],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 1])],
        [numpy_helper.from_array(WEIGHTS, "W_branch")],
    )


def _if_weights() -> onnx.NodeProto:
    return helper.make_node(
        "If", ["condition"], ["W"], then_branch=_weights_branch(), else_branch=_weights_branch()
    )


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _with_initializer() -> onnx.ModelProto:
    return _regressor([], [numpy_helper.from_array(WEIGHTS, "W")])


def _with_sparse_initializer() -> onnx.ModelProto:
    return _regressor([], sparse_initializers=[_sparse_weights()])


def _with_constant() -> onnx.ModelProto:
    return _regressor([helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(WEIGHTS))])


def _with_sparse_constant() -> onnx.ModelProto:
    return _regressor([helper.make_node("Constant", [], ["W"], sparse_value=_sparse_weights())])


def _with_if_branch() -> onnx.ModelProto:
    condition = numpy_helper.from_array(np.array(True), "condition")
    return _regressor([_if_weights()], [condition])


def _with_nested_if_branch() -> onnx.ModelProto:
    """The weights sit in a branch of an `If` inside a branch of an `If`."""
    outer = helper.make_graph(
        [_if_weights()],
        "outer",
        [],
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 1])],
        [numpy_helper.from_array(np.array(True), "condition")],
    )
    node = helper.make_node("If", ["condition"], ["W"], then_branch=outer, else_branch=outer)
    return _regressor([node], [numpy_helper.from_array(np.array(True), "condition")])


def _with_function() -> onnx.ModelProto:
    """`W` comes from a model-local function whose body is a `Constant`."""
    body = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(WEIGHTS))
    function = helper.make_function("local", "weights", [], ["W"], [body], [helper.make_opsetid("", OPSET)])
    return _regressor([helper.make_node("weights", [], ["W"], domain="local")], functions=[function])


# Where a tensor can sit: a graph that onnxruntime loads, and the tensor in it to move to an external file.
Position = tuple[Callable[[], onnx.ModelProto], Callable[[onnx.ModelProto], onnx.TensorProto]]
SERVABLE_POSITIONS: dict[str, Position] = {
    "initializer": (_with_initializer, lambda m: m.graph.initializer[0]),
    "sparse-values": (_with_sparse_initializer, lambda m: m.graph.sparse_initializer[0].values),
    "sparse-indices": (_with_sparse_initializer, lambda m: m.graph.sparse_initializer[0].indices),
    "constant": (_with_constant, lambda m: m.graph.node[0].attribute[0].t),
    "sparse-constant": (_with_sparse_constant, lambda m: m.graph.node[0].attribute[0].sparse_tensor.values),
    "if-branch": (_with_if_branch, lambda m: _attribute(m.graph.node[0], "then_branch").g.initializer[0]),
    "nested-if-branch": (
        _with_nested_if_branch,
        lambda m: _attribute(
            _attribute(m.graph.node[0], "else_branch").g.node[0], "then_branch"
        ).g.initializer[0],
    ),
    "function": (_with_function, lambda m: m.functions[0].node[0].attribute[0].t),
}


def _with_tensor_list() -> onnx.ModelProto:
    node = helper.make_node("Custom", [], ["W"], domain="local", weights=[numpy_helper.from_array(WEIGHTS)])
    return _regressor([node])


def _with_training_graph() -> onnx.ModelProto:
    model = _with_initializer()
    model.training_info.add().initialization.initializer.append(numpy_helper.from_array(WEIGHTS, "start"))
    return model


# Places onnxruntime does not load (a custom operator's tensor list, a training graph) but the walk covers.
OTHER_POSITIONS: dict[str, Position] = {
    "attribute-tensors": (_with_tensor_list, lambda m: m.graph.node[0].attribute[0].tensors[0]),
    "training-graph": (_with_training_graph, lambda m: m.training_info[0].initialization.initializer[0]),
}


def _move_out(tensor: onnx.TensorProto, location: str = "weights.bin") -> bytes:
    """Make `tensor` point at an external file instead of holding its data; returns the data."""
    data = tensor.raw_data
    assert data, "the fixture tensors hold raw data"
    set_external_data(tensor, location=location, offset=0, length=len(data))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return data


def _external(position: Position, location: str = "weights.bin") -> tuple[bytes, bytes]:
    """(graph bytes with the tensor at `position` moved out, that tensor's data)."""
    build, pick = position
    model = build()
    data = _move_out(pick(model), location)
    return model.SerializeToString(), data


# ------------------------------------------------------------------------------------ the protobuf walk
@pytest.mark.parametrize("where", [*SERVABLE_POSITIONS, *OTHER_POSITIONS])
def test_external_data_is_found_wherever_a_tensor_sits(where: str) -> None:
    position = {**SERVABLE_POSITIONS, **OTHER_POSITIONS}[where]
    assert not inspect_graph_file(position[0]().SerializeToString()).external_data
    assert inspect_graph_file(_external(position)[0]).external_data


@pytest.mark.parametrize("where", SERVABLE_POSITIONS)
def test_the_graphs_of_the_corpus_load_when_self_contained(where: str) -> None:
    """Their refusal below is for the external data, not for a graph onnxruntime would reject anyway."""
    session = ort.InferenceSession(
        SERVABLE_POSITIONS[where][0]().SerializeToString(), providers=["CPUExecutionProvider"]
    )
    features = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(session.run(["value"], {"features": features})[0], (features @ WEIGHTS)[:, 0])


def test_a_location_alone_marks_a_tensor_external() -> None:
    """onnxruntime reads a tensor from a file when `data_location` says so, whatever else it holds."""
    model = _with_initializer()
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    assert inspect_graph_file(model.SerializeToString()).external_data


def _shaped(dims: list[int | str]) -> bytes:
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("value", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["features"], ["value"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    return model.SerializeToString()


def test_negative_axis_lengths_other_than_minus_one_are_found() -> None:
    """onnxruntime reads a negative length as a variable axis; the walk sees what the file declares. -1 is a
    common way to write a variable axis, so it is not one of them."""
    assert inspect_graph_file(_shaped(["N", -3])).negative_dimension
    assert inspect_graph_file(_shaped([-(1 << 40), 3])).negative_dimension
    assert not inspect_graph_file(_shaped([-1, 3])).negative_dimension
    assert not inspect_graph_file(_shaped(["N", 3])).negative_dimension
    assert not inspect_graph_file(_with_if_branch().SerializeToString()).negative_dimension


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x08", id="truncated-varint"),
        pytest.param(b"\x08" + b"\xff" * 10 + b"\x01", id="varint-over-10-bytes"),
        pytest.param(b"\x3a\x05ab", id="field-past-the-end"),
        pytest.param(b"\x39abc", id="fixed64-past-the-end"),
        pytest.param(b"\x0b", id="group-wire-type"),
        pytest.param(b"\x02\x00", id="field-number-0"),
    ],
)
def test_malformed_protobuf_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (any malformation)
        inspect_graph_file(data)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    length, size = bytearray(), len(payload)
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    return bytes([number << 3 | 2, *length, size]) + payload


def _subgraphs_nested(levels: int) -> bytes:
    """A model whose main graph holds a node whose attribute holds a graph whose node..., `levels` times."""
    graph = b""
    for _ in range(levels):
        graph = _field(1, _field(5, _field(6, graph)))  # graph.node → node.attribute → attribute.g
    return _field(7, graph)


def test_nesting_is_capped_where_protobuf_caps_it() -> None:
    """onnxruntime's parser refuses messages nested more than 100 deep; so does the walk, whose memory grows
    with the depth."""
    inspect_graph_file(_subgraphs_nested(32))  # 98 messages deep
    with pytest.raises(ValueError, match="nested more than 100 deep"):
        inspect_graph_file(_subgraphs_nested(40))


def test_a_truncated_graph_is_refused_wherever_it_is_cut() -> None:
    data = _with_if_branch().SerializeToString()
    graph_end = len(data) - len(helper.make_opsetid("", OPSET).SerializeToString()) - 2
    for cut in range(3, graph_end, 7):  # cuts all along the graph field (it starts after ir_version)
        with pytest.raises(ValueError):  # noqa: PT011
            inspect_graph_file(data[:cut])


# The walk's message kinds, as onnx names their types.
_KIND_TYPES = {
    "model": onnx.ModelProto,
    "main graph": onnx.GraphProto,
    "graph": onnx.GraphProto,
    "training info": onnx.TrainingInfoProto,
    "function": onnx.FunctionProto,
    "node": onnx.NodeProto,
    "attribute": onnx.AttributeProto,
    "sparse tensor": onnx.SparseTensorProto,
    "tensor": onnx.TensorProto,
    "value info": onnx.ValueInfoProto,
    "type": onnx.TypeProto,
    "tensor type": onnx.TypeProto.Tensor,
    "shape": onnx.TensorShapeProto,
    "dimension": onnx.TensorShapeProto.Dimension,
}


def test_the_walk_table_matches_onnx_and_enters_every_field_that_can_hold_a_tensor() -> None:
    """Field numbers checked against onnx's own descriptors; a field added to onnx that can lead to a
    TensorProto fails here until the walk enters it."""
    for kind, fields in _NESTED.items():
        by_number = {f.number: f for f in _KIND_TYPES[kind].DESCRIPTOR.fields}
        for number, child in fields.items():
            assert by_number[number].message_type is _KIND_TYPES[child].DESCRIPTOR, (kind, number)

    holds_tensor = {onnx.TensorProto.DESCRIPTOR}
    grew = True
    while grew:  # every message type from which a TensorProto can be reached
        reachable = {
            f.containing_type
            for message in _all_message_types(onnx.ModelProto.DESCRIPTOR)
            for f in message.fields
            if f.message_type in holds_tensor
        }
        grew = not reachable <= holds_tensor
        holds_tensor |= reachable
    for kind, message_type in _KIND_TYPES.items():
        entered = set(_NESTED.get(kind, {}))
        leading_to_tensors = {
            f.number for f in message_type.DESCRIPTOR.fields if f.message_type in holds_tensor
        }
        assert leading_to_tensors <= entered, (kind, leading_to_tensors - entered)


def _all_message_types(root: Any) -> Iterator[Any]:
    """The descriptor `root` and every message type reachable from it through its fields."""
    seen: set[Any] = set()
    pending = [root]
    while pending:
        message = pending.pop()
        if message in seen:
            continue
        seen.add(message)
        yield message
        pending.extend(f.message_type for f in message.fields if f.message_type is not None)


def test_onnxruntime_messages_lose_their_absolute_paths() -> None:
    """A real onnxruntime error naming the file it looked for (here an external file outside the folder)."""
    data, _ = _external(SERVABLE_POSITIONS["initializer"], "../../../elsewhere/weights.bin")
    with pytest.raises(Exception) as caught:  # noqa: PT011 (onnxruntime raises its own types)
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert re.search(r"\"/\w", str(caught.value)), "onnxruntime no longer names the resolved path"
    message = _onnxruntime_message(caught.value)
    assert "<path>" in message
    assert not _has_absolute_path(message)


# ------------------------------------------------------------------------------------ warm-up
def _loaded(dims: list[int | str], repository: Path) -> LoadedModel:
    """A regressor `features` → `value` (identity) of these dims, with the card of the fixture's `reg`."""
    session = ort.InferenceSession(_shaped(dims), providers=["CPUExecutionProvider"])
    card = ModelCard.model_validate_json((repository / "reg" / "1" / CARD_FILENAME).read_bytes())
    return LoadedModel(card, session)


def test_warm_up_batches_stay_small_however_wide_a_row_is(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    # 4M values a row: the larger warm-up batch takes 4 rows, not 64
    wide = _loaded(["N", 1 << 22], model_repository)
    shapes: list[tuple[int, ...]] = []
    monkeypatch.setattr(wide, "run", lambda inputs: shapes.append(inputs["features"].shape))
    wide.warm_up(64)
    assert shapes == [(1, 1 << 22), (MAX_DECLARED_VALUES >> 22, 1 << 22)]


def test_warm_up_of_a_fixed_batch_axis_uses_it(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    fixed = _loaded([2, 3], model_repository)
    shapes: list[tuple[int, ...]] = []
    run = fixed.run
    monkeypatch.setattr(fixed, "run", lambda inputs: shapes.append(inputs["features"].shape) or run(inputs))
    fixed.warm_up(64)  # onnxruntime refuses any batch size but 2
    assert shapes == [(2, 3)]


# ------------------------------------------------------------------------------------ the served corpus
MAX_MODEL_BYTES = 200_000
SERVED = ("reg", "clf", "alias", "shared-graph", "fixed-batch", "minus-one-batch")
EXPECTED_REASONS = {
    "symlink-folder": "the folder symlink-folder/1 resolves outside the model repository",
    "symlink-name": "the folder symlink-name/1 resolves outside the model repository",
    "symlink-graph": "model.onnx resolves outside the model repository",
    "symlink-card": "model.json resolves outside the model repository",
    "symlink-loop": "cannot resolve model.onnx: a symlink loop or an unreadable folder",
    "fifo-card": "model.json is not a regular file",
    "folder-graph": "model.onnx is not a regular file",
    "huge-card": "model.json is larger than 1048576 bytes (a card takes a few KiB)",
    "json-card": "invalid model card: card: Invalid JSON",
    "large-graph": f"model.onnx is larger than {MAX_MODEL_BYTES} bytes (MODELSERVE_MAX_MODEL_BYTES)",
    "sha": "sha256 of model.onnx is",
    "truncated": "model.onnx is not an ONNX protobuf (truncated or corrupt)",
    "unknown-op": "onnxruntime cannot load the graph: [ONNXRuntimeError] : 10 : INVALID_GRAPH",
    "corrupt-text": "onnxruntime cannot load the graph: its error message is not valid text",
    "external-escape": EXTERNAL,
    **{f"external-{where}": EXTERNAL for where in SERVABLE_POSITIONS},
    "wide-input": f"the inputs declare {1 << 25} values per row (variable axes counted as 1), more than",
    "wide-output": f"the outputs declare {1 << 25} values per row",
    "zero-axis": "input 'features' declares an axis of length 0: [-1, 0]",
    "negative-axis": "an input or output of the graph declares a negative axis length other than -1",
    "many-axes": "input 'features' declares 9 axes, more than 8",
}


def _summing(in_dims: list[int | str], out_dims: list[int | str], axes: list[int]) -> bytes:
    """`value` = the sum of `features` over `axes`."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, in_dims)
    y = helper.make_tensor_value_info("value", TensorProto.FLOAT, out_dims)
    node = helper.make_node("ReduceSum", ["features", "axes"], ["value"], keepdims=0)
    axes_tensor = numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")
    graph = helper.make_graph([node], "summing", [x], [y], [axes_tensor])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8
    ).SerializeToString()


def _identity(in_dims: list[int | str], out_dims: list[int | str]) -> bytes:
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, in_dims)
    y = helper.make_tensor_value_info("value", TensorProto.FLOAT, out_dims)
    graph = helper.make_graph([helper.make_node("Identity", ["features"], ["value"])], "id", [x], [y])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8
    ).SerializeToString()


@pytest.fixture(scope="module")
def hostile_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good fixture models `reg` and `clf`, good symlinked ones, and one hostile model per entry of
    `EXPECTED_REASONS`; served through a symlink to the repository (allowed: the root is resolved)."""
    base = tmp_path_factory.mktemp("hostile")
    root = copy_repository(model_repository, base / "models", names=["reg", "clf"])
    outside = base / "outside"
    outside.mkdir()

    def regressor_copy(name: str, into: Path = root) -> Path:
        copy_model(model_repository, "reg", into, new_name=name)
        return into / name / "1"

    def replace_graph(name: str, data: bytes) -> Path:
        folder = regressor_copy(name)
        (folder / ONNX_FILENAME).write_bytes(data)
        reseal_card(folder)
        return folder

    # Symlinks that stay inside the repository are fine: a model folder, a shared graph file.
    regressor_copy("alias", root / ".store")
    (root / "alias").symlink_to(Path(".store") / "alias")
    folder = regressor_copy("shared-graph")
    (folder / ONNX_FILENAME).unlink()
    (folder / ONNX_FILENAME).symlink_to(Path("..", "..", "reg", "1", ONNX_FILENAME))
    replace_graph("fixed-batch", _summing([1, 3], [1], [1]))
    replace_graph("minus-one-batch", _summing([-1, 3], [-1], [1]))  # -1: a variable axis

    # Symlinks out: a valid version elsewhere, reached through the version folder, the model folder, a file.
    (root / "symlink-folder").mkdir()
    (root / "symlink-folder" / "1").symlink_to(regressor_copy("symlink-folder", outside / "a"))
    regressor_copy("symlink-name", outside)
    (root / "symlink-name").symlink_to(outside / "symlink-name")
    for name, filename in (("symlink-graph", ONNX_FILENAME), ("symlink-card", CARD_FILENAME)):
        elsewhere = regressor_copy(name, outside / "b")
        folder = regressor_copy(name)
        (folder / filename).unlink()
        (folder / filename).symlink_to(elsewhere / filename)
    folder = regressor_copy("symlink-loop")
    (folder / ONNX_FILENAME).unlink()
    (folder / ONNX_FILENAME).symlink_to(ONNX_FILENAME)

    # Files that are not what they claim: a FIFO card (reading it would wait forever), a folder for a graph.
    folder = regressor_copy("fifo-card")
    (folder / CARD_FILENAME).unlink()
    os.mkfifo(folder / CARD_FILENAME)
    folder = regressor_copy("folder-graph")
    (folder / ONNX_FILENAME).unlink()
    (folder / ONNX_FILENAME).mkdir()

    # Cards: over the size limit (valid JSON all the same), not JSON.
    folder = regressor_copy("huge-card")
    card = json.loads((folder / CARD_FILENAME).read_text())
    (folder / CARD_FILENAME).write_text(json.dumps({**card, "description": "x" * (1 << 20)}))
    (regressor_copy("json-card") / CARD_FILENAME).write_text('{"name": "json-card", ')

    # Graph files: too large, not the card's, truncated, corrupt under a matching sha256.
    reg_bytes = (root / "reg" / "1" / ONNX_FILENAME).read_bytes()
    padded = onnx.load_from_string(reg_bytes)
    padded.doc_string = "x" * MAX_MODEL_BYTES
    replace_graph("large-graph", padded.SerializeToString())
    (regressor_copy("sha") / ONNX_FILENAME).write_bytes(reg_bytes + b"\0")
    replace_graph("truncated", reg_bytes[: len(reg_bytes) // 2])
    replace_graph("unknown-op", reg_bytes.replace(b"MatMul", b"MatMux"))
    replace_graph("corrupt-text", reg_bytes.replace(b"Reshape", b"Reshap\xff"))

    # External data: a file outside the folder, and a file beside the graph in every place a tensor can sit.
    data, weights = _external(SERVABLE_POSITIONS["initializer"], "../../../outside/weights.bin")
    (outside / "weights.bin").write_bytes(weights)
    replace_graph("external-escape", data)
    for where, position in SERVABLE_POSITIONS.items():
        data, weights = _external(position)
        (replace_graph(f"external-{where}", data) / "weights.bin").write_bytes(weights)

    # Absurd declared shapes.
    replace_graph("wide-input", _summing(["N", 1 << 25], ["N"], [1]))
    replace_graph("wide-output", _identity(["N", "K"], ["N", 1 << 25]))
    replace_graph("zero-axis", _summing(["N", 0], ["N"], [1]))
    replace_graph("negative-axis", _summing(["N", -3], ["N"], [1]))
    replace_graph("many-axes", _summing(["N", *[1] * 8], ["N"], list(range(1, 9))))

    link = base / "link-to-models"
    link.symlink_to(root)
    return link


@pytest.fixture(scope="module")
def hostile_client(hostile_repository: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=hostile_repository, max_model_bytes=MAX_MODEL_BYTES, access_log=False
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _has_absolute_path(text: str) -> bool:
    return re.search(r"(?:^|[\s\"'(\[=:])/\w", text) is not None


def test_every_hostile_version_is_refused_with_its_reason(
    hostile_client: TestClient, hostile_repository: Path
) -> None:
    models = {m["name"]: m for m in hostile_client.get("/models").json()["models"]}
    assert set(models) == {*SERVED, *EXPECTED_REASONS}
    for name, reason in EXPECTED_REASONS.items():
        model = models[name]
        assert (model["version"], model["state"]) == (1, "failed"), name
        assert model["reason"].startswith(reason), (name, model["reason"])
        assert not _has_absolute_path(model["reason"]), (name, model["reason"])
        assert str(hostile_repository.parent) not in model["reason"], name
        assert "Traceback" not in model["reason"], name


def test_the_good_models_still_answer(hostile_client: TestClient) -> None:
    models = {m["name"]: m for m in hostile_client.get("/models").json()["models"]}
    assert {name: models[name]["state"] for name in SERVED} == dict.fromkeys(SERVED, "ready")
    bodies = {
        "reg": [[1, 2, 3]],
        "alias": [[1, 2, 3]],
        "shared-graph": [[1, 2, 3]],
        "clf": [[1, 2, 3, 4]],
        "fixed-batch": [[1, 2, 3]],
        "minus-one-batch": [[1, 2, 3], [4, 5, 6]],
    }
    answers = {}
    for name, inputs in bodies.items():
        answer = hostile_client.post("/predict", json={"model": name, "inputs": inputs})
        assert answer.status_code == 200, (name, answer.text)
        answers[name] = without_ids(answer.json()["predictions"])
    assert answers["alias"] == answers["shared-graph"] == answers["reg"]
    assert answers["fixed-batch"] == [{"value": pytest.approx(6.0)}]
    assert answers["minus-one-batch"] == [{"value": pytest.approx(6.0)}, {"value": pytest.approx(15.0)}]
    assert hostile_client.get("/v2/health/ready").status_code == 200


def test_a_refused_version_answers_503_with_its_reason(hostile_client: TestClient) -> None:
    refused = hostile_client.post("/predict", json={"model": "symlink-graph", "inputs": [[1, 2, 3]]})
    assert refused.status_code == 503
    assert "model.onnx resolves outside the model repository" in refused.json()["error"]
