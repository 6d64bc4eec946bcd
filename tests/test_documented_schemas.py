"""The request schemas in the OpenAPI document say what the parsers really accept.

For each JSON request body of the raw routes (`/predict`, `/evaluate`, V2 infer), read from the live
`/openapi.json`: a request with only the required fields is answered 200; adding any one documented optional
field (with a valid value) still is; dropping a required field is a 400; and an undocumented field is a 400
exactly when the schema says `additionalProperties: false`.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.factories import CLASSIFIER_LABELS

ROW = [5.1, 3.5, 1.4, 0.2]  # the `clf` fixture model takes 4 features

# path → (a request with only the required fields, a valid value for every documented optional field)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "/predict": (
        {"model": "clf", "inputs": [ROW]},
        {"version": 1, "top_k": 2},
    ),
    "/evaluate": (
        {"model": "clf", "inputs": [ROW, ROW], "labels": [CLASSIFIER_LABELS[0], CLASSIFIER_LABELS[1]]},
        {"version": 1, "top_k": 2, "zero_division": "nan", "pos_label": CLASSIFIER_LABELS[0]},
    ),
    "/v2/models/clf/infer": (
        {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ROW}]},
        {
            "id": "request-1",
            "parameters": {"binary_data_output": False},
            "outputs": [{"name": "probabilities"}],
        },
    ),
}
# Optional fields that the fixture models cannot use: the parser reads them and refuses the value with this
# message (which shows the field was understood, not rejected as unknown).
READ_BUT_REFUSED = {("/evaluate", "pos_label"): "pos_label applies to two-class models"}
DOCUMENTED_PATH = {"/v2/models/clf/infer": "/v2/models/{model}/infer"}


def _request_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return dict(schema)


@pytest.fixture(scope="module")
def api(model_repository: Any) -> Any:
    from app.main import create_app
    from app.settings import Settings

    # every version served: the documented examples name `clf` version 1
    app = create_app(Settings(model_repository=model_repository, access_log=False, served_versions=0))
    with TestClient(app) as client:
        yield client, client.get("/openapi.json").json()


@pytest.mark.parametrize("path", list(CASES))
def test_documented_fields_are_the_accepted_fields(api: tuple[TestClient, dict[str, Any]], path: str) -> None:
    client, document = api
    schema = _request_schema(document, DOCUMENTED_PATH.get(path, path))
    required, optional_values = CASES[path]
    properties = set(schema["properties"])
    assert set(schema.get("required", [])) == set(required), "required fields differ from the documented ones"
    assert properties == set(required) | set(optional_values), "the test must cover every documented field"

    response = client.post(path, json=required)
    assert response.status_code == 200, response.text
    for name, value in optional_values.items():
        response = client.post(path, json=required | {name: value})
        refusal = READ_BUT_REFUSED.get((path, name))
        if refusal is None:
            assert response.status_code == 200, (name, response.text)
        else:
            assert response.status_code == 400
            assert refusal in response.json()["error"]
    for name in required:
        response = client.post(path, json={k: v for k, v in required.items() if k != name})
        assert response.status_code == 400, (name, response.text)

    response = client.post(path, json=required | {"undocumented_field": 1})
    closed = schema.get("additionalProperties") is False
    assert response.status_code == (400 if closed else 200), response.text
