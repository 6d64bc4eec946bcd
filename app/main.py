"""`create_app(settings)`: the whole service, assembled; models load in the lifespan, nothing at import.

Other routers are included at the marked place, one line each.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import routes
from app.api.predict import ENDPOINT as PREDICT_ENDPOINT
from app.api.predict import PREDICT_OPERATION, predict
from app.dataplane import DataPlane
from app.evaluate import routes as evaluate_routes
from app.http.errors import install_exception_handlers
from app.http.front import Front, HotRoute
from app.http.openapi import install_openapi
from app.observability import PrometheusMetrics
from app.quality import routes as quality_routes
from app.quality.feedback import Feedback, signer
from app.settings import Settings
from app.v2 import routes as v2_routes

DESCRIPTION = """Serves the ONNX models of a model repository with onnxruntime.

* `POST /predict`: simple JSON API, with dynamic batching of concurrent requests.
* Open Inference Protocol (KServe V2) under `/v2`.
* `POST /feedback`: the true labels of served predictions (by the ids their answers carry);
  `GET /models/{name}/quality`: live scores from them.
* `GET /metrics`: Prometheus.

Errors are `{"error": "<message>"}` with the status that fits (400, 401, 404, 413, 415, 503, 504, 500).
"""


def create_app(settings: Settings | None = None) -> Front:
    """Build the service.

    Args:
        settings: defaults to `Settings()` (the `MODELSERVE_*` environment), which is how
            `uvicorn --factory app.main:create_app` and every worker process build it.

    Returns:
        The ASGI app: the front (`app.http.front`) before the FastAPI app. `app.state` (the FastAPI app's)
        holds `settings`, `metrics` (app-own Prometheus registry), `dataplane` (the core every route
        calls) and `feedback` (prediction ids, feedback and live scores); the lifespan loads and warms up
        the models.
    """
    settings = settings or Settings()
    metrics = PrometheusMetrics(settings.prometheus_multiproc_dir)
    ids = signer(settings)
    dataplane = DataPlane(settings, metrics, ids if settings.prediction_ids else None)
    feedback = Feedback(settings, dataplane, metrics, ids)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await dataplane.start()
        # What startup built (models, routes, FastAPI's machinery) lives as long as the app: it leaves the
        # collector's generations, so that a full collection under load scans only what requests left
        # (tens of milliseconds otherwise, stalling every request in flight).
        gc.collect(2)  # a full collection first, so that no garbage is frozen
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await dataplane.stop()
            await feedback.close()
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
    app.state.feedback = feedback
    install_exception_handlers(app)
    install_openapi(app)
    front = Front(app, settings, metrics, dataplane)

    front.add_route(
        "/predict",
        HotRoute(predict, PREDICT_ENDPOINT),
        method="POST",
        operation=PREDICT_OPERATION,
    )
    app.include_router(routes.router)
    # Routers of the other parts, one line each:
    v2_routes.install(front)
    evaluate_routes.install(front)
    quality_routes.install(front)
    return front
