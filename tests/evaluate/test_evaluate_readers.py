"""Readers: every format gives the same chunks; bad input names the row.

`collect` checks each chunk's inputs with the core validator as the runner does, so the messages here are
the ones `/evaluate` answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from app.errors import InvalidInput
from app.evaluate.readers import (
    Chunk,
    EvaluationOptions,
    Schema,
    csv_chunks,
    json_chunks,
    ndjson_chunks,
    npz_chunks,
    parse_json_body,
)
from app.model_card import TensorSpec
from app.validation import InputValidator, RowPlaces
from tests.factories import csv_body, ndjson_body, npz_body

LABELS = ("cat", "dog", "eel")
CLF = Schema("classification", LABELS, (TensorSpec(name="features", dtype="float32", shape=[-1, 3]),))
REG = Schema("regression", None, (TensorSpec(name="features", dtype="float32", shape=[-1, 3]),))
IMG = Schema("classification", LABELS, (TensorSpec(name="image", dtype="float32", shape=[-1, 1, 2, 2]),))


async def _stream(data: bytes, piece: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def collect(gen: AsyncIterator[Chunk], schema: Schema) -> list[Chunk]:
    """Every chunk, its inputs validated as the runner validates them."""
    validator = InputValidator(schema.inputs)

    async def run() -> list[Chunk]:
        return [
            dataclasses.replace(
                chunk, inputs=validator.validate(chunk.inputs, RowPlaces(chunk.first_row, chunk.rows))
            )
            async for chunk in gen
        ]

    return asyncio.run(run())


def joined(chunks: list[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    name = next(iter(chunks[0].inputs))
    return np.concatenate([c.inputs[name] for c in chunks]), np.concatenate([c.targets for c in chunks])


X = np.arange(21, dtype=np.float32).reshape(7, 3) / 4
Y_NAMES = ["cat", "dog", "eel", "dog", "cat", "cat", "eel"]
Y_INDEX = np.array([LABELS.index(y) for y in Y_NAMES])


def csv_bytes(label_first: bool = False, labels: list[Any] = Y_NAMES) -> bytes:
    return csv_body(X, labels, label_first=label_first)


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_all_formats_agree(chunk_rows: int) -> None:
    request = parse_json_body(
        __import__("orjson").dumps({"model": "m", "inputs": X.tolist(), "labels": Y_NAMES})
    )
    results = [
        collect(json_chunks(request, CLF, chunk_rows), CLF),
        collect(ndjson_chunks(_stream(ndjson_body(X, Y_NAMES)), CLF, chunk_rows), CLF),
        collect(csv_chunks(_stream(csv_bytes()), CLF, "label", chunk_rows), CLF),
        collect(csv_chunks(_stream(csv_bytes(label_first=True)), CLF, None, chunk_rows), CLF),
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=np.array(Y_NAMES))), CLF, chunk_rows), CLF),
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=Y_INDEX)), CLF, chunk_rows), CLF),
    ]
    for chunks in results:
        x, y = joined(chunks)
        np.testing.assert_array_equal(x, X)
        np.testing.assert_array_equal(y, Y_INDEX)
        assert [c.first_row for c in chunks] == list(range(1, 8, chunk_rows))


def test_indices_and_quoted_csv_and_crlf() -> None:
    data = csv_bytes(labels=[str(i) for i in Y_INDEX]).replace(b"\n", b"\r\n")
    x, y = joined(collect(csv_chunks(_stream(data), CLF), CLF))
    np.testing.assert_array_equal(y, Y_INDEX)
    quoted = b'"a","b","c","label"\n"1.0",2,3,"dog"\n'
    x, y = joined(collect(csv_chunks(_stream(quoted), CLF), CLF))
    assert y.tolist() == [1]
    assert x.tolist() == [[1.0, 2.0, 3.0]]


def test_json_indices_and_multi_chunk_kind_state() -> None:
    request = parse_json_body(b'{"model": "m", "inputs": [[1,2,3],[4,5,6]], "labels": [2, 0]}')
    _, y = joined(collect(json_chunks(request, CLF, 1), CLF))
    assert y.tolist() == [2, 0]


def test_image_rows_may_be_flat() -> None:
    request = parse_json_body(
        b'{"model": "m", "inputs": [[1,2,3,4],[[[5,6],[7,8]]]], "labels": ["cat", "eel"]}'
    )
    with pytest.raises(InvalidInput, match="row 2"):
        collect(json_chunks(request, IMG, 10), IMG)
    request = parse_json_body(b'{"model": "m", "inputs": [[1,2,3,4],[5,6,7,8]], "labels": ["cat", "eel"]}')
    (chunk,) = collect(json_chunks(request, IMG, 10), IMG)
    assert chunk.inputs["image"].shape == (2, 1, 2, 2)


def test_regression_targets() -> None:
    data = b"a,b,c,y\n1,2,3,0.5\n4,5,6,-2\n"
    (chunk,) = collect(csv_chunks(_stream(data), REG, "y"), REG)
    assert chunk.targets.tolist() == [0.5, -2.0]
    with pytest.raises(InvalidInput, match="row 2: label 'x' is not a number"):
        collect(csv_chunks(_stream(b"a,b,c,y\n1,2,3,0.5\n4,5,6,x\n"), REG, "y"), REG)


BAD_CASES = [
    # (format, body, message pattern)
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2,3]], "labels": ["cat", "cow"]}',
        r"row 2: label 'cow' is not among",
    ),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2,3]], "labels": ["cat", 1]}',
        r"row 2: .*mixed label types",
    ),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2,3]], "labels": [0, 3]}',
        r"row 2: label 3 is not among",
    ),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2,3]], "labels": ["cat"]}',
        r"different lengths \(2 vs 1\): row 2 has no label",
    ),
    ("json", b'{"model": "m", "inputs": [], "labels": []}', r"empty"),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2]], "labels": [0, 1]}',
        r"row 2: input 'features': expected shape \[N, 3\], got \[1, 2\] \(rows of 2 values",
    ),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,"x",3]], "labels": [0, 1]}',
        r"row 2: input 'features'\[1\]: 'x' is not a number",
    ),
    (
        "json",
        b'{"model": "m", "inputs": [[1,2,3],[1,2,3]], "labels": [0, 1.5]}',
        r"row 2: label 1.5 must be a class name",
    ),
    (
        "ndjson",
        b'{"input": [1,2,3], "label": "cat"}\n\n{"input": [1,2,3], "label": 0}\n',
        r"row 2: .*mixed label types",
    ),
    (
        "ndjson",
        b'{"input": [1,2,3], "label": "cat"}\n{"input": [1,2,3]}\n',
        r"row 2 \(line 2\): expected an object",
    ),
    ("ndjson", b'{"input": [1,2,3], "label": "cat"}\n{oops\n', r"row 2 \(line 2\): not valid JSON"),
    ("ndjson", b"\n\n", r"empty"),
    ("csv", b"a,b,c,label\n1,2,3,cat\n1,2,dog\n", r"row 2: 3 columns, but the header has 4"),
    ("csv", b"a,b,c,label\n1,2,3,cat\n1,2,3,cat\n1,x,3,cat\n", r"row 3: column 'b': 'x' is not a number"),
    ("csv", b"a,b,c,label\n1,2,3,cat\n1,,3,cat\n", r"row 2: column 'b': '' is not a number"),
    ("csv", b"a,b,c,target\n1,2,3,cat\n", r"no label column 'label' \(columns: a, b, c, target\)"),
    ("csv", b"a,b,c,label\n1,2,3,cat\n1,2,3,2\n", r"row 2: .*mixed label types"),
    ("csv", b"a,b,c,label\n1,2,3,cat\n1,2,3,horse\n", r"row 2: label 'horse' is not among"),
    ("csv", b"a,b,c,label\n", r"empty"),
    ("csv", b"", r"empty"),
    (
        "csv",
        b"a,b,c,label\n1,2,3,cat\n1,nan,3,cat\n",
        r"row 2: input 'features'\[1\]: NaN or Inf is not a valid input",
    ),
    ("csv", b"a,b,label\n1,2,cat\n", r"row 1: input 'features': expected shape \[N, 3\], got \[1, 2\]"),
]


@pytest.mark.parametrize(("fmt", "body", "pattern"), BAD_CASES)
def test_bad_input_names_the_row(fmt: str, body: bytes, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        read_all(fmt, body)


def read_all(fmt: str, body: bytes) -> list[Chunk]:
    if fmt == "json":
        return collect(json_chunks(parse_json_body(body), CLF, 1), CLF)
    if fmt == "ndjson":
        return collect(ndjson_chunks(_stream(body), CLF, 1), CLF)
    return collect(csv_chunks(_stream(body), CLF, None, 2), CLF)


def test_npz_bad_input() -> None:
    with pytest.raises(InvalidInput, match=r"different lengths \(7 vs 6\): row 7 has no label"):
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=Y_INDEX[:6])), CLF), CLF)
    with pytest.raises(InvalidInput, match="no 'labels' array"):
        collect(npz_chunks(_stream(npz_body(inputs=X)), CLF), CLF)
    with pytest.raises(InvalidInput, match="not an NPZ archive"):
        collect(npz_chunks(_stream(b"not a zip"), CLF), CLF)
    with pytest.raises(InvalidInput, match="row 3: label 7 is not among"):
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=np.array([0, 1, 7, 0, 0, 0, 0]))), CLF, 2), CLF)
    with pytest.raises(InvalidInput, match="empty"):
        collect(npz_chunks(_stream(b""), CLF), CLF)
    with pytest.raises(InvalidInput, match="object array"):
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=np.array(Y_NAMES, dtype=object))), CLF), CLF)


def test_npz_compressed_and_fortran_order_and_spooled() -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=np.asfortranarray(X), labels=Y_INDEX)
    x, y = joined(collect(npz_chunks(_stream(buffer.getvalue(), 1000), CLF, 2, spool_memory_bytes=10), CLF))
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y_INDEX)


def test_json_envelope_errors() -> None:
    with pytest.raises(InvalidInput, match="unknown field"):
        parse_json_body(b'{"model": "m", "inputs": [], "labels": [], "label": 1}')
    with pytest.raises(InvalidInput, match="no 'labels' field"):
        parse_json_body(b'{"model": "m", "inputs": []}')
    with pytest.raises(InvalidInput, match="not valid JSON"):
        parse_json_body(b"{")
    with pytest.raises(InvalidInput, match="top_k"):
        EvaluationOptions.parse(top_k=0)
    assert EvaluationOptions.parse("nan", "3", "dog") == EvaluationOptions("nan", 3, "dog")


def test_json_inputs_by_name_for_multi_input_models() -> None:
    schema = Schema(
        "regression",
        None,
        (
            TensorSpec(name="a", dtype="float32", shape=[-1, 2]),
            TensorSpec(name="b", dtype="float32", shape=[-1, 1]),
        ),
    )
    request = parse_json_body(
        b'{"model": "m", "inputs": {"a": [[1,2],[3,4]], "b": [[5],[6]]}, "labels": [1, 2.5]}'
    )
    (chunk,) = collect(json_chunks(request, schema, 10), schema)
    assert chunk.inputs["a"].tolist() == [[1, 2], [3, 4]]
    assert chunk.targets.tolist() == [1.0, 2.5]
    bad = parse_json_body(b'{"model": "m", "inputs": {"a": [[1,2],[3,4]], "b": [[5]]}, "labels": [1, 2]}')
    with pytest.raises(InvalidInput, match="different numbers of rows"):
        collect(json_chunks(bad, schema, 10), schema)
    rows = parse_json_body(
        b'{"model": "m", "inputs": [{"a": [1,2], "b": [5]}, {"a": [1,2]}], "labels": [1, 2]}'
    )
    with pytest.raises(InvalidInput, match="row 2: input 'b' is missing"):
        collect(json_chunks(rows, schema, 10), schema)


def test_npz_spool_that_does_not_fit_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.errors import PayloadTooLarge

    with pytest.raises(PayloadTooLarge, match="larger than 100 bytes"):
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=Y_INDEX), 50), CLF, max_bytes=100), CLF)

    class Full(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

        def __enter__(self) -> Full:
            return self

    monkeypatch.setattr("tempfile.SpooledTemporaryFile", lambda **_: Full())
    with pytest.raises(PayloadTooLarge, match="temporary storage"):
        collect(npz_chunks(_stream(npz_body(inputs=X, labels=Y_INDEX)), CLF), CLF)


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b"a,b,c,label\n1,2,3,cat\n1,,3,cat\n", "row 2: column 'b': '' is not a number"),
        (b"a,b,c,label\n1,2,3,cat\n1,2 5,3,cat\n", "row 2: column 'b': '2 5' is not a number"),
        (b"a,b,c,label\n1,2,3,cat\n1,2,3\n", "row 2: 3 columns, but the header has 4"),
        (
            b"a,b,c,label\n1,2,3,cat\n1,1e39,3,cat\n",
            r"row 2: input 'features'\[1\]: 1e\+39 is out of range for float32",
        ),
        (
            b"a,b,c,label\n1,2,3,cat\n1,nan,3,cat\n",
            r"row 2: input 'features'\[1\]: NaN or Inf is not a valid",
        ),
    ],
)
def test_csv_fast_path_errors_name_the_row(body: bytes, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        collect(csv_chunks(_stream(body), CLF), CLF)
