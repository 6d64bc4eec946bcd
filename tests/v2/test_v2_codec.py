"""Open Inference Protocol codecs: encode/decode pairs, Triton's binary extension, classification.

`tritonclient` itself is the second implementation: its request builder feeds our decoder and its response
reader reads our encoder's output.
"""

from __future__ import annotations

import contextlib
import gzip
import struct
import zlib

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from app.v2 import compression
from app.v2.codec import (
    OutputTensor,
    classify,
    decode_binary_tensor,
    decode_bytes_elements,
    decode_json_tensor,
    decode_request,
    encode_binary_tensor,
    encode_bytes_elements,
    encode_json_tensor,
    encode_response,
)
from app.v2.datatypes import DATATYPE_TO_DTYPE, to_datatype, to_dtype

FIXED = [datatype for datatype in DATATYPE_TO_DTYPE if datatype != "BYTES"]
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)
ELEMENTS = st.binary(max_size=12)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def arrays(datatype: str, *, finite: bool = False) -> st.SearchStrategy[np.ndarray]:
    if datatype == "BYTES":
        return hnp.arrays(np.object_, SHAPES, elements=ELEMENTS)
    dtype = DATATYPE_TO_DTYPE[datatype]
    elements = st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False) if finite else None
    if dtype.kind == "f" and elements is not None:
        return hnp.arrays(dtype, SHAPES, elements=elements)
    return hnp.arrays(dtype, SHAPES)


def triton_request(inputs: list[InferInput], outputs: list[InferRequestedOutput] | None = None) -> tuple:
    return _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, None)


# ------------------------------------------------------------------------------------------- datatypes


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_DTYPE))
def test_datatype_table_round_trips(datatype: str) -> None:
    assert to_datatype(to_dtype(datatype)) == datatype


def test_datatype_reverse_covers_native_and_string_dtypes() -> None:
    assert to_datatype(np.float32) == "FP32"
    assert to_datatype(np.dtype(">f4")) == "FP32"
    assert to_datatype("bool") == "BOOL"
    assert to_datatype("str") == "BYTES"
    assert to_datatype(np.dtype("S3")) == "BYTES"
    with pytest.raises(ValueError, match="complex"):
        to_datatype(np.complex64)
    with pytest.raises(InvalidInput, match="unknown datatype 'FP8'"):
        to_dtype("FP8")


