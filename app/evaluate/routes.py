"""`POST /evaluate`, a hot route of the front (`app.http.front`): a JSON body, or a streamed NDJSON / CSV /
NPZ upload.

The body is never handed to FastAPI: a JSON body is read whole (bounded by the body limit) and parsed by
orjson; a streamed upload is read from the ASGI ``receive`` channel chunk by chunk, so a million-row CSV
is scored in bounded memory. A streamed body names the model (and, for CSV, the label column) in the
query string: ``POST /evaluate?model=digits&label_column=label``. Each chunk is validated once (by the
runner) and goes through `DataPlane.run_validated(..., background=True)`, the same batcher as `/predict`, in
pieces of one batch, so `/predict` rows are served first.

After every evaluation ``modelserve_evaluation_score{model,metric}`` holds its scalar scores.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import parse_qs

import orjson

from app.dataplane import DataPlane
from app.errors import InvalidInput, UnsupportedMediaType
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
from app.evaluate.runner import Tensors, evaluate, flat_scores
from app.evaluate.schemas import EvaluateRequest
from app.http.asgi import RequestBody, Scope, is_json, media_type
from app.http.front import Answer, Front, HotRequest, HotRoute
from app.http.openapi import BINARY_SCHEMA, MODEL_NAME_SCHEMA, POSITIVE_INTEGER_TEXT_SCHEMA, Operation
from app.http.params import parse_version
from app.settings import Settings

ENDPOINT = "/evaluate"
"""Its path, and the `endpoint` label of its request metrics."""
STREAM_CHUNK_ROWS = 512
"""Rows parsed per step of a streamed upload while no interactive request is being served."""
INTERACTIVE_CHUNK_ROWS = 128
"""Rows per parsing step while interactive requests (`/predict`, V2 infer) are being served: the numbers of
a CSV chunk are parsed in a low-priority thread without the GIL, but the per-line work (column counts,
labels; all of NDJSON) runs on the event loop, so a step is what an arriving request may have to wait for."""
INTERACTIVE_PIECE_ROWS = 16
"""Evaluation rows per onnxruntime call while interactive requests are being served, one call at a
time: the batch an interactive request may find in flight is small, and the model is idle between
evaluation calls (the batcher already puts interactive rows ahead of queued evaluation rows)."""
INTERACTIVE_WINDOW_SECONDS = 10.0
"""How long after the last interactive request was seen the small steps above stay in force."""
YIELD_STEP_SECONDS = 0.0005
"""While interactive requests are in flight, the evaluation checks again after this long ..."""
MAX_YIELD_SECONDS = 0.05
"""... but waits at most this long per chunk, so a steady `/predict` load slows it without starving it."""
MAX_UPLOAD_BYTES = 4 * 1024**3
"""Largest NPZ upload (a zip needs random access, so it is spooled to a temporary file: the temporary
directory must have room for it). Text formats are never stored, so they have no limit."""
DRAIN_AFTER_ERROR_BYTES = 64 * 1024**2
"""After an early error, read (and drop) up to this much of the rest of the upload so that the client,
still sending, gets the answer instead of a reset connection."""

NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
CSV_TYPES = frozenset({"text/csv", "application/csv"})
NPZ_TYPES = frozenset({"application/x-npz", "application/octet-stream", "application/zip"})
QUERY_KEYS = frozenset({"model", "version", "label_column", "zero_division", "top_k", "pos_label"})


def duty_cycle_sleep_seconds(worked_seconds: float, busy_fraction: float) -> float:
    """How long to sleep after ``worked_seconds`` of work so that work is ``busy_fraction`` of wall time."""
    if busy_fraction >= 1.0 or worked_seconds <= 0.0:
        return 0.0
    return worked_seconds * (1.0 - busy_fraction) / busy_fraction


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
        self._interactive_seen_at = -math.inf

    async def _infer(self, model: Any, inputs: Tensors) -> Tensors:
        # the runner validated the chunk these rows come from
        outputs: Tensors = await self.dataplane.run_validated(model, dict(inputs), background=True)
        return outputs

    def _interactive_in_flight(self) -> bool:
        """Whether an interactive request (`/predict`, V2 infer) is being answered."""
        if self.dataplane.interactive_requests > 0:
            self._interactive_seen_at = time.monotonic()
            return True
        return False

    def _interactive_lately(self) -> bool:
        return time.monotonic() - self._interactive_seen_at < INTERACTIVE_WINDOW_SECONDS

    def chunk_rows(self) -> int:
        """Rows per parsing step now: large when alone, small while interactive requests come in."""
        return INTERACTIVE_CHUNK_ROWS if self._interactive_lately() else STREAM_CHUNK_ROWS

    def piece_rows(self) -> int:
        """Rows per onnxruntime call now: a full batch when alone, a small one while interactive."""
        batch = self.settings.max_batch_rows
        return min(INTERACTIVE_PIECE_ROWS, batch) if self._interactive_lately() else batch

    def pieces_in_flight(self) -> int:
        """Evaluation calls in the batcher at once: two when alone (the model never waits), one while
        interactive requests come in (the model is free between evaluation calls)."""
        return 1 if self._interactive_lately() else 2

    def _duty_cycle(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> Callable[[], Awaitable[None]]:
        """One evaluation's pause before each chunk: while interactive requests are seen, sleep in
        proportion to the time since the last pause (reading, parsing, waiting for the model: an upper
        bound of its work), so that the evaluation, whose event-loop share cannot be niced, works at most
        `evaluation_busy_fraction_under_load` of the wall time; then `_yield_to_interactive`."""
        resumed_at: float | None = None

        async def pause() -> None:
            nonlocal resumed_at
            if resumed_at is not None and (self._interactive_in_flight() or self._interactive_lately()):
                worked = clock() - resumed_at
                await sleep(
                    duty_cycle_sleep_seconds(worked, self.settings.evaluation_busy_fraction_under_load)
                )
            await self._yield_to_interactive()
            resumed_at = clock()

        return pause

    async def _yield_to_interactive(self) -> None:
        """Hold the evaluation back (bounded) while interactive requests are in flight: parsing a chunk
        runs on the event loop, and the batcher already lets their rows overtake queued evaluation rows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_YIELD_SECONDS
        while self._interactive_in_flight() and loop.time() < deadline:  # noqa: ASYNC110 (a poll: no event to wait on)
            await asyncio.sleep(YIELD_STEP_SECONDS)

    async def __call__(self, request: HotRequest) -> Answer:
        """Read the rows as they arrive, score them, answer the report."""
        model, options, chunks = await self._open(request.scope, request.body)
        request.model = model.name
        async with aclosing(chunks):
            report = await evaluate(
                model,
                chunks,
                lambda inputs: self._infer(model, inputs),
                options,
                piece_rows=self.piece_rows,
                max_inflight_pieces=self.pieces_in_flight,
                pause=self._duty_cycle(),
            )
        self.dataplane.metrics.set_evaluation_scores(model.name, flat_scores(report))
        return Answer(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))

    async def _open(self, scope: Scope, body: RequestBody) -> tuple[Any, EvaluationOptions, Any]:
        """Pick the reader for the content type; find the model; parse the options."""
        media = media_type(scope)
        query = _query(scope)
        if is_json(media):
            raw = await body.read(self.settings.max_body_bytes)
            request = parse_json_body(raw)
            model = self.dataplane.get_model(request.model, request.version)
            return model, request.options, json_chunks(request, Schema.of(model))
        if media not in NDJSON_TYPES | CSV_TYPES | NPZ_TYPES:
            raise UnsupportedMediaType(
                f"content type {media!r} is not supported; send application/json, application/x-ndjson, "
                "text/csv or application/x-npz"
            )
        name = query.get("model")
        if not name:
            raise InvalidInput(
                "a streamed body names its model in the query string: POST /evaluate?model=<name>"
            )
        model = self.dataplane.get_model(name, parse_version(query.get("version")))
        options = EvaluationOptions.parse(
            query.get("zero_division"), query.get("top_k"), query.get("pos_label")
        )
        schema = Schema.of(model)
        stream = body.stream()
        chunks: Any
        if media in NDJSON_TYPES:
            chunks = ndjson_chunks(stream, schema, self.chunk_rows)
        elif media in CSV_TYPES:
            chunks = csv_chunks(stream, schema, query.get("label_column") or None, self.chunk_rows)
        else:
            chunks = npz_chunks(stream, schema, self.chunk_rows, max_bytes=MAX_UPLOAD_BYTES)
        return model, options, chunks


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


__all__ = ["Chunk", "EvaluateEndpoint", "install"]
