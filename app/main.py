"""`create_app(settings)`: the whole service, assembled; models load in the lifespan, nothing at import.

Other routers are included at the marked place, one line each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import routes
from app.api.predict import PREDICT_OPERATION, PredictEndpoint
from app.dataplane import DataPlane
from app.evaluate import routes as evaluate_routes
from app.http.errors import install_exception_handlers
from app.http.middleware import RequestContextMiddleware
from app.http.openapi import add_raw_route, install_openapi
from app.observability import PrometheusMetrics
from app.settings import Settings
from app.v2 import routes as v2_routes

DESCRIPTION = """Serves the ONNX models of a model repository with onnxruntime.

* `POST /predict`: simple JSON API, with dynamic batching of concurrent requests.
* Open Inference Protocol (KServe V2) under `/v2`.
* `GET /metrics`: Prometheus.

Errors are `{"error": "<message>"}` with the status that fits (400, 401, 404, 413, 415, 503, 504, 500).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: defaults to `Settings()` (the `MODELSERVE_*` environment), which is how
            `uvicorn --factory app.main:create_app` and every worker process build it.

    Returns:
        The FastAPI app. `app.state` holds `settings`, `metrics` (app-own Prometheus registry) and
        `dataplane` (the core every route calls); the lifespan loads and warms up the models.
    """
    settings = settings or Settings()
    metrics = PrometheusMetrics(settings.prometheus_multiproc_dir)
    dataplane = DataPlane(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dataplane.start()
        try:
            yield
        finally:
            await dataplane.stop()
            metrics.mark_process_dead()

    app = FastAPI(
        title="modelserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry costs a provider check per request; the service exports
        # Prometheus metrics instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.dataplane = dataplane
    install_exception_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestContextMiddleware, settings=settings)

    add_raw_route(
        app,
        "/predict",
        PredictEndpoint(dataplane, metrics, settings.max_body_bytes),
        method="POST",
        operation=PREDICT_OPERATION,
    )
    app.include_router(routes.router)
    # Routers of the other parts, one line each:
    v2_routes.install(app)
    evaluate_routes.install(app)
    return app
