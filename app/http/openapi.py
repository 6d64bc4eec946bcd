"""OpenAPI for routes that bypass FastAPI (raw ASGI endpoints on the hot paths).

FastAPI documents only its own routes. A raw route is documented by an `Operation` (the one way to write
one: summary, answers, errors, request body, query parameters) and mounted with `add_raw_route`, which
records it; `install_openapi` merges those records into `/openapi.json` (and `/docs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.routing import Route
from starlette.types import ASGIApp

from app.http.errors import ErrorResponse

JSON_TYPE = "application/json"
BINARY_SCHEMA: Mapping[str, Any] = {"type": "string", "format": "binary"}
"""The schema of a body of raw bytes."""

_REF = "#/components/schemas/{model}"
_PATH_PARAMETER = re.compile(r"{(\w+)}")

Schema = type[BaseModel] | Mapping[str, Any]
"""A pydantic model (documented in the components and referred to) or an inline JSON schema."""


@dataclass(frozen=True)
class Operation:
    """The OpenAPI operation of a raw route: all but its path parameters, which `document` finds in the
    path (strings, required). Every error answers `{"error": ...}` (`ErrorResponse`)."""

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
    """Optional query parameters (strings)."""

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
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAMETER.findall(path)
        ] + [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in self.query
        ]
        operation: dict[str, Any] = {
            "tags": list(self.tags),
            "summary": self.summary,
            "description": self.description,
            "operationId": self.operation_id,
            "responses": {"200": ok}
            | {str(code): {"description": text, "content": error} for code, text in self.errors.items()},
        }
        if parameters:
            operation["parameters"] = parameters
        if self.body is not None:
            operation["requestBody"] = {"required": True, "content": _content(self.body)}
            if self.body_description is not None:
                operation["requestBody"]["description"] = self.body_description
        return operation


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
