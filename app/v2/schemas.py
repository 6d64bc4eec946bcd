"""Pydantic models that document the Open Inference Protocol routes in OpenAPI (`/docs`).

The routes do not validate with them (`app.v2.codec` decodes raw bodies, binary tensors included); they
exist so `/docs` shows the request and response shapes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.v2.datatypes import DATATYPE_TO_DTYPE

Datatype = Annotated[str, Field(json_schema_extra={"enum": list(DATATYPE_TO_DTYPE)})]
"""A datatype of the protocol (`app.v2.datatypes`)."""


class V2Tensor(BaseModel):
    """An input (request) or output (response) tensor."""

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=0)]] = Field(description="dimensions, batch axis first")
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data_size`: the tensor's bytes follow the JSON header instead of `data`",
    )
    data: list[Any] | None = Field(default=None, description="row-major values, flat or nested")


class V2RequestedOutput(BaseModel):
    """An output to return."""

    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data` (bool): raw bytes after the JSON header; "
        "`classification` (k): the k best classes per row as BYTES `value:index:label`",
    )


class V2InferRequest(BaseModel):
    """An inference request (JSON, or the JSON header of a binary body)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {
                            "name": "features",
                            "shape": [1, 4],
                            "datatype": "FP32",
                            "data": [5.1, 3.5, 1.4, 0.2],
                        }
                    ],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
                }
            ]
        }
    )

    id: str | None = Field(default=None, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="`binary_data_output` (bool) sets the default for every output; others are echoed back",
    )
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = Field(
        default=None, description="a subset of the outputs, answered in this order; default every output"
    )


class V2InferResponse(BaseModel):
    """An inference response (JSON, or the JSON header of a binary body)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(
        description="`prediction_ids`: one id per row (send it back with the true label to POST /feedback); "
        "the request's own parameters echoed"
    )
    outputs: list[V2Tensor]


class V2ServerMetadata(BaseModel):
    """`GET /v2`."""

    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    """A model input or output; -1 marks a variable dimension."""

    name: str
    datatype: Datatype
    shape: list[int]


class V2ModelMetadata(BaseModel):
    """`GET /v2/models/{model}`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ModelReady(BaseModel):
    """`GET /v2/models/{model}/ready` when the model can answer."""

    name: str
    version: str
    ready: bool
