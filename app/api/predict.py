"""`POST /predict`: JSON in, predictions out, a hot route (answered by `app.http.front`, before FastAPI).

The body is parsed with orjson straight into numpy (no per-number pydantic validation);
`PREDICT_OPERATION` documents the route in OpenAPI.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from app.api.schemas import PredictRequest, PredictResponse
from app.errors import InvalidInput
from app.http.asgi import require_json
from app.http.front import Answer, HotRequest
from app.http.openapi import JSON_TYPE, REQUEST_TIMEOUT_HEADER, REQUEST_TIMEOUT_SCHEMA, Operation
from app.http.params import parse_version
from app.model_card import (
    MASK_INPUT,
    PROBABILITIES_OUTPUT,
    REGRESSION_OUTPUT,
    SEQUENCE_INPUT,
)
from app.quality.ids import PREDICTION_IDS, predictions_of
from app.repository import LoadedModel

ENDPOINT = "/predict"
"""The `endpoint` label of the request metrics."""
_FIELDS = frozenset({"model", "version", "inputs", "top_k"})
_INVALID_VERSION = "version: expected a positive integer, got {value!r}"

PREDICT_OPERATION = Operation(
    operation_id="predict",
    summary="Predict",
    description="Run a model on rows of input. Concurrent requests are batched together transparently.",
    tags=("inference",),
    ok="One prediction per row",
    answer=PredictResponse,
    errors={
        400: "Malformed JSON or invalid input (shape, dtype, NaN/Inf, unknown input name)",
        401: "Missing or wrong API key",
        404: "Unknown model or version",
        413: "Body too large",
        415: "Content type is not application/json",
        503: "Model not ready or queue full (see Retry-After)",
        504: "Waited too long in the queue",
    },
    body={JSON_TYPE: PredictRequest},
    headers=(REQUEST_TIMEOUT_HEADER,),
    parameters={REQUEST_TIMEOUT_HEADER: REQUEST_TIMEOUT_SCHEMA},
)


# -------------------------------------------------------------------------------------------- decoding
def parse_request(body: bytes) -> tuple[str, int | None, Any, int | None]:
    """Check the envelope of a /predict body: `(model, version, inputs, top_k)`; raises `InvalidInput`."""
    if not body:
        raise InvalidInput('empty body; send {"model": "<name>", "inputs": [[...], ...]}')
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"malformed JSON: {err}") from err
    if not isinstance(document, dict):
        raise InvalidInput('body: expected a JSON object {"model": "<name>", "inputs": [...]}')
    if not _FIELDS.issuperset(document):
        unknown = sorted(set(document) - _FIELDS)
        raise InvalidInput(f"body: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("model: required, the name of a served model (see GET /models)")
    if "inputs" not in document:
        raise InvalidInput("inputs: required, one item per example")
    version = parse_version(document.get("version"), strict=True, invalid=_INVALID_VERSION)
    return model, version, document["inputs"], _top_k(document.get("top_k"))


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"top_k: expected a positive integer, got {value!r}")
    return value


def decode_inputs(model: LoadedModel, raw: Any) -> dict[str, Any]:
    """Map the `inputs` field onto graph inputs.

    A list feeds a one-input model (or a sequence model: ragged sequences are right-padded and the mask is
    built here); an object maps input names to values. Shapes and dtypes are checked later by
    `LoadedModel.validate_inputs`.
    """
    if isinstance(raw, dict):
        if model.pads_sequences and SEQUENCE_INPUT in raw and MASK_INPUT not in raw:
            return model.pad_sequences(raw[SEQUENCE_INPUT])
        return raw
    if not isinstance(raw, list):
        raise InvalidInput("inputs: expected a list of examples, or an object mapping input names to lists")
    if not raw:
        raise InvalidInput("inputs: empty; send at least one example")
    if model.pads_sequences:
        return model.pad_sequences(raw)
    if len(model.input_names) != 1:
        raise InvalidInput(
            f"inputs: model {model.name!r} takes several inputs {model.input_names}; "
            'send {"inputs": {"<input name>": [...], ...}}'
        )
    return {model.input_names[0]: raw}


# -------------------------------------------------------------------------------------------- encoding
def encode_predictions(model: LoadedModel, outputs: dict[str, np.ndarray], top_k: int | None) -> list[Any]:
    """One prediction per row: `{label, index, score[, top_k]}` for classifiers, `{value}` for regressors."""
    if model.task != "classification":
        values = outputs[REGRESSION_OUTPUT]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        return [{"value": value} for value in values.tolist()]
    labels = model.labels or []
    probabilities = outputs[PROBABILITIES_OUTPUT]
    indices = predictions_of(model.task, outputs)
    rows = probabilities.tolist()
    predictions: list[dict[str, Any]] = [
        {"label": labels[index], "index": index, "score": row[index]}
        for row, index in zip(rows, indices.tolist(), strict=True)
    ]
    if top_k is not None:
        k = min(top_k, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k].tolist()
        for prediction, row, best in zip(predictions, rows, order, strict=True):
            prediction["top_k"] = [{"label": labels[i], "index": i, "score": row[i]} for i in best]
    return predictions


# -------------------------------------------------------------------------------------------- handler
async def predict(request: HotRequest) -> Answer:
    """Decode the body, run its rows through the core, encode the predictions, each with its id (none when
    `prediction_ids` is off)."""
    require_json(request.scope)
    dataplane = request.dataplane
    body = await request.body.read(dataplane.settings.max_body_bytes)
    name, version, raw_inputs, top_k = parse_request(body)
    model = dataplane.get_model(name, version)
    request.model = model.name
    if top_k is not None and model.task != "classification":
        raise InvalidInput("top_k: only classifiers rank classes; drop it for a regression model")
    outputs = await dataplane.infer(
        model, decode_inputs(model, raw_inputs), deadline_seconds=request.deadline_seconds
    )
    predictions = encode_predictions(model, outputs, top_k)
    issued = outputs.get(PREDICTION_IDS)
    if issued is not None:
        for prediction, row_id in zip(predictions, issued.tolist(), strict=True):
            prediction["id"] = row_id
    answer = {"model": model.name, "version": model.version, "predictions": predictions}
    return Answer(orjson.dumps(answer))
