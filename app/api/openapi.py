"""OpenAPI for routes that bypass FastAPI (raw ASGI endpoints on the hot path).

FastAPI documents only its own routes; `add_raw_route` mounts a raw ASGI endpoint as a Starlette `Route`
and records its OpenAPI operation, and `install_openapi` merges those into `/openapi.json` (and `/docs`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.routing import Route
from starlette.types import ASGIApp

_REF = "#/components/schemas/{model}"


def add_raw_route(
    app: FastAPI,
    path: str,
    endpoint: ASGIApp,
    *,
    methods: list[str],
    operation: dict[str, Any],
    schemas: list[type[BaseModel]] = (),  # type: ignore[assignment]
) -> None:
    """Mount a raw ASGI endpoint and document it.

    Args:
        app: the app (`install_openapi` must have been called on it).
        path: the route path (Starlette syntax, e.g. `/v2/models/{model}/infer`).
        endpoint: an ASGI callable (a class instance, so Starlette passes the ASGI triple through).
        methods: HTTP methods it answers.
        operation: the OpenAPI operation object (summary, requestBody, responses, ...), used for each method;
            refer to `schemas` as `{"$ref": "#/components/schemas/<ClassName>"}`.
        schemas: pydantic models (documentation only) whose JSON schemas the operation refers to.
    """
    app.router.routes.append(Route(path, endpoint, methods=methods))
    documented: dict[str, dict[str, Any]] = app.state.raw_openapi_paths.setdefault(path, {})
    for method in methods:
        documented[method.lower()] = operation
    app.state.raw_openapi_schemas.extend(schemas)


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
