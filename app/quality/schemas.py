"""Pydantic models that document `POST /feedback` and `GET /models/{name}/quality` in OpenAPI.

`/feedback` does not validate with them: each item is checked on its own and a bad one is reported in the
answer's `errors`, so the schema of an item is only described (any JSON value is accepted into the list).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.quality.drift import DriftReport

ID_EXAMPLE = "AQZkaWdpdHMBAAAAAAAAAFhcD2tAoHGxpxS3CQMAAAAAAAAAS6PoRg1vMfxMQOmCjT1k3yEE"


class FeedbackRequest(BaseModel):
    """The true labels of served predictions, named by the ids their answers carried."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"items": [{"id": ID_EXAMPLE, "label": "7"}, {"id": ID_EXAMPLE, "label": 3}]},
                {"items": [{"id": ID_EXAMPLE, "label": 151.0}]},
            ]
        },
    )

    items: Annotated[list[Any], Field(min_length=1)] = Field(
        description=(
            'each `{"id": "<prediction id>", "label": <true label>}`: a class name (text) or class index '
            "(integer) for a classifier, a number for a regressor; an item that is not is reported in "
            "`errors` by its position"
        )
    )


class FeedbackError(BaseModel):
    """Why one item was not counted."""

    index: int = Field(ge=0, description="the item's position, from 0 (NDJSON: blank lines not counted)")
    error: str = Field(examples=["id: expired (issued 700000 s ago; feedback is taken for 604800 s)"])


class FeedbackResponse(BaseModel):
    """How many items were counted, and why the others were not."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"counted": 1, "errors": [{"index": 1, "error": "id: already counted (duplicate)"}]}]
        }
    )

    counted: int = Field(ge=0)
    errors: list[FeedbackError]


class QualityResponse(BaseModel):
    """Live scores of a model version from its last feedback items, in the shape of an `/evaluate` report
    (classifiers: `accuracy`, `precision`, `recall`, `f1`, `per_class`, `confusion_matrix`; regressors:
    `mse`, `rmse`, `mae`, `r2`, `max_error`), present once feedback was counted."""

    model_config = ConfigDict(extra="allow")

    model: str
    version: int
    task: Literal["classification", "regression"]
    count: int = Field(ge=0, description="feedback items counted for this version in all")
    window: int = Field(ge=1, description="the scores cover at most this many of the latest items")
    n: int = Field(ge=0, description="items the scores cover")
    training: dict[str, float] = Field(description="the card's test metrics")
    difference: dict[str, float] = Field(description="the live scores minus the card's, where both exist")
    drift: DriftReport | None = Field(
        description="input drift of the rows the server's worker processes served, over the window they "
        "share (null when the card carries no training summary or drift tracking is off)"
    )
