"""Triton's statistics extension: `GET /v2/models/stats` and `/v2/models/{model}[/versions/{version}]/stats`,
read from the core's Prometheus metrics (all endpoints, all workers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess
from starlette.requests import Request
from starlette.responses import Response

from app.observability import PrometheusMetrics
from app.repository import LoadedModel
from app.v2.endpoint import dataplane_of, json_response, model_of, v2_route


@v2_route("GET", "/v2/models/stats", summary="Statistics of every model", errors=())
async def all_statistics(request: Request) -> Response:
    """Triton-style inference statistics of every ready model version."""
    dataplane = dataplane_of(request)
    totals = _MetricTotals(dataplane.metrics)
    stats = [
        _statistics(dataplane.get_model(status.name, status.version), totals)
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
    return json_response({"model_stats": [_statistics(model, _MetricTotals(dataplane.metrics))]})


class _MetricTotals:
    """Sums and counts of the core's per-model Prometheus metrics (all endpoints, all workers)."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._values: dict[tuple[str, str], float] = {}
        self._success: dict[str, tuple[float, float]] = {}
        self._fail: dict[str, tuple[float, float]] = {}
        for name, labels, value in self._samples(metrics):
            model = labels.get("model", "")
            if name.startswith("modelserve_request_duration_seconds_"):
                table = self._success if labels.get("status", "").startswith("2") else self._fail
                count, total = table.get(model, (0.0, 0.0))
                if name.endswith("_count"):
                    count += value
                elif name.endswith("_sum"):
                    total += value
                table[model] = (count, total)
            elif name.endswith(("_count", "_sum")):
                key = (name, model)
                self._values[key] = self._values.get(key, 0.0) + value

    @staticmethod
    def _samples(metrics: PrometheusMetrics) -> Iterator[tuple[str, dict[str, str], float]]:
        if metrics.multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(metrics.multiprocess_dir))  # type: ignore[no-untyped-call]
            families = list(registry.collect())
        else:
            families = [
                family
                for metric in (
                    metrics.request_duration,
                    metrics.queue_duration,
                    metrics.inference_duration,
                    metrics.batch_rows,
                )
                for family in metric.collect()
            ]
        for family in families:
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value

    def value(self, metric: str, model: str) -> float:
        return self._values.get((metric, model), 0.0)

    def duration(self, metric: str, model: str) -> dict[str, int]:
        return {
            "count": int(self.value(f"{metric}_count", model)),
            "ns": int(self.value(f"{metric}_sum", model) * 1e9),
        }

    def requests(self, model: str, *, success: bool) -> dict[str, int]:
        count, total = (self._success if success else self._fail).get(model, (0.0, 0.0))
        return {"count": int(count), "ns": int(total * 1e9)}


def _statistics(model: LoadedModel, totals: _MetricTotals) -> dict[str, Any]:
    """Triton's statistics shape, from the core's metrics (per model name: they carry no version)."""
    name = model.name
    zero = {"count": 0, "ns": 0}
    return {
        "name": name,
        "version": str(model.version),
        "last_inference": 0,
        "inference_count": int(totals.value("modelserve_batch_rows_sum", name)),
        "execution_count": int(totals.value("modelserve_batch_rows_count", name)),
        "inference_stats": {
            "success": totals.requests(name, success=True),
            "fail": totals.requests(name, success=False),
            "queue": totals.duration("modelserve_queue_duration_seconds", name),
            "compute_input": zero,
            "compute_infer": totals.duration("modelserve_inference_duration_seconds", name),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
        "memory_usage": [],
    }
