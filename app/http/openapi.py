"""OpenAPI for routes that bypass FastAPI (raw ASGI endpoints on the hot paths).

FastAPI documents only its own routes. A raw route is documented by an `Operation` (the one way to write
one: summary, answers, errors, request body, query parameters) and mounted with `add_raw_route`, which
records it; `install_openapi` merges those records into `/openapi.json` (and `/docs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from starlette.routing import Route
from starlette.types import ASGIApp

from app.http.errors import ErrorResponse
from app.model_card import MODEL_NAME_PATTERN

JSON_TYPE = "application/json"
BINARY_SCHEMA: Mapping[str, Any] = {"type": "string", "format": "binary"}
"""The schema of a body of raw bytes."""

POSITIVE_INTEGER_PATTERN = r"^[1-9][0-9]*$"
MODEL_NAME_SCHEMA: Mapping[str, Any] = {"type": "string", "pattern": MODEL_NAME_PATTERN}
"""A model name in a path or query string (every model in the repository has one)."""
POSITIVE_INTEGER_TEXT_SCHEMA: Mapping[str, Any] = {"type": "string", "pattern": POSITIVE_INTEGER_PATTERN}
"""A positive integer (a model version, `top_k`) in a path or query string."""

# Field types that the request models of the JSON bodies share (documentation: the parsers validate).
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
Version = Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=POSITIVE_INTEGER_PATTERN)]
"""A model version in a JSON body: a positive integer, or its digits."""
Rows = Annotated[list[Any], Field(min_length=1)]
"""One item per row (at least one)."""
RowsByInput = Annotated[dict[str, list[Any]], Field(min_length=1)]
"""Input name → its rows (at least one input)."""

ERROR_HEADERS: Mapping[int, Mapping[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}
"""The headers that every error answer of a status carries (`app.http.errors.error_parts`)."""

_REF = "#/components/schemas/{model}"
_PATH_PARAMETER = re.compile(r"{(\w+)}")

Schema = type[BaseModel] | Mapping[str, Any]
"""A pydantic model (documented in the components and referred to) or an inline JSON schema."""


@dataclass(frozen=True)
class Operation:
    """The OpenAPI operation of a raw route. `document` finds its path parameters in the path (required);
    every error answers `{"error": ...}` (`ErrorResponse`)."""

    operation_id: str
    summary: str
    description: str
    tags: tuple[str, ...]
    ok: str = "OK"
    """The description of the 200 answer."""
    answer: type[BaseModel] | None = None
    """The JSON schema of the 200 answer, if it has one."""
    errors: Mapping[int, str] = field(default_factory=dict)
    """Error status → when it is answered."""
    body: Mapping[str, Schema] | None = None
    """Media type → schema of the (required) request body; None: the route reads no documented body."""
    body_description: str | None = None
    query: tuple[str, ...] = ()
    """Optional query parameters."""
    headers: tuple[str, ...] = ()
    """Optional request headers the route reads (their schemas in `parameters`)."""
    parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Path, query or header parameter name → the schema of its value (default: any string)."""
    security: tuple[str, ...] = ()
    """Security schemes (components) that the route reads; one of them suffices."""

    def schemas(self) -> list[type[BaseModel]]:
        """The pydantic models the operation refers to."""
        models = [self.answer] if self.answer is not None else []
        models += [schema for schema in (self.body or {}).values() if isinstance(schema, type)]
        if self.errors:
            models.append(ErrorResponse)
        return models

    def document(self, path: str) -> dict[str, Any]:
        """The OpenAPI operation object for `path`."""
        ok: dict[str, Any] = {"description": self.ok}
        if self.answer is not None:
            ok["content"] = _content({JSON_TYPE: self.answer})
        error = _content({JSON_TYPE: ErrorResponse})
        parameters = (
            [
                {"name": name, "in": "path", "required": True, "schema": self._parameter_schema(name)}
                for name in _PATH_PARAMETER.findall(path)
            ]
            + [
                {"name": name, "in": "query", "required": False, "schema": self._parameter_schema(name)}
                for name in self.query
            ]
            + [
                {"name": name, "in": "header", "required": False, "schema": self._parameter_schema(name)}
                for name in self.headers
            ]
        )
        operation: dict[str, Any] = {
            "tags": list(self.tags),
            "summary": self.summary,
            "description": self.description,
            "operationId": self.operation_id,
            "responses": {"200": ok}
            | {str(code): _error_response(code, text, error) for code, text in self.errors.items()},
        }
        if parameters:
            operation["parameters"] = parameters
        if self.security:
            operation["security"] = [{scheme: []} for scheme in self.security]
        if self.body is not None:
            operation["requestBody"] = {"required": True, "content": _content(self.body)}
            if self.body_description is not None:
                operation["requestBody"]["description"] = self.body_description
        return operation

    def _parameter_schema(self, name: str) -> dict[str, Any]:
        return dict(self.parameters.get(name, {"type": "string"}))


def _error_response(code: int, description: str, content: dict[str, Any]) -> dict[str, Any]:
    response = {"description": description, "content": content}
    if code in ERROR_HEADERS:
        response["headers"] = dict(ERROR_HEADERS[code])
    return response


def _content(schemas: Mapping[str, Schema]) -> dict[str, Any]:
    return {
        media: {
            "schema": {"$ref": _REF.format(model=schema.__name__)} if isinstance(schema, type) else schema
        }
        for media, schema in schemas.items()
    }


def add_raw_route(app: FastAPI, path: str, endpoint: ASGIApp, *, method: str, operation: Operation) -> None:
    """Mount a raw ASGI endpoint and document it.

    Args:
        app: the app (`install_openapi` must have been called on it).
        path: the route path (Starlette syntax, e.g. `/v2/models/{model}/infer`).
        endpoint: an ASGI callable (a class instance, so Starlette passes the ASGI triple through).
        method: the HTTP method it answers.
        operation: its documentation.
    """
    app.router.routes.append(Route(path, endpoint, methods=[method]))
    documented: dict[str, dict[str, Any]] = app.state.raw_openapi_paths.setdefault(path, {})
    documented[method.lower()] = operation.document(path)
    app.state.raw_openapi_schemas.extend(operation.schemas())


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` include the raw routes added with `add_raw_route`."""
    app.state.raw_openapi_paths = {}
    app.state.raw_openapi_schemas = []

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        paths: dict[str, Any] = schema.setdefault("paths", {})
        for path, operations in app.state.raw_openapi_paths.items():
            paths.setdefault(path, {}).update(operations)
        components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in app.state.raw_openapi_schemas:
            model_schema = model.model_json_schema(ref_template=_REF)
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
REQUEST_TIMEOUT_SCHEMA: Mapping[str, Any] = {
    "type": "number",
    "exclusiveMinimum": 0,
    "description": "seconds the request may wait in the queue (capped by the server's queue timeout); "
    "still queued then: 504, and it never runs",
}
"""The optional queue-deadline header of the interactive routes."""
