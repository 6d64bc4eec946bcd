"""The table of bad `/predict` requests: each with the status and the text its error must contain.

Shared by `test_bad_input.py` (one at a time) and `test_end_to_end.py` (mixed with good requests).
"""

from __future__ import annotations

from typing import Any

GOOD = {"model": "clf", "inputs": [[1.0, 2.0, 3.0, 4.0]]}


def body(**fields: Any) -> dict[str, Any]:
    return {**GOOD, **fields}


# (case id, request body as JSON value or raw bytes, content type, status, text the error must contain)
CASES: list[tuple[str, Any, str, int, str]] = [
    (
        "wrong feature count",
        body(inputs=[[1, 2, 3]]),
        "application/json",
        400,
        "expected shape [N, 4], got [1, 3]",
    ),
    ("one row without batch axis", body(inputs=[1, 2, 3, 4]), "application/json", 400, "wrap it in a list"),
    (
        "image of the wrong size",
        {"model": "img", "inputs": [[0.0] * 15]},
        "application/json",
        400,
        "expected shape [N, 1, 4, 4] (or [N, 16] flattened), got [1, 15]",
    ),
    (
        "ragged rows",
        body(inputs=[[1, 2, 3, 4], [1, 2]]),
        "application/json",
        400,
        "inputs[1]: not a rectangular array: this row has shape [2], the rows before it [4]",
    ),
    (
        "text value",
        body(inputs=[[1, "a", 3, 4]]),
        "application/json",
        400,
        "inputs[0][1]: 'a' is not a number",
    ),
    (
        "null value",
        body(inputs=[[1, None, 3, 4]]),
        "application/json",
        400,
        "inputs[0][1]: None is not a number",
    ),
    (
        "beyond float32",
        body(inputs=[[1.0, 2.0, 3.0, 4.0], [1e39, 1.0, 2.0, 3.0]]),
        "application/json",
        400,
        "inputs[1][0]: 1e+39 is out of range for float32 (largest magnitude 3.40282e+38)",
    ),
    (
        "infinite number",
        b'{"model": "clf", "inputs": [[1e400, 1, 2, 3]]}',
        "application/json",
        400,
        "infinity",
    ),
    (
        "NaN literal",
        b'{"model": "clf", "inputs": [[NaN, 1, 2, 3]]}',
        "application/json",
        400,
        "malformed JSON",
    ),
    ("empty inputs", body(inputs=[]), "application/json", 400, "empty"),
    ("empty rows", body(inputs=[[]]), "application/json", 400, "expected shape [N, 4], got [1, 0]"),
    ("missing inputs", {"model": "clf"}, "application/json", 400, "inputs: required"),
    ("missing model", {"inputs": [[1, 2, 3, 4]]}, "application/json", 400, "model: required"),
    ("inputs not a list", body(inputs="1,2,3,4"), "application/json", 400, "expected a list"),
    ("unknown field", body(topk=2), "application/json", 400, "unknown field(s) ['topk']"),
    ("top_k zero", body(top_k=0), "application/json", 400, "top_k: expected a positive integer"),
    (
        "top_k on a regressor",
        {"model": "reg", "inputs": [[1, 2, 3]], "top_k": 1},
        "application/json",
        400,
        "top_k",
    ),
    ("bad version", body(version="latest"), "application/json", 400, "version: expected a positive integer"),
    (
        "unknown input name",
        {"model": "multi", "inputs": {"a": [[1, 2]], "b": [[1, 2, 3]], "c": [[1]]}},
        "application/json",
        400,
        "unknown input name(s) ['c']",
    ),
    (
        "missing input",
        {"model": "multi", "inputs": {"a": [[1, 2]]}},
        "application/json",
        400,
        "missing input(s) ['b']",
    ),
    (
        "rows disagree between inputs",
        {"model": "multi", "inputs": {"a": [[1, 2], [3, 4]], "b": [[1, 2, 3]]}},
        "application/json",
        400,
        "inputs.b: has 1 rows but inputs.a has 2",
    ),
    (
        "list for a multi-input model",
        {"model": "multi", "inputs": [[1, 2]]},
        "application/json",
        400,
        "takes several inputs",
    ),
    ("image pixel count", {"model": "img", "inputs": [[0.0] * 15]}, "application/json", 400, "[N, 1, 4, 4]"),
    (
        "sequence step width",
        {"model": "seq", "inputs": [[[1, 2], [3, 4, 5]]]},
        "application/json",
        400,
        "inputs[0]",
    ),
    (
        "empty sequence",
        {"model": "seq", "inputs": [[]]},
        "application/json",
        400,
        "inputs[0]: expected a non-empty",
    ),
    ("unknown model", body(model="nope"), "application/json", 404, "unknown model 'nope'"),
    ("unknown version", body(version=9), "application/json", 404, "has no version 9"),
    ("malformed JSON", b'{"model": "clf", "inputs": [[1, 2', "application/json", 400, "malformed JSON"),
    ("not an object", b"[1, 2, 3]", "application/json", 400, "expected a JSON object"),
    ("empty body", b"", "application/json", 400, "empty body"),
    ("wrong content type", b"model=clf", "application/x-www-form-urlencoded", 415, "send application/json"),
    ("text content type", b'{"model": "clf"}', "text/plain", 415, "'text/plain'"),
    ("body too large", body(inputs=[[1.0, 2.0, 3.0, 4.0]] * 400), "application/json", 413, "over the limit"),
]