# ------------------------------------------------------------------------------------ tensor round trips


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_DTYPE))
@FAST
@given(data=st.data())
def test_binary_tensor_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(arrays(datatype))
    decoded = decode_binary_tensor(encode_binary_tensor(array), datatype, array.shape)
    assert decoded.shape == array.shape
    assert decoded.dtype == DATATYPE_TO_DTYPE[datatype]
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_DTYPE))
@FAST
@given(data=st.data())
def test_json_tensor_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(arrays(datatype, finite=True))
    if datatype == "BYTES":  # JSON carries text
        array = np.vectorize(lambda item: item.hex().encode(), otypes=[object])(array)
    wire = orjson.loads(orjson.dumps(encode_json_tensor(array), option=orjson.OPT_SERIALIZE_NUMPY))
    decoded = decode_json_tensor(wire, datatype, list(array.shape))
    assert decoded.dtype == DATATYPE_TO_DTYPE[datatype]
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_DTYPE))
@FAST
@given(data=st.data(), binary=st.booleans(), compress=st.sampled_from([None, "gzip", "deflate"]))
def test_tritonclient_request_decodes(
    datatype: str, data: st.DataObject, binary: bool, compress: str | None
) -> None:
    first = data.draw(arrays(datatype, finite=True))
    second = data.draw(hnp.arrays(np.float32, (2, 3), elements=st.floats(-5, 5, width=32)))
    if datatype == "BYTES" and not binary:
        first = np.vectorize(lambda item: item.hex().encode(), otypes=[object])(first)
    inputs = [InferInput("a", list(first.shape), datatype), InferInput("b", [2, 3], "FP32")]
    inputs[0].set_data_from_numpy(first, binary_data=binary)
    inputs[1].set_data_from_numpy(second, binary_data=True)
    body, header_length = triton_request(inputs)
    if compress:
        body = compression.compress(body, compress)
        body = compression.decompress(body, compress, max_bytes=1 << 20)

    request = decode_request(body, header_length)

    assert list(request.inputs) == ["a", "b"]
    assert request.datatypes == {"a": datatype, "b": "FP32"}
    np.testing.assert_array_equal(request.inputs["a"], first)
    np.testing.assert_array_equal(request.inputs["b"], second)
    assert request.binary_output is True  # tritonclient asks for binary when no outputs are named


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_DTYPE))
@FAST
@given(data=st.data(), binary=st.booleans())
def test_response_reads_with_tritonclient(datatype: str, data: st.DataObject, binary: bool) -> None:
    array = data.draw(arrays(datatype, finite=True))
    if datatype == "BYTES":
        array = np.vectorize(lambda item: item.hex().encode(), otypes=[object])(array)
    other = np.arange(6, dtype=np.int64).reshape(2, 3)
    encoded = encode_response(
        model_name="m",
        model_version="3",
        outputs=[OutputTensor("x", array, binary), OutputTensor("y", other, not binary)],
        request_id="req-1",
    )

    result = InferResult.from_response_body(encoded.body, False, encoded.header_length)

    got = result.as_numpy("x")
    assert got.shape == array.shape
    if datatype == "BYTES" and not binary:  # JSON BYTES come back as text, as from Triton
        got = np.vectorize(str.encode, otypes=[object])(got) if got.size else got.astype(object)
    np.testing.assert_array_equal(got, array)
    np.testing.assert_array_equal(result.as_numpy("y"), other)
    response = result.get_response()
    assert response["id"] == "req-1"
    assert response["model_name"] == "m"
    assert response["model_version"] == "3"
    assert response["outputs"][0]["datatype"] == datatype


def test_bytes_elements_are_length_prefixed() -> None:
    array = np.array([b"ab", b"", "é"], dtype=object)
    wire = encode_bytes_elements(array)
    assert wire == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "é".encode()
    assert decode_bytes_elements(wire).tolist() == [b"ab", b"", "é".encode()]


# ------------------------------------------------------------------------------- binary requests: views


def test_binary_inputs_are_views_over_the_body() -> None:
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.array([[True, False], [True, True], [False, False]])
    inputs = [InferInput("features", [3, 4], "FP32"), InferInput("mask", [3, 2], "BOOL")]
    inputs[0].set_data_from_numpy(features)
    inputs[1].set_data_from_numpy(mask)
    body, header_length = triton_request(inputs)

    request = decode_request(body, header_length)

    whole = np.frombuffer(body, dtype=np.uint8)
    for name in ("features", "mask"):
        array = request.inputs[name]
        assert np.shares_memory(array, whole)
        assert not array.flags.owndata
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        assert base is body
    np.testing.assert_array_equal(request.inputs["features"], features)
    np.testing.assert_array_equal(request.inputs["mask"], mask)


# -------------------------------------------------------------------------------------- request details


def test_requested_outputs_parameters_and_id() -> None:
    inputs = [InferInput("x", [1, 2], "FP32")]
    inputs[0].set_data_from_numpy(np.ones((1, 2), np.float32), binary_data=False)
    outputs = [
        InferRequestedOutput("probabilities", binary_data=False, class_count=2),
        InferRequestedOutput("label_index"),
    ]
    body, header_length = _get_inference_request(
        inputs, "abc", outputs, 0, False, False, 0, 1000, {"tenant": "blue"}
    )
    assert header_length is None

    request = decode_request(body)

    assert request.id == "abc"
    assert [(o.name, o.binary, o.class_count) for o in request.outputs] == [
        ("probabilities", False, 2),
        ("label_index", True, 0),
    ]
    assert request.binary_output is False
    assert request.parameters == {"tenant": "blue"}  # protocol parameters (timeout) are not echoed


