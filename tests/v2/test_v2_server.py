"""The stock `tritonclient` (sync and asyncio HTTP clients) against a real uvicorn server.

The server serves the fixture repository (`tests/factories.py`) plus `dtypes`, an identity model with one
input and output per fixed-size V2 datatype, and runs with the repository extension on (its "off" answer
is checked on an app of its own).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from app import validation
from app.errors import InvalidInput
from app.main import create_app
from app.model_card import TensorSpec
from app.settings import Settings
from app.v2 import codec
from tests.factories import (
    CLASSIFIER_LABELS,
    BuiltModel,
    _finish,
    copy_model,
    copy_repository,
    reference_outputs,
    serve_in_thread,
    write_model,
)

# V2 datatype → (ONNX element type, numpy dtype) of the `dtypes` model's inputs `in_<T>` / outputs `out_<T>`.
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (TensorProto.BOOL, np.dtype(bool)),
    "INT8": (TensorProto.INT8, np.dtype(np.int8)),
    "INT16": (TensorProto.INT16, np.dtype(np.int16)),
    "INT32": (TensorProto.INT32, np.dtype(np.int32)),
    "INT64": (TensorProto.INT64, np.dtype(np.int64)),
    "UINT8": (TensorProto.UINT8, np.dtype(np.uint8)),
    "UINT16": (TensorProto.UINT16, np.dtype(np.uint16)),
    "UINT32": (TensorProto.UINT32, np.dtype(np.uint32)),
    "UINT64": (TensorProto.UINT64, np.dtype(np.uint64)),
    "FP16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "FP32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "FP64": (TensorProto.DOUBLE, np.dtype(np.float64)),
}


def dtype_identity_model() -> BuiltModel:
    """`in_<T>` [N, 3] → `out_<T>` (Identity) for every datatype, and `value` [N] = row sums of `in_FP32`."""
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in DTYPES]
    nodes.append(helper.make_node("ReduceSum", ["in_FP32", "axis1"], ["value"], keepdims=0))
    inputs = [
        helper.make_tensor_value_info(f"in_{t}", onnx_type, ["N", 3]) for t, (onnx_type, _) in DTYPES.items()
    ]
    outputs = [
        helper.make_tensor_value_info(f"out_{t}", onnx_type, ["N", 3]) for t, (onnx_type, _) in DTYPES.items()
    ]
    outputs.append(helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"]))
    axis = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "dtypes", inputs, outputs, [axis])
    specs_in = [
        TensorSpec(name=f"in_{t}", dtype=dtype.name, shape=[-1, 3]) for t, (_, dtype) in DTYPES.items()
    ]
    specs_out = [
        TensorSpec(name=f"out_{t}", dtype=dtype.name, shape=[-1, 3]) for t, (_, dtype) in DTYPES.items()
    ]
    specs_out.append(TensorSpec(name="value", dtype="float32", shape=[-1]))
    return BuiltModel(_finish(graph), "regression", "tabular", specs_in, specs_out)


def dtype_samples(rows: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """One array per datatype, spanning each type's extremes."""
    rng = np.random.default_rng(seed)
    samples = {}
    for datatype, (_, dtype) in DTYPES.items():
        if dtype.kind == "b":
            array = rng.integers(0, 2, size=(rows, 3)).astype(bool)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, size=(rows, 3), dtype=dtype, endpoint=True)
            array[0, :2] = [info.min, info.max]
        else:
            array = rng.normal(scale=100, size=(rows, 3)).astype(dtype)
        samples[datatype] = array
    return samples


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repository(
        model_repository, tmp_path_factory.mktemp("v2-models"), ["clf", "reg", "multi", "img"]
    )
    copy_model(model_repository, "clf", root, new_name="spare")
    write_model(root, "dtypes", 1, dtype_identity_model())
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[str]:
    """host:port of a real uvicorn serving every version of `repository`, the repository extension on."""
    settings = Settings(
        model_repository=repository, access_log=False, enable_repository_api=True, served_versions=0
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url.removeprefix("http://")


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server) as triton_client:
        yield triton_client


