"""One validator: the same bad value gets the same 400 and the same words on every route.

Each case sends the same rows to `/predict`, V2 infer and `/evaluate` in every format that can carry
them (JSON, NDJSON, CSV, NPZ) on a real app, and expects from each exactly ``{place}: {problem}``: the
problem in the same words everywhere, the place in each route's own terms (``inputs[1][1]`` in a
request, ``input 'x' data[1][1]`` in a V2 tensor, ``row 2: input 'x'[1]`` in an evaluation set).

What a format cannot carry is left out: JSON has no NaN (the body is malformed JSON), NDJSON and CSV
rows cannot give a sequence model its mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.factories import (
    CLASSIFIER_LABELS,
    copy_repository,
    csv_body,
    integer_classifier,
    ndjson_body,
    npz_body,
    without_ids,
    write_model,
)

Answer = tuple[int, str]
Send = Callable[[TestClient], Answer]


@pytest.fixture(scope="module")
def client(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The fixture models `clf` and `seq`, and `counts`, whose input is int64."""
    root = copy_repository(model_repository, tmp_path_factory.mktemp("agree-models"), ["clf", "seq"])
    write_model(root, "counts", 1, integer_classifier())
    with TestClient(create_app(Settings(model_repository=root, access_log=False))) as test_client:
        yield test_client


def answer(response: Any) -> Answer:
    return response.status_code, response.json().get("error", "")


# ------------------------------------------------------------------------------------------ the routes


def predict(model: str, inputs: Any) -> Send:
    return lambda client: answer(client.post("/predict", json={"model": model, "inputs": inputs}))


def v2_json(model: str, *tensors: tuple[str, str, Any]) -> Send:
    """V2 infer with JSON tensors ``(name, datatype, rows)``."""
    body = {
        "inputs": [
            {"name": name, "datatype": datatype, "shape": list(np.shape(rows)), "data": rows}
            for name, datatype, rows in tensors
        ]
    }
    return lambda client: answer(client.post(f"/v2/models/{model}/infer", content=orjson.dumps(body)))


def v2_binary(model: str, name: str, array: np.ndarray) -> Send:
    """V2 infer with one FP32 tensor in the binary extension (which, unlike JSON, carries NaN)."""
    data = array.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    )
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return lambda client: answer(
        client.post(f"/v2/models/{model}/infer", content=header + data, headers=headers)
    )


def evaluate_json(model: str, inputs: Any, labels: list[Any]) -> Send:
    body = {"model": model, "inputs": inputs, "labels": labels}
    return lambda client: answer(client.post("/evaluate", json=body))


def evaluate_upload(model: str, media: str, content: bytes) -> Send:
    headers = {"content-type": media}
    return lambda client: answer(client.post(f"/evaluate?model={model}", content=content, headers=headers))


def evaluate_ndjson(model: str, rows: list[Any], labels: list[Any]) -> Send:
    return evaluate_upload(model, "application/x-ndjson", ndjson_body(rows, labels))


def evaluate_csv(model: str, rows: list[Any], labels: list[Any]) -> Send:
    return evaluate_upload(model, "text/csv", csv_body(rows, labels))


def evaluate_npz(model: str, **arrays: Any) -> Send:
    return evaluate_upload(model, "application/x-npz", npz_body(**arrays))


# ------------------------------------------------------------------------------------------ the cases

COUNTS_LABELS = ["low", "high"]
CLF_LABELS = list(CLASSIFIER_LABELS[:2])
SEQ_LABELS = ["calm", "stormy"]

# An integer input given 1.7 (row 2, value 1).
WHOLE = [[1, 2, 3], [4, 1.7, 6]]
# A bool mask given 0.5 (row 2, step 1).
SEQUENCE = [[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]]
MASK = [[1, 1], [1, 0.5]]
# NaN (row 2, value 1), and a number beyond float32.
NAN = [[1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 3.0, 4.0]]
HUGE = [[1.0, 2.0, 3.0, 4.0], [1.0, 1e39, 3.0, 4.0]]
# Rows of 3 values where the model takes 4.
NARROW = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
# Text where a number belongs (row 2, value 1).
TEXT: list[list[Any]] = [[1, 2, 3, 4], [1, "a", 3, 4]]