def test_nested_and_flat_json_data_give_the_same_tensor() -> None:
    flat = decode_json_tensor([1, 2, 3, 4, 5, 6], "INT32", [2, 3])
    nested = decode_json_tensor([[1, 2, 3], [4, 5, 6]], "INT32", [2, 3])
    np.testing.assert_array_equal(flat, nested)
    assert flat.dtype == np.int32


def test_uint64_json_keeps_full_precision() -> None:
    decoded = decode_json_tensor([2**64 - 1, 1], "UINT64", [2])
    assert decoded.tolist() == [2**64 - 1, 1]


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        ([1, 2, 3], "FP32", [2, 2], r"shape \[2, 2\] needs 4 elements, got 3"),
        ([[1, 2], [3]], "FP32", [3], "not a rectangular array"),
        (["a", "b"], "FP32", [2], r"input 'x' data\[0\]: 'a' is not a number"),
        ([2, 1.5], "INT64", [2], r"data\[1\]: 1.5 is not a whole number; the input takes int64 values"),
        ([300], "INT8", [1], r"300 is out of range for int8 \(-128..127\)"),
        ([-1], "UINT8", [1], "-1 is out of range for uint8"),
        ([1e6], "FP16", [1], r"1000000.0 is out of range for float16 \(largest magnitude 65504\)"),
        ([1, 0.5], "BOOL", [2], r"data\[1\]: 0.5 is not true/false \(or 0/1\)"),
        ([1, 2], "BYTES", [2], "BYTES 'data' must hold strings"),
        ([1], "COMPLEX", [1], "unknown datatype 'COMPLEX'"),
    ],
)
def test_bad_json_tensors_are_refused(data: object, datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_json_tensor(data, datatype, shape, name="x")


def _binary_body(header: dict, blob: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + blob, len(head)


@pytest.mark.parametrize(
    ("body_and_length", "message"),
    [
        ((b"{not json", None), "not valid JSON"),
        ((b"[]", None), "must be a JSON object"),
        ((b'{"inputs": []}', None), "non-empty list"),
        (
            (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None),
            "non-negative",
        ),
        ((b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None), "neither 'data'"),
        (
            _binary_body(
                {
                    "inputs": [
                        {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
                    ]
                },
                b"\0" * 4,
            ),
            r"binary data is 4 bytes, but shape \[2\] of FP32 needs 8",
        ),
        (
            _binary_body(
                {
                    "inputs": [
                        {"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
                    ]
                },
                b"\0" * 4,
            ),
            "runs past the end",
        ),
        (
            _binary_body(
                {
                    "inputs": [
                        {"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
                    ]
                },
                b"\0" * 6,
            ),
            "2 bytes after the last binary input",
        ),
        (
            _binary_body(
                {
                    "inputs": [
                        {
                            "name": "s",
                            "shape": [1],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": 6},
                        }
                    ]
                },
                struct.pack("<I", 5) + b"ab",
            ),
            "runs past the end of its data",
        ),
        (
            (
                b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
                b' "outputs": [{"name": "y", "parameters": {"classification": -1}}]}',
                None,
            ),
            "'classification' must be a non-negative integer",
        ),
    ],
)
def test_bad_requests_are_refused(body_and_length: tuple[bytes, int | None], message: str) -> None:
    body, header_length = body_and_length
    with pytest.raises(InvalidInput, match=message):
        decode_request(body, header_length)


def test_binary_data_size_without_header_length_is_explained() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    )
    with pytest.raises(InvalidInput, match="needs Inference-Header-Content-Length"):
        decode_request(body + b"\0" * 4)
    with pytest.raises(InvalidInput, match="no Inference-Header-Content-Length"):
        decode_request(body)


# --------------------------------------------------------------------------------------- classification


def test_classification_strings_match_triton() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    result = classify(scores, 2, ["cat", "dog", "owl"])
    assert result.shape == (2, 2)
    assert result.tolist() == [
        [b"0.700000:1:dog", b"0.200000:2:owl"],
        [b"0.500000:0:cat", b"0.250000:1:dog"],  # ties keep the lower index first
    ]


def test_classification_without_labels_integers_and_large_k() -> None:
    assert classify(np.array([[3, 9]], dtype=np.int64), 5).tolist() == [[b"9:1", b"3:0"]]


def test_classification_response_reads_like_triton() -> None:
    labels = classify(np.array([[0.9, 0.1]], dtype=np.float32), 1, ["yes", "no"])
    encoded = encode_response(model_name="m", model_version="1", outputs=[OutputTensor("p", labels, True)])
    result = InferResult.from_response_body(encoded.body, False, encoded.header_length)
    assert result.as_numpy("p").tolist() == [[b"0.900000:0:yes"]]


# ----------------------------------------------------------------------------------------- compression


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compression_round_trip(encoding: str) -> None:
    body = b"tensor" * 100
    assert compression.decompress(compression.compress(body, encoding), encoding, max_bytes=600) == body


def test_raw_deflate_is_accepted() -> None:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = packer.compress(b"hello") + packer.flush()
    assert compression.decompress(raw, "deflate", max_bytes=10) == b"hello"


def test_decompression_is_bounded_and_checked() -> None:
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes"):
        compression.decompress(gzip.compress(b"\0" * 100_000), "gzip", max_bytes=1000)
    with pytest.raises(InvalidInput, match="not valid gzip"):
        compression.decompress(b"plain", "gzip", max_bytes=1000)
    with pytest.raises(InvalidInput, match="not valid gzip"):
        compression.decompress(gzip.compress(b"abc" * 100)[:-12], "gzip", max_bytes=1000)
    with pytest.raises(UnsupportedMediaType, match="'br'"):
        compression.decompress(b"x", "br", max_bytes=1000)
    assert compression.decompress(b"x", "identity", max_bytes=1) == b"x"


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, None),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br, deflate;q=0.5", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("*", "gzip"),
        ("identity", None),
    ],
)
def test_accept_encoding_negotiation(header: str | None, chosen: str | None) -> None:
    assert compression.negotiate(header) == chosen


# ---------------------------------------------------------------------------------- hostile input (fuzz)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
TENSOR_HEADERS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "datatype": st.sampled_from([*DATATYPE_TO_DTYPE, "FP8", 3]),
    },
    optional={
        "data": JSON_VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 40)}),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.fixed_dictionaries(
        {"inputs": st.lists(TENSOR_HEADERS, max_size=3)},
        optional={"outputs": JSON_VALUES, "parameters": JSON_VALUES, "id": JSON_VALUES},
    ),
    tail=st.binary(max_size=40),
    use_length=st.booleans(),
)
def test_any_request_decodes_or_is_refused_with_invalid_input(
    header: dict, tail: bytes, use_length: bool
) -> None:
    head = orjson.dumps(header)
    with contextlib.suppress(InvalidInput):
        decode_request(head + tail if use_length else head, len(head) if use_length else None)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64), header_length=st.none() | st.integers(-5, 70))
def test_random_bytes_are_refused_with_invalid_input(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(InvalidInput):
        decode_request(body, header_length)


def test_timeout_parameter_is_read_in_microseconds_as_tritonclient_sends_it() -> None:
    tensor = InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, np.float32), binary_data=False)
    body, _ = _get_inference_request([tensor], "", None, 0, False, False, 0, 250_000, None)
    decoded = decode_request(body)
    assert decoded.timeout_seconds == 0.25
    assert "timeout" not in decoded.parameters  # the protocol's own: not echoed
    no_limit = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {}}
    assert decode_request(orjson.dumps(no_limit)).timeout_seconds is None
    no_limit["parameters"] = {"timeout": 0}
    assert decode_request(orjson.dumps(no_limit)).timeout_seconds is None