def infer_inputs(
    arrays: dict[str, np.ndarray], *, binary: bool, prefix: str = "in_"
) -> list[triton.InferInput]:
    inputs = []
    for datatype, array in arrays.items():
        tensor = triton.InferInput(f"{prefix}{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


# ----------------------------------------------------------------------------------------- sync client


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "modelserve"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(metadata["extensions"])

    model = client.get_model_metadata("clf")
    assert model == {
        "name": "clf",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "label_index", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert client.get_model_metadata("clf", "1")["name"] == "clf"
    dtypes = client.get_model_metadata("dtypes")
    assert [tensor["datatype"] for tensor in dtypes["inputs"]] == list(DTYPES)


def test_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("clf")
    assert client.is_model_ready("clf", "1")
    assert not client.is_model_ready("clf", "9")
    assert not client.is_model_ready("no-such-model")


def test_config_and_statistics(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("clf")
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] > 0
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}]
    assert [o["data_type"] for o in config["output"]] == ["TYPE_FP32", "TYPE_INT64"]

    features = triton.InferInput("features", [5, 3], "FP32")
    features.set_data_from_numpy(np.ones((5, 3), np.float32))
    before = client.get_inference_statistics("reg")["model_stats"][0]
    client.infer("reg", [features])
    after = client.get_inference_statistics("reg")["model_stats"][0]
    assert after["name"] == "reg"
    assert after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] - before["execution_count"] == 1
    stats = after["inference_stats"]
    assert stats["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert stats["success"]["ns"] > 0
    assert stats["compute_infer"]["ns"] > 0
    every = client.get_inference_statistics()["model_stats"]
    assert {"clf", "reg", "dtypes"} <= {entry["name"] for entry in every}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client: triton.InferenceServerClient, binary: bool) -> None:
    arrays = dtype_samples()
    outputs = [triton.InferRequestedOutput(f"out_{t}", binary_data=binary) for t in reversed(DTYPES)]

    result = client.infer("dtypes", infer_inputs(arrays, binary=binary), outputs=outputs)

    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == [f"out_{t}" for t in reversed(DTYPES)]  # order asked
    for datatype, array in arrays.items():
        got = result.as_numpy(f"out_{datatype}")
        assert got.dtype == array.dtype, datatype
        np.testing.assert_array_equal(got, array, err_msg=datatype)
        output = result.get_output(f"out_{datatype}")
        assert output["datatype"] == datatype
        assert ("parameters" in output) is binary


def test_classifier_json_and_binary_outputs_match_onnxruntime(
    client: triton.InferenceServerClient, repository: Path
) -> None:
    features = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    expected = reference_outputs(repository, "clf", 2, {"features": features})
    inputs = [triton.InferInput("features", [4, 4], "FP32")]
    inputs[0].set_data_from_numpy(features, binary_data=False)

    result = client.infer(
        "clf",
        inputs,
        outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=True),
            triton.InferRequestedOutput("label_index", binary_data=False),
        ],
        request_id="req-7",
    )

    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label_index"), expected["label_index"])
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "clf"
    assert response["model_version"] == "2"


def test_classification_extension_uses_card_labels(
    client: triton.InferenceServerClient, repository: Path
) -> None:
    features = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    probabilities = reference_outputs(repository, "clf", 2, {"features": features})["probabilities"]
    tensor = triton.InferInput("features", [3, 4], "FP32")
    tensor.set_data_from_numpy(features)

    result = client.infer(
        "clf", [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)]
    )

    classes = result.as_numpy("probabilities")
    assert classes.shape == (3, 2)
    for row, entries in zip(probabilities, classes, strict=True):
        best = np.argsort(-row, kind="stable")[:2]
        assert [entry.decode() for entry in entries] == [
            f"{row[i]:f}:{i}:{CLASSIFIER_LABELS[i]}" for i in best
        ]


