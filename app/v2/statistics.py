"""Triton's statistics extension: `GET /v2/models/stats` and `/v2/models/{model}[/versions/{version}]/stats`,
from the running totals the core keeps beside its Prometheus metrics (`ModelStatistics`).

The totals cover every endpoint (`/predict`, V2 inference, `/evaluate`) and every version of a model name, and
only the worker process that answers: with several workers each reports its own requests (the Prometheus
metrics at `/metrics` are the ones merged across workers).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.observability import ModelStatistics
from app.repository import LoadedModel
from app.v2.endpoint import dataplane_of, json_response, model_of, v2_route


@v2_route("GET", "/v2/models/stats", summary="Statistics of every model", errors=())
async def all_statistics(request: Request) -> Response:
    """Triton-style inference statistics of every ready model version."""
    dataplane = dataplane_of(request)
    stats = [
        _statistics(
            dataplane.get_model(status.name, status.version), dataplane.metrics.statistics(status.name)
        )
        for status in dataplane.models()
        if status.state == "ready"
    ]
    return json_response({"model_stats": stats})


@v2_route(
    "GET",
    "/v2/models/{model}/stats",
    "/v2/models/{model}/versions/{version}/stats",
    summary="Model statistics (Triton)",
)
async def model_statistics(request: Request) -> Response:
    """Triton-style inference statistics: counts, and queue and compute time in nanoseconds."""
    dataplane = dataplane_of(request)
    model = model_of(request, dataplane)
    return json_response({"model_stats": [_statistics(model, dataplane.metrics.statistics(model.name))]})


def _statistics(model: LoadedModel, totals: ModelStatistics) -> dict[str, Any]:
    """Triton's statistics shape (per model name: the totals carry no version)."""
    zero = {"count": 0, "ns": 0}
    return {
        "name": model.name,
        "version": str(model.version),
        "last_inference": 0,
        "inference_count": totals.inference_count,
        "execution_count": totals.execution_count,
        "inference_stats": {
            "success": {"count": totals.success_count, "ns": totals.success_ns},
            "fail": {"count": totals.fail_count, "ns": totals.fail_ns},
            "queue": {"count": totals.queue_count, "ns": totals.queue_ns},
            "compute_input": zero,
            "compute_infer": {"count": totals.compute_count, "ns": totals.compute_ns},
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
        "memory_usage": [],
    }
