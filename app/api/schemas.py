"""Pydantic models that document the simple API in OpenAPI.

`/predict` does not validate with them (it parses with orjson into numpy); they exist so `/docs` shows
the request and response shapes with examples.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.dataplane import ModelStatus
from app.http.openapi import ModelName, Rows, RowsByInput, Version


class PredictRequest(BaseModel):
    """Rows to predict, shaped as the model's input without its batch axis."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], "top_k": 2},
                {"model": "digits", "version": 1, "inputs": [[0.0] * 64]},
                {"model": "waves", "inputs": [[[0.1], [0.5], [0.9]], [[0.3], [0.2]]]},
                {"model": "multi", "inputs": {"a": [[1.0, 2.0]], "b": [[3.0, 4.0, 5.0]]}},
            ]
        },
    )

    model: ModelName = Field(description="a served model's name (GET /models)")
    version: Version | None = Field(default=None, description="default: the highest ready version")
    inputs: Rows | RowsByInput = Field(
        description=(
            "one item per example; an image model also takes flattened pixels; a sequence model takes "
            "sequences of different lengths (padded and masked by the server); a model with several inputs "
            "takes an object mapping input names to lists"
        )
    )
    top_k: int | None = Field(default=None, ge=1, description="classifiers: also return the k best classes")


PREDICTION_ID_DESCRIPTION = "the prediction's id: send it back with the true label to POST /feedback"


class ClassScore(BaseModel):
    """One class and its probability."""

    label: str
    index: int
    score: float


class ClassPrediction(ClassScore):
    """A classifier's answer for one row (the most probable class)."""

    top_k: list[ClassScore] | None = Field(
        default=None, description="present when the request asked for top_k"
    )
    id: str = Field(description=PREDICTION_ID_DESCRIPTION)


class RegressionPrediction(BaseModel):
    """A regressor's answer for one row."""

    value: float
    id: str = Field(description=PREDICTION_ID_DESCRIPTION)


class PredictResponse(BaseModel):
    """One prediction per input row, in order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "iris",
                    "version": 1,
                    "predictions": [
                        {"label": "setosa", "index": 0, "score": 0.98, "id": "AQRpcmlz..."},
                        {"label": "virginica", "index": 2, "score": 0.91, "id": "AQRpcmlz..."},
                    ],
                },
                {"model": "diabetes", "version": 1, "predictions": [{"value": 151.2, "id": "AghkaWFi..."}]},
            ]
        }
    )

    model: str
    version: int
    predictions: list[ClassPrediction | RegressionPrediction]


class ModelsResponse(BaseModel):
    """Every model version in the repository."""

    models: list[ModelStatus]


class LiveResponse(BaseModel):
    """The process answers."""

    live: bool


class ReadyResponse(BaseModel):
    """Every loadable model is loaded and warm."""

    ready: bool
    error: str | None = None
