"""`GET /models`, the V2 health probes and `GET /metrics` (plain FastAPI routes: not on the hot path)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.schemas import LiveResponse, ModelsResponse, ReadyResponse
from app.dataplane import DataPlane
from app.http.errors import ErrorResponse
from app.observability import PrometheusMetrics

router = APIRouter()


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


@router.get("/models", tags=["models"], summary="Every model, its versions and state")
async def list_models(request: Request) -> ModelsResponse:
    """Versions, state (loading/ready/failed/unloaded), failure reason, providers and input schema."""
    return ModelsResponse(models=_dataplane(request).models())


@router.get("/v2/health/live", tags=["health"], summary="Liveness")
async def live() -> LiveResponse:
    """The process answers requests."""
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready",
    tags=["health"],
    summary="Readiness",
    response_model=ReadyResponse,
    response_model_exclude_none=True,
    responses={503: {"model": ReadyResponse, "description": "Not ready (see Retry-After)"}},
)
async def ready(request: Request) -> ReadyResponse | JSONResponse:
    """Ready when every loadable model is loaded and warmed up (models that failed to load do not block)."""
    dataplane = _dataplane(request)
    if dataplane.ready():
        return ReadyResponse(ready=True)
    return JSONResponse(
        {"ready": False, "error": "models are still loading, or the server is shutting down"},
        status_code=503,
        headers={"Retry-After": str(dataplane.settings.retry_after_seconds)},
    )


@router.get(
    "/metrics",
    tags=["metrics"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 500: {"model": ErrorResponse}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format (merged across worker processes)."""
    registry: PrometheusMetrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)
