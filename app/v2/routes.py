"""Open Inference Protocol (KServe V2) HTTP routes, with Triton's binary tensor, classification, model
configuration, statistics and model repository extensions.

Thin HTTP: each handler reads the raw request, calls the protocol-free core on `app.state.dataplane` (the
same `get_model` / `infer` as `/predict`) and writes the answer through `app.v2.codec`:

* `app.v2.infer`: inference (the hot path);
* `app.v2.metadata`: server and model metadata, model readiness and configuration;
* `app.v2.statistics`: inference statistics;
* `app.v2.model_repository`: the repository extension (index, load, unload).

The core owns `/v2/health/live` and `/v2/health/ready`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from fastapi import FastAPI

from app.http.openapi import add_raw_route
from app.v2 import infer, metadata, model_repository, statistics
from app.v2.endpoint import V2Route

ROUTES: Final[tuple[V2Route, ...]] = (
    infer.infer,  # first: the hot path is matched before the other V2 routes
    metadata.server_metadata,
    statistics.all_statistics,  # before `/v2/models/{model}`, which would take "stats" for a model name
    metadata.model_metadata,
    metadata.model_ready,
    metadata.model_config,
    statistics.model_statistics,
    model_repository.repository_index,
    model_repository.repository_load,
    model_repository.repository_unload,
)


def install(app: FastAPI) -> None:
    """Mount every V2 route on `app` (as plain Starlette endpoints) and document them in OpenAPI."""
    number = 0
    for route in ROUTES:
        endpoint = route.endpoint()
        for path in route.paths:
            # Operation ids stay unique across paths: `v2_<handler>_<n>`, n counting every mounted path.
            operation = replace(route.operation, operation_id=f"{route.operation.operation_id}_{number}")
            add_raw_route(app, path, endpoint, method=route.method, operation=operation)
            number += 1
