"""The pydantic model that documents a JSON `/evaluate` body in OpenAPI.

The route does not validate with it (`app/evaluate/readers/json_reader.py` parses the body); a test checks
that the two agree on the fields, which are required, and that no other field is accepted.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.http.openapi import ModelName, Rows, RowsByInput, Version


class EvaluateRequest(BaseModel):
    """Labelled rows to score, shaped as for `/predict`, with one label per row."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "wine",
                    "inputs": [[13.2, 1.8, 2.1, 11.2, 100, 2.6, 2.8, 0.3, 2.3, 5.6, 1.0, 3.2, 1065]],
                    "labels": ["class_0"],
                },
            ]
        },
    )

    model: ModelName = Field(description="a served model's name (GET /models)")
    version: Version | None = Field(default=None, description="default: the highest ready version")
    inputs: Rows | RowsByInput = Field(
        description="one item per row, as `/predict` takes them (or an object of such lists by input name)"
    )
    labels: Annotated[list[str | int | float], Field(min_length=1)] = Field(
        description="one per row: class names or class indices (classifiers), numbers (regressors)"
    )
    zero_division: Literal[0, 1, "nan"] | None = Field(
        default=None,
        description="the value of a score whose denominator is 0 (as in scikit-learn); default 0",
    )
    top_k: int | None = Field(default=None, ge=1, description="classifiers: also report top-k accuracy")
    pos_label: str | int | None = Field(
        default=None, description="binary classifiers: the positive class for ROC AUC (name or index)"
    )
