"""`POST /feedback` (a hot route of the front: the body is read whole, bounded by the body limit, and never
passes through FastAPI) and `GET /models/{name}/quality` (a plain FastAPI route)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from app.errors import UnsupportedMediaType
from app.http.asgi import NDJSON_TYPES, is_json, media_type
from app.http.errors import ErrorResponse
from app.http.front import Answer, Front, HotRequest, HotRoute
from app.http.openapi import ERROR_HEADERS, JSON_TYPE, MODEL_NAME_SCHEMA, Operation
from app.quality.feedback import Feedback, parse_items
from app.quality.schemas import FeedbackRequest, FeedbackResponse, QualityResponse

ENDPOINT = "/feedback"
"""Its path, and the `endpoint` label of its request metrics."""

FEEDBACK_OPERATION = Operation(
    operation_id="feedback",
    summary="Feedback",
    description=(
        "The true labels of served predictions, named by the ids of their answers (`id` in each `/predict` "
        'prediction, `parameters.prediction_ids` in a V2 answer). Body: JSON `{"items": [...]}`, or NDJSON '
        "(`application/x-ndjson`, one item per line) for large backfills. Each item is checked on its own "
        "(the id is genuine, not expired, of a model version served now or whose card is still in the "
        "repository, and not counted before; the label is one of the model's classes, or a number for a "
        "regressor) and counted once; a bad item is reported "
        "in `errors` by its position and never stops the others, so the answer is 200 even when none was "
        "counted. Counted items update `modelserve_feedback_total` (classifiers) or "
        "`modelserve_feedback_regression_sum` (regressors) and the live scores of "
        "`GET /models/{name}/quality`."
    ),
    tags=("feedback",),
    ok="How many items were counted, and why the others were not",
    answer=FeedbackResponse,
    errors={
        400: 'Malformed JSON, no items, or a JSON body that is not {"items": [...]}',
        401: "Missing or wrong API key",
        413: "Body too large",
        415: "Content type is neither JSON nor NDJSON",
    },
    # Any text is a body: each line is an item, and a line that is not one is reported in `errors`.
    body={JSON_TYPE: FeedbackRequest, "application/x-ndjson": {"description": "one item per line"}},
)


class FeedbackEndpoint:
    """The handler of `POST /feedback`."""

    def __init__(self, feedback: Feedback) -> None:
        """Bind the app's feedback."""
        self.feedback = feedback

    async def __call__(self, request: HotRequest) -> Answer:
        """Read the items, check and count them, answer the tally."""
        media = media_type(request.scope)
        if not is_json(media) and media not in NDJSON_TYPES:
            raise UnsupportedMediaType(
                f"content type {media!r} is not supported; send application/json or application/x-ndjson"
            )
        body = await request.body.read(self.feedback.settings.max_body_bytes)
        items, errors = parse_items(body, ndjson=not is_json(media))
        return Answer(orjson.dumps(await self.feedback.receive(items, errors)))


router = APIRouter()


@router.get(
    "/models/{name}/quality",
    tags=["models"],
    summary="Live scores from feedback",
    response_model=None,
    responses={
        200: {"model": QualityResponse, "description": "The live scores beside the card's test metrics"},
        400: {"model": ErrorResponse, "description": "Invalid version"},
        404: {
            "model": ErrorResponse,
            "description": "Unknown model, or a version it neither serves nor has in the repository",
        },
        503: {
            "model": ErrorResponse,
            "description": "Model not ready (see Retry-After)",
            "headers": ERROR_HEADERS[503],
        },
    },
)
async def quality(
    # documented, not validated here: a name no model has is a 404
    name: Annotated[str, Path(json_schema_extra=dict(MODEL_NAME_SCHEMA))],
    request: Request,
    version: Annotated[int | None, Query(ge=1, description="default: the highest ready version")] = None,
) -> Response:
    """The scores of the model version's last `MODELSERVE_FEEDBACK_WINDOW` feedback items (`POST /feedback`),
    in the shape of an `/evaluate` report, computed the same way; `count` (every item counted for the
    version), the card's test metrics (`training`) and the live scores minus them (`difference`). Without
    feedback yet: `n` is 0 and there are no scores. The same answer from every worker of the server. A
    `version` no longer served (retired by a hot swap) is scored with the card of its folder in the
    repository, `drift` null."""
    feedback: Feedback = request.app.state.feedback
    report = await feedback.quality(name, version)
    return Response(orjson.dumps(report), media_type=JSON_TYPE)


def install(front: Front) -> None:
    """Answer `POST /feedback` in `front` (an app built by `create_app`) and mount the quality route."""
    endpoint = FeedbackEndpoint(front.state.feedback)
    route = HotRoute(endpoint, ENDPOINT, interactive=False)
    front.add_route(ENDPOINT, route, method="POST", operation=FEEDBACK_OPERATION)
    front.app.include_router(router)
