"""Open Inference Protocol (KServe V2) HTTP routes, with Triton's binary tensor, classification, model
configuration, statistics and model repository extensions.

Thin HTTP: each handler reads the raw request, calls the protocol-free core on `app.state.dataplane` (the
same `get_model` / `infer` as `/predict`) and writes the answer through `app.v2.codec`:

* `app.v2.infer`: inference (the hot path, answered by the front before FastAPI);
* `app.v2.metadata`: server and model metadata, model readiness and configuration;
* `app.v2.statistics`: inference statistics;
* `app.v2.model_repository`: the repository extension (index, load, unload).

The core owns `/v2/health/live` and `/v2/health/ready`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Final

from app.http.front import Front, HotRoute
from app.http.openapi import Operation, add_raw_route
from app.v2 import infer, metadata, model_repository, statistics
from app.v2.endpoint import V2Route

ROUTES: Final = (
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


def install(front: Front) -> None:
    """Answer inference in `front` (a hot route), mount the other V2 routes on its FastAPI app (as plain
    Starlette endpoints), and document them all in OpenAPI."""
    numbers = itertools.count()
    hot = HotRoute(infer.infer.handler, infer.ENDPOINT)
    for path, operation in _numbered(infer.infer, numbers):
        front.add_route(path, hot, method=infer.infer.method, operation=operation)
    for route in ROUTES:
        endpoint = route.endpoint()
        for path, operation in _numbered(route, numbers):
            add_raw_route(front.app, path, endpoint, method=route.method, operation=operation)


def _numbered(route: V2Route[Any], numbers: Iterator[int]) -> Iterator[tuple[str, Operation]]:
    """Each path of `route` with its operation, whose id stays unique across paths: `v2_<handler>_<n>`, n
    counting every mounted path."""
    for path in route.paths:
        yield path, replace(route.operation, operation_id=f"{route.operation.operation_id}_{next(numbers)}")
