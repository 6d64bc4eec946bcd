"""`GET /models`, `POST /models/{name}/reload` (admin), the V2 health probes and `GET /metrics` (plain FastAPI
routes: not on the hot path)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.schemas import LiveResponse, ModelsResponse, ReadyResponse
from app.dataplane import DataPlane
from app.http.admin import ADMIN_KEY, require_admin
from app.http.errors import ErrorResponse
from app.http.openapi import ERROR_HEADERS, MODEL_NAME_SCHEMA
from app.observability import PrometheusMetrics

router = APIRouter()


def _dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


@router.get("/models", tags=["models"], summary="Every model, its versions and state")
async def list_models(request: Request) -> ModelsResponse:
    """Versions, state (loading/ready/failed/unloaded), why a version failed or is not served, providers and
    input schema."""
    return ModelsResponse(models=_dataplane(request).models())


@router.post(
    "/models/{name}/reload",
    tags=["models"],
    summary="Reload one model from the repository (admin)",
    responses={
        401: {
            "model": ErrorResponse,
            "description": "Missing or wrong admin key",
            "headers": ERROR_HEADERS[401],
        },
        403: {"model": ErrorResponse, "description": "The admin routes are disabled"},
        404: {"model": ErrorResponse, "description": "No folder of that name in the repository"},
    },
)
async def reload_model(
    # documented, not validated here: a name no folder has is a 404
    name: Annotated[str, Path(json_schema_extra=dict(MODEL_NAME_SCHEMA))],
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_KEY)],
) -> ModelsResponse:
    """Rescan the model's folder now: new versions, and versions that failed or were unloaded, load and warm
    up while the served ones go on, then swap in; versions the policy no longer serves, or whose folder is
    gone, retire once their requests are done. Answers the model's versions and their state afterwards (a
    version that failed shows `failed` and its reason; it replaced nothing)."""
    dataplane = _dataplane(request)
    require_admin(dataplane.settings, credentials)
    await dataplane.load(name)
    return ModelsResponse(models=[status for status in dataplane.models() if status.name == name])


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
    responses={
        503: {
            "model": ReadyResponse,
            "description": "Not ready (see Retry-After)",
            "headers": ERROR_HEADERS[503],
        }
    },
)
async def ready(request: Request) -> ReadyResponse | JSONResponse:
    """Ready once startup has loaded and warmed up the versions it serves (versions that failed to load do not
    block, nor do versions loading later: the ones they would replace serve meanwhile)."""
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