CASES: dict[str, tuple[str, dict[str, tuple[Send, str]]]] = {
    "integer input given 1.7": (
        "1.7 is not a whole number; the input takes int64 values",
        {
            "/predict": (predict("counts", WHOLE), "inputs[1][1]"),
            "V2": (v2_json("counts", ("counts", "INT64", WHOLE)), "input 'counts' data[1][1]"),
            "JSON": (evaluate_json("counts", WHOLE, COUNTS_LABELS), "row 2: input 'counts'[1]"),
            "NDJSON": (evaluate_ndjson("counts", WHOLE, COUNTS_LABELS), "row 2: input 'counts'[1]"),
            "CSV": (evaluate_csv("counts", WHOLE, COUNTS_LABELS), "row 2: input 'counts'[1]"),
            "NPZ": (
                evaluate_npz("counts", inputs=np.array(WHOLE), labels=np.array(COUNTS_LABELS)),
                "row 2: input 'counts'[1]",
            ),
        },
    ),
    "bool mask given 0.5": (
        "0.5 is not true/false (or 0/1)",
        {
            "/predict": (predict("seq", {"sequence": SEQUENCE, "mask": MASK}), "inputs.mask[1][1]"),
            "V2": (
                v2_json("seq", ("sequence", "FP32", SEQUENCE), ("mask", "BOOL", MASK)),
                "input 'mask' data[1][1]",
            ),
            "JSON": (
                evaluate_json("seq", {"sequence": SEQUENCE, "mask": MASK}, SEQ_LABELS),
                "row 2: input 'mask'[1]",
            ),
            "NPZ": (
                evaluate_npz("seq", inputs=np.array(SEQUENCE), mask=np.array(MASK), labels=[0, 1]),
                "row 2: input 'mask'[1]",
            ),
        },
    ),
    "NaN": (
        "NaN or Inf is not a valid input",
        {
            "V2": (v2_binary("clf", "features", np.array(NAN)), "inputs[1][1]"),
            "CSV": (evaluate_csv("clf", NAN, CLF_LABELS), "row 2: input 'features'[1]"),
            "NPZ": (evaluate_npz("clf", inputs=np.array(NAN), labels=[0, 1]), "row 2: input 'features'[1]"),
        },
    ),
    "beyond float32": (
        "1e+39 is out of range for float32 (largest magnitude 3.40282e+38)",
        {
            "/predict": (predict("clf", HUGE), "inputs[1][1]"),
            "V2": (v2_json("clf", ("features", "FP32", HUGE)), "input 'features' data[1][1]"),
            "JSON": (evaluate_json("clf", HUGE, CLF_LABELS), "row 2: input 'features'[1]"),
            "NDJSON": (evaluate_ndjson("clf", HUGE, CLF_LABELS), "row 2: input 'features'[1]"),
            "CSV": (evaluate_csv("clf", HUGE, CLF_LABELS), "row 2: input 'features'[1]"),
            "NPZ": (evaluate_npz("clf", inputs=np.array(HUGE), labels=[0, 1]), "row 2: input 'features'[1]"),
        },
    ),
    "wrong row width": (
        "expected shape [N, 4], got [2, 3] (rows of 3 values where the model takes 4)",
        {
            "/predict": (predict("clf", NARROW), "inputs"),
            "V2": (v2_json("clf", ("features", "FP32", NARROW)), "inputs"),
            "JSON": (evaluate_json("clf", NARROW, CLF_LABELS), "rows 1-2: input 'features'"),
            "NDJSON": (evaluate_ndjson("clf", NARROW, CLF_LABELS), "rows 1-2: input 'features'"),
            "CSV": (evaluate_csv("clf", NARROW, CLF_LABELS), "rows 1-2: input 'features'"),
            "NPZ": (
                evaluate_npz("clf", inputs=np.array(NARROW, np.float32), labels=[0, 1]),
                "rows 1-2: input 'features'",
            ),
        },
    ),
    "text where a number belongs": (
        "'a' is not a number",
        {
            "/predict": (predict("clf", TEXT), "inputs[1][1]"),
            "V2": (v2_json("clf", ("features", "FP32", TEXT)), "input 'features' data[1][1]"),
            "JSON": (evaluate_json("clf", TEXT, CLF_LABELS), "row 2: input 'features'[1]"),
            "NDJSON": (evaluate_ndjson("clf", TEXT, CLF_LABELS), "row 2: input 'features'[1]"),
            "CSV": (evaluate_csv("clf", TEXT, CLF_LABELS), "row 2: column 'f1'"),
            "NPZ": (
                evaluate_npz("clf", inputs=np.array(TEXT, dtype=str), labels=[0, 1]),
                "row 2: input 'features'[1]",
            ),
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_route_refuses_a_bad_value_in_the_same_words(client: TestClient, case: str) -> None:
    problem, routes = CASES[case]
    answers = {route: send(client) for route, (send, _) in routes.items()}
    expected = {route: (400, f"{place}: {problem}") for route, (_, place) in routes.items()}
    assert answers == expected


def test_whole_numbers_and_0_or_1_are_taken_everywhere(client: TestClient) -> None:
    """The other side of the rule: 1.0 for an integer input is 1, and 0/1 for a bool input are false/true."""
    whole = [[1.0, 2, 3], [4, 5.0, 6]]
    mask = [[1, 1], [1, 0]]
    sends = [
        predict("counts", whole),
        v2_json("counts", ("counts", "INT64", whole)),
        evaluate_json("counts", whole, COUNTS_LABELS),
        evaluate_ndjson("counts", whole, COUNTS_LABELS),
        evaluate_csv("counts", whole, COUNTS_LABELS),
        evaluate_npz("counts", inputs=np.array(whole), labels=np.array(COUNTS_LABELS)),
        predict("seq", {"sequence": SEQUENCE, "mask": mask}),
        v2_json("seq", ("sequence", "FP32", SEQUENCE), ("mask", "BOOL", mask)),
        evaluate_json("seq", {"sequence": SEQUENCE, "mask": mask}, SEQ_LABELS),
        evaluate_npz("seq", inputs=np.array(SEQUENCE), mask=np.array(mask, dtype=float), labels=[0, 1]),
    ]
    assert [send(client) for send in sends] == [(200, "")] * len(sends)
    # the same predictions for 1.0 as for 1
    as_floats = client.post("/predict", json={"model": "counts", "inputs": whole}).json()
    as_ints = client.post("/predict", json={"model": "counts", "inputs": [[1, 2, 3], [4, 5, 6]]}).json()
    assert without_ids(as_floats.pop("predictions")) == without_ids(as_ints.pop("predictions"))
    assert as_floats == as_ints
