"""`POST /evaluate`, a hot route of the front (`app.http.front`): a JSON body, or a streamed NDJSON / CSV /
NPZ upload.

The body is never handed to FastAPI. A JSON body is read whole (bounded by the body limit), parsed by
orjson and scored here: each chunk is validated once (by the runner) and goes through
`DataPlane.run_validated`, the same batcher as `/predict`, in pieces of one batch, two at a time. A
streamed upload names the model (and, for CSV, the label column) in the query string: ``POST
/evaluate?model=digits&label_column=label``; it is read from the ASGI ``receive`` channel piece by piece
and scored in a worker process at the lowest CPU priority (`app.evaluate.worker`), so a million-row CSV
is scored in bounded memory and its parsing, inference and counting never hold up `/predict`.

After every evaluation ``modelserve_evaluation_score{model,metric}`` holds its scalar scores.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from app.dataplane import DataPlane
from app.errors import InvalidInput, UnsupportedMediaType
from app.evaluate.readers import EvaluationOptions, Schema, StreamFormat, json_chunks, parse_json_body
from app.evaluate.runner import Tensors, evaluate, flat_scores
from app.evaluate.schemas import EvaluateRequest
from app.evaluate.worker import EvaluationJob, evaluate_upload
from app.http.asgi import NDJSON_TYPES, Scope, is_json, media_type
from app.http.front import Answer, Front, HotRequest, HotRoute
from app.http.openapi import BINARY_SCHEMA, MODEL_NAME_SCHEMA, POSITIVE_INTEGER_TEXT_SCHEMA, Operation
from app.http.params import parse_version
from app.settings import Settings

ENDPOINT = "/evaluate"
"""Its path, and the `endpoint` label of its request metrics."""
PIECES_IN_FLIGHT = 2
"""Batcher calls of a JSON evaluation awaited at once: the model never waits for the next piece, and the
evaluation holds at most two batches of the queue."""
DRAIN_AFTER_ERROR_BYTES = 64 * 1024**2
"""After an early error, read (and drop) up to this much of the rest of the upload so that the client,
still sending, gets the answer instead of a reset connection."""

FORMATS: dict[str, StreamFormat] = {
    **dict.fromkeys(NDJSON_TYPES, "ndjson"),
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-npz": "npz",
    "application/octet-stream": "npz",
    "application/zip": "npz",
}
"""The streamed formats by content type."""
QUERY_KEYS = frozenset({"model", "version", "label_column", "zero_division", "top_k", "pos_label"})


def _query(scope: Scope) -> dict[str, str]:
    raw = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    unknown = sorted(set(raw) - QUERY_KEYS)
    if unknown:
        raise InvalidInput(f"unknown query parameter(s) {unknown}; expected {sorted(QUERY_KEYS)}")
    return {key: values[-1] for key, values in raw.items()}


class EvaluateEndpoint:
    """The handler of `POST /evaluate`."""

    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        """Bind the core and the limits."""
        self.dataplane = dataplane
        self.settings = settings

    async def __call__(self, request: HotRequest) -> Answer:
        """Score the rows (a JSON body here, a streamed upload in a worker process); answer the report."""
        media = media_type(request.scope)
        query = _query(request.scope)
        if is_json(media):
            report = await self._json(request)
        elif media in FORMATS:
            report = await self._streamed(request, FORMATS[media], query)
        else:
            raise UnsupportedMediaType(
                f"content type {media!r} is not supported; send application/json, application/x-ndjson, "
                "text/csv or application/x-npz"
            )
        self.dataplane.metrics.set_evaluation_scores(request.model, flat_scores(report))
        return Answer(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))

    async def _json(self, request: HotRequest) -> dict[str, Any]:
        body = parse_json_body(await request.body.read(self.settings.max_body_bytes))
        model = self.dataplane.get_model(body.model, body.version)
        request.model = model.name

        async def infer(inputs: Tensors) -> Tensors:
            # the runner validated the chunk these rows come from
            outputs: Tensors = await self.dataplane.run_validated(model, dict(inputs), live=False)
            return outputs

        return await evaluate(
            model,
            json_chunks(body, Schema.of(model)),
            infer,
            body.options,
            piece_rows=self.settings.max_batch_rows,
            max_inflight_pieces=PIECES_IN_FLIGHT,
        )

    async def _streamed(
        self, request: HotRequest, fmt: StreamFormat, query: dict[str, str]
    ) -> dict[str, Any]:
        name = query.get("model")
        if not name:
            raise InvalidInput(
                "a streamed body names its model in the query string: POST /evaluate?model=<name>"
            )
        model = self.dataplane.get_model(name, parse_version(query.get("version")))
        job = EvaluationJob(
            source=self.dataplane.source_of(model),
            sha256=model.card.onnx.sha256,
            providers=list(model.providers),
            settings=self.settings,
            fmt=fmt,
            label_column=query.get("label_column") or None,
            options=EvaluationOptions.parse(
                query.get("zero_division"), query.get("top_k"), query.get("pos_label")
            ),
        )
        request.model = model.name
        return await evaluate_upload(job, request.body.stream())


EVALUATE_OPERATION = Operation(
    operation_id="evaluate",
    summary="Evaluate",
    description=(
        "Score labelled rows with a model, as scikit-learn would. Body: JSON "
        '`{"model", "inputs", "labels", "version"?, "zero_division"?, "top_k"?, "pos_label"?}`, or a '
        'streamed NDJSON (`application/x-ndjson`, one `{"input", "label"}` per line), CSV (`text/csv`, '
        "header row, label column named by `label_column`, default `label`) or NPZ (`application/x-npz`, "
        "arrays `inputs` and `labels`) upload whose model is named in the query string. A sequence model "
        "takes one list of steps per row (JSON, NDJSON), or NPZ `inputs` right-padded [N, steps, channels] "
        "with `lengths` [N] or `mask` [N, steps]."
    ),
    tags=("evaluation",),
    ok="The report: scores, the card's test metrics and the differences",
    errors={
        400: "Invalid data; the message names the row",
        404: "Unknown model or version",
        413: "Body too large",
        415: "Unsupported content type",
        503: "Model not ready",
    },
    body={
        "application/json": EvaluateRequest,
        "application/x-ndjson": {"type": "string"},
        "text/csv": {"type": "string"},
        "application/x-npz": BINARY_SCHEMA,
    },
    query=tuple(sorted(QUERY_KEYS)),
    parameters={
        "model": MODEL_NAME_SCHEMA,
        "version": POSITIVE_INTEGER_TEXT_SCHEMA,
        "top_k": POSITIVE_INTEGER_TEXT_SCHEMA,
        "zero_division": {"type": "string", "enum": ["0", "1", "nan"]},
    },
)


def install(front: Front) -> None:
    """Answer `POST /evaluate` in `front` (an app built by `create_app`)."""
    endpoint = EvaluateEndpoint(front.state.dataplane, front.state.settings)
    route = HotRoute(endpoint, ENDPOINT, interactive=False, drain_after_error_bytes=DRAIN_AFTER_ERROR_BYTES)
    front.add_route(ENDPOINT, route, method="POST", operation=EVALUATE_OPERATION)


__all__ = ["EvaluateEndpoint", "install"]