def test_multi_input_model(client: triton.InferenceServerClient, repository: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.ones((3, 3), dtype=np.float32)
    inputs = [triton.InferInput("a", [3, 2], "FP32"), triton.InferInput("b", [3, 3], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=True)
    inputs[1].set_data_from_numpy(b, binary_data=False)

    result = client.infer("multi", inputs, model_version="1")

    expected = reference_outputs(repository, "multi", 1, {"a": a, "b": b})["value"]
    np.testing.assert_allclose(result.as_numpy("value"), expected, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(client: triton.InferenceServerClient, algorithm: str) -> None:
    arrays = dtype_samples(rows=50, seed=3)
    result = client.infer(
        "dtypes",
        infer_inputs(arrays, binary=True),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    for datatype, array in arrays.items():
        np.testing.assert_array_equal(result.as_numpy(f"out_{datatype}"), array)


def test_unknown_model_raises_our_message(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no-such-model", [tensor])
    assert caught.value.status() == "404"
    assert "unknown model 'no-such-model'" in caught.value.message()
    assert "clf" in caught.value.message()  # says which models exist


def test_wrong_shape_is_400(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("features", [2, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 3), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("clf", [tensor])
    assert caught.value.status() == "400"
    assert "expected shape [N, 4], got [2, 3]" in caught.value.message()


def test_wrong_datatype_and_unknown_names_are_400(client: triton.InferenceServerClient) -> None:
    as_double = triton.InferInput("features", [1, 4], "FP64")
    as_double.set_data_from_numpy(np.ones((1, 4), np.float64))
    with pytest.raises(InferenceServerException, match="datatype FP64; model 'clf' expects FP32") as caught:
        client.infer("clf", [as_double])
    assert caught.value.status() == "400"

    features = triton.InferInput("features", [1, 4], "FP32")
    features.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        client.infer("clf", [features], outputs=[triton.InferRequestedOutput("logits")])
    renamed = triton.InferInput("pixels", [1, 4], "FP32")
    renamed.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="unknown input 'pixels'"):
        client.infer("clf", [renamed])


def test_repository_index_unload_load(client: triton.InferenceServerClient) -> None:
    index = {
        (entry["name"], entry["version"]): entry["state"] for entry in client.get_model_repository_index()
    }
    assert index[("spare", "1")] == "READY"
    assert index[("clf", "2")] == "READY"

    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    states = {entry["state"] for entry in client.get_model_repository_index() if entry["name"] == "spare"}
    assert states == {"UNAVAILABLE"}

    client.load_model("spare")
    assert client.is_model_ready("spare")
    with pytest.raises(InferenceServerException, match="no model 'ghost' in the repository"):
        client.load_model("ghost")


# -------------------------------------------------------------------------------------- asyncio client


def test_asyncio_client(server: str, repository: Path) -> None:
    async def scenario() -> None:
        async with triton_aio.InferenceServerClient(server) as aio:
            assert await aio.is_server_ready()
            assert await aio.is_model_ready("dtypes")
            assert (await aio.get_model_metadata("multi"))["platform"] == "onnxruntime_onnx"

            arrays = dtype_samples(rows=3, seed=4)
            json_in = infer_inputs(arrays, binary=False)
            binary_in = infer_inputs(arrays, binary=True)
            asked = [triton.InferRequestedOutput(f"out_{t}", binary_data=t.startswith("U")) for t in DTYPES]
            results = await asyncio.gather(
                aio.infer("dtypes", json_in, outputs=asked),
                aio.infer("dtypes", binary_in, request_compression_algorithm="gzip"),
                aio.infer("dtypes", binary_in, response_compression_algorithm="deflate"),
            )
            for result in results:
                for datatype, array in arrays.items():
                    np.testing.assert_array_equal(result.as_numpy(f"out_{datatype}"), array)

            features = np.random.default_rng(5).normal(size=(2, 4)).astype(np.float32)
            tensor = triton_aio.InferInput("features", [2, 4], "FP32")
            tensor.set_data_from_numpy(features)
            ranked = await aio.infer(
                "clf", [tensor], outputs=[triton_aio.InferRequestedOutput("probabilities", class_count=1)]
            )
            expected = reference_outputs(repository, "clf", 2, {"features": features})["label_index"]
            labels = [entry.decode().split(":")[2] for entry in ranked.as_numpy("probabilities")[:, 0]]
            assert labels == [CLASSIFIER_LABELS[i] for i in expected]

            with pytest.raises(InferenceServerException, match="unknown model 'ghost'") as caught:
                await aio.infer("ghost", [tensor])
            assert caught.value.status() == "404"
            bad = triton_aio.InferInput("features", [2, 2], "FP32")
            bad.set_data_from_numpy(np.ones((2, 2), np.float32))
            with pytest.raises(InferenceServerException, match="expected shape") as caught:
                await aio.infer("clf", [bad])
            assert caught.value.status() == "400"
            stats = await aio.get_inference_statistics("dtypes")
            assert stats["model_stats"][0]["inference_count"] >= 9

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------- raw HTTP details


def test_raw_json_request_with_nested_data_and_parameters(server: str) -> None:
    body = {
        "id": "r1",
        "parameters": {"tenant": "blue", "binary_data_output": False},
        "inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}],
    }
    response = httpx.post(f"http://{server}/v2/models/reg/versions/1/infer", content=orjson.dumps(body))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["id"] == "r1"
    prediction_ids = answer["parameters"].pop("prediction_ids")
    assert answer["parameters"] == {"tenant": "blue"}
    assert len(set(prediction_ids)) == 2  # one id per row
    assert answer["outputs"][0]["name"] == "value"
    assert answer["outputs"][0]["shape"] == [2]
    assert len(answer["outputs"][0]["data"]) == 2


def test_raw_binary_response_headers_and_gzip(server: str) -> None:
    body = orjson.dumps(
        {
            "inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
            "parameters": {"binary_data_output": True},
        }
    )
    response = httpx.post(
        f"http://{server}/v2/models/reg/infer",
        content=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-encoding"] == "gzip"
    raw = response.content  # httpx already inflated it
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(raw[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert len(raw) == length + 4


@pytest.mark.parametrize(
    ("headers", "content", "status", "message"),
    [
        ({}, b"{", 400, "not valid JSON"),
        ({"Content-Encoding": "br"}, b"{}", 415, "unsupported Content-Encoding 'br'"),
        ({"Content-Encoding": "gzip"}, b"not gzip", 400, "not valid gzip"),
        ({"Inference-Header-Content-Length": "x"}, b"{}", 400, "must be a non-negative integer"),
        ({"Inference-Header-Content-Length": "99"}, b"{}", 400, "outside the body"),
    ],
)
def test_raw_malformed_requests(
    server: str, headers: dict, content: bytes, status: int, message: str
) -> None:
    response = httpx.post(f"http://{server}/v2/models/reg/infer", content=content, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_bad_version_and_unknown_version(server: str) -> None:
    response = httpx.get(f"http://{server}/v2/models/clf/versions/abc")
    assert response.status_code == 400
    response = httpx.get(f"http://{server}/v2/models/clf/versions/7")
    assert response.status_code == 404
    assert "has no version 7" in response.json()["error"]


def test_repository_extension_is_off_by_default(model_repository: Path) -> None:
    app = create_app(Settings(model_repository=model_repository, access_log=False))
    with TestClient(app) as http:
        assert "model_repository" not in http.get("/v2").json()["extensions"]
        for path in (
            "/v2/repository/index",
            "/v2/repository/models/clf/load",
            "/v2/repository/models/clf/unload",
        ):
            response = http.post(path)
            assert response.status_code == 403
            assert "MODELSERVE_ENABLE_REPOSITORY_API=true" in response.json()["error"]
        assert http.get("/v2/models/clf/ready").status_code == 200  # nothing was unloaded


def test_binary_inputs_reach_the_core_as_views_over_the_body(repository: Path) -> None:
    app = create_app(Settings(model_repository=repository, access_log=False))
    seen: dict[str, np.ndarray] = {}
    with TestClient(app) as http:
        dataplane = app.state.dataplane
        original = dataplane.run_validated

        async def spy(model, inputs, **kwargs):  # type: ignore[no-untyped-def]
            seen.update(inputs)
            return await original(model, inputs, **kwargs)

        dataplane.run_validated = spy
        arrays = dtype_samples(rows=4, seed=6)
        body, header_length = triton.InferenceServerClient.generate_request_body(
            infer_inputs(arrays, binary=True)
        )
        response = http.post(
            "/v2/models/dtypes/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(header_length)},
        )
        assert response.status_code == 200

        bodies = set()
        for datatype, array in arrays.items():
            got = seen[f"in_{datatype}"]
            np.testing.assert_array_equal(got, array)
            assert not got.flags.owndata
            base = got
            while isinstance(base, np.ndarray):
                base = base.base
            assert isinstance(base, bytes)  # the request body itself: no copy was made
            bodies.add(id(base))
            model = dataplane.get_model("dtypes")
            assert np.shares_memory(model.validate_inputs(seen)[f"in_{datatype}"], got)  # the core keeps it
        assert len(bodies) == 1


@pytest.mark.parametrize("binary", [False, True])
def test_each_input_s_values_are_checked_once(
    repository: Path, monkeypatch: pytest.MonkeyPatch, binary: bool
) -> None:
    """JSON tensors are checked as they are decoded (so messages name the tensor), binary ones by the
    validator: either way `cast_values`, the one place with the rules, runs once per input."""
    calls: list[np.dtype] = []
    cast_values = validation.cast_values

    def counting(array, dtype, *args):  # type: ignore[no-untyped-def]
        calls.append(dtype)
        return cast_values(array, dtype, *args)

    monkeypatch.setattr(codec, "cast_values", counting)
    monkeypatch.setattr(validation, "cast_values", counting)
    arrays = dtype_samples(rows=3, seed=7)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        infer_inputs(arrays, binary=binary)
    )
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length else {}
    with TestClient(create_app(Settings(model_repository=repository, access_log=False))) as http:
        calls.clear()
        response = http.post("/v2/models/dtypes/infer", content=body, headers=headers)
    assert response.status_code == 200
    checked = sorted(dtype.name for dtype in calls)
    assert len(checked) == len(set(checked))  # no input twice
    every = {dtype.name for _, dtype in DTYPES.values()}
    # JSON integers beyond int64 (UINT64) are read exactly by the codec, without the float detour
    assert set(checked) == (every if binary else every - {"uint64"})


def test_values_checked_skips_only_arrays_of_the_graph_dtype(repository: Path) -> None:
    """An input listed as checked but of another dtype is still converted and checked by the rules."""
    app = create_app(Settings(model_repository=repository, access_log=False))
    with TestClient(app):
        model = app.state.dataplane.get_model("clf")
        float32 = np.ones((2, 4), np.float32)
        assert (
            model.validate_inputs({"features": float32}, values_checked={"features"})["features"] is float32
        )
        with pytest.raises(InvalidInput, match=r"inputs\[1\]\[2\]: NaN or Inf is not a valid input"):
            model.validate_inputs(
                {"features": [[1, 2, 3, 4], [1, 2, np.nan, 4]]}, values_checked={"features"}
            )


def test_api_key_guards_the_v2_routes(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, access_log=False, api_key="s3cret")
    body = orjson.dumps(
        {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    )
    with TestClient(create_app(settings)) as http:
        assert http.get("/v2/health/ready").status_code == 200
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/reg"), ("POST", "/v2/models/reg/infer")):
            response = http.request(method, path, content=body if method == "POST" else None)
            assert response.status_code == 401, path
        ok = http.post("/v2/models/reg/infer", content=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_openapi_documents_the_v2_routes(model_repository: Path) -> None:
    schema = create_app(Settings(model_repository=model_repository)).openapi()
    infer = schema["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"400", "404", "503"} <= set(infer["responses"])
    assert "/v2/models/{model}/versions/{version}/ready" in schema["paths"]
    assert "V2InferRequest" in schema["components"]["schemas"]
