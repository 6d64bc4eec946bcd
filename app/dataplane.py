"""`DataPlane`: the protocol-free core every route calls (registry → batcher → onnxruntime session).

`/predict`, `/evaluate` and the V2 routes differ only in how they decode requests and encode answers; they
all find a model with `get_model`, run it with `infer`, and report state with `models`/`ready`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.batcher import Batcher, Tensors, split_rows
from app.errors import ModelNotFound, NotReady
from app.model_card import TensorSpec
from app.observability import PrometheusMetrics
from app.repository import LoadedModel, ModelLoadError, ModelSource, load_model, scan_repository
from app.session import resolve_providers
from app.settings import Settings
from app.threads import lower_thread_priority

logger = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "failed", "unloaded"]


class ModelStatus(BaseModel):
    """One model version as `GET /models` (and the V2 repository index) reports it."""

    name: str
    version: int
    state: ModelState
    default: bool = Field(description="served when a request names no version")
    reason: str | None = Field(default=None, description="why the version failed to load")
    task: str | None = None
    labels: list[str] | None = None
    providers: list[str] = Field(default_factory=list, description="execution providers in use")
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    load_seconds: float | None = None


@dataclass(eq=False)
class _Entry:
    source: ModelSource
    state: ModelState = "loading"
    reason: str | None = None
    model: LoadedModel | None = None
    batcher: Batcher | None = None


class DataPlane:
    """Every model version of the repository, its state, and the way to run it."""

    def __init__(self, settings: Settings, metrics: PrometheusMetrics) -> None:
        """Nothing loads here: `await start()` (the app's lifespan) scans and loads the repository."""
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, dict[int, _Entry]] = {}
        self._providers: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._background_executor: ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False
        self._lock = asyncio.Lock()  # serializes load/unload
        self.interactive_requests = 0
        """Requests of the interactive endpoints (`/predict`, V2 inference) being answered in this process:
        the front counts them, bulk work (`/evaluate`) yields to them."""

    # ---------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Scan the repository, load and warm up every version (a failure is recorded, not raised)."""
        sources = scan_repository(self.settings.model_repository)
        self._providers = resolve_providers(self.settings.providers)
        # One batch runs at a time per model, so one thread per model (and a few spare) never queues.
        self._executor = ThreadPoolExecutor(
            max_workers=max(4, len(sources) + 2), thread_name_prefix="inference"
        )
        # Batches of `/evaluate` rows only run in low-priority threads: on a busy machine the scheduler
        # gives the CPU to `/predict` first (see `app.threads`).
        self._background_executor = ThreadPoolExecutor(
            max_workers=max(4, len(sources) + 2),
            thread_name_prefix="inference-bulk",
            initializer=lower_thread_priority,
        )
        for source in sources:
            self._entries.setdefault(source.name, {})[source.version] = _Entry(source)
        async with self._lock:
            for source in sources:
                await self._load(self._entries[source.name][source.version])
        self._started = True
        if not sources:
            logger.warning("no models to serve", extra={"repository": str(self.settings.model_repository)})

    async def stop(self) -> None:
        """Stop every batcher (waiting requests get 503) and the inference threads."""
        self._stopping = True
        for versions in self._entries.values():
            for entry in versions.values():
                if entry.batcher is not None:
                    await entry.batcher.stop()
        for executor in (self._executor, self._background_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    async def _load(self, entry: _Entry) -> None:
        source = entry.source
        entry.state, entry.reason = "loading", None
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                self._executor, load_model, source, self.settings, self._providers
            )
        except Exception as err:
            # A model that cannot load is reported and skipped; it never stops the others.
            reason = (
                err.reason if isinstance(err, ModelLoadError) else f"unexpected {type(err).__name__}: {err}"
            )
            entry.state, entry.reason = "failed", reason
            logger.error(
                "model failed to load",
                exc_info=None if isinstance(err, ModelLoadError) else err,
                extra={"model": source.name, "version": source.version, "reason": reason},
            )
            return
        entry.model, entry.batcher = model, self._batcher_for(model)
        entry.batcher.start()
        entry.state = "ready"
        self.metrics.model_load_seconds.labels(model=model.name, version=str(model.version)).set(
            model.load_seconds
        )
        logger.info(
            "model ready",
            extra={
                "model": model.name,
                "version": model.version,
                "providers": model.providers,
                "load_seconds": round(model.load_seconds, 4),
            },
        )

    def _batcher_for(self, model: LoadedModel) -> Batcher:
        settings = self.settings
        return Batcher(
            model.run,
            # A graph with a frozen batch axis takes exactly that many rows: each request then runs alone.
            max_batch_rows=settings.max_batch_rows if model.batchable else 1,
            max_delay_seconds=settings.max_batch_delay_seconds,
            max_queue_rows=settings.max_queue_rows,
            queue_timeout_seconds=settings.queue_timeout_seconds,
            retry_after_seconds=settings.retry_after_seconds,
            collate=model.collate,
            signature=model.batch_signature,
            executor=self._executor,
            background_executor=self._background_executor,
            metrics=self.metrics.for_model(model.name),
            name=model.name,
        )

    async def load(self, name: str) -> None:
        """(Re)load every version of one model from the repository (the V2 repository extension).

        Raises:
            ModelNotFound: no folder of that name in the repository.
        """
        async with self._lock:
            sources = [s for s in scan_repository(self.settings.model_repository) if s.name == name]
            if not sources:
                raise ModelNotFound(f"no model {name!r} in the repository")
            await self._unload(name)
            self._entries[name] = {s.version: _Entry(s) for s in sources}
            for source in sources:
                await self._load(self._entries[name][source.version])

    async def unload(self, name: str) -> None:
        """Stop serving every version of one model (requests waiting for it get 503).

        Raises:
            ModelNotFound: the model is not known.
        """
        async with self._lock:
            if name not in self._entries:
                raise ModelNotFound(f"unknown model {name!r}")
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        for entry in self._entries.get(name, {}).values():
            if entry.batcher is not None:
                await entry.batcher.stop()
            entry.state, entry.model, entry.batcher = "unloaded", None, None

    # ------------------------------------------------------------------------------------------ queries
    def ready(self) -> bool:
        """Startup finished, not shutting down, and no version still loading (failed ones do not block)."""
        if not self._started or self._stopping:
            return False
        return all(
            entry.state != "loading" for versions in self._entries.values() for entry in versions.values()
        )

    def get_model(self, name: str, version: int | None = None) -> LoadedModel:
        """The version a request asks for: the named one, or the highest ready one.

        Raises:
            ModelNotFound: unknown model, or a version it does not have.
            NotReady: the version (or every version) is loading, failed or unloaded.
        """
        versions = self._entries.get(name)
        if versions is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; models served here: {known}")
        if version is None:
            ready = [v for v, entry in versions.items() if entry.state == "ready"]
            if not ready:
                raise self._not_ready(name, versions[max(versions)])
            version = max(ready)
        entry = versions.get(version)
        if entry is None:
            raise ModelNotFound(f"model {name!r} has no version {version}; it has {sorted(versions)}")
        if entry.state != "ready" or entry.model is None:
            raise self._not_ready(name, entry)
        return entry.model

    def _not_ready(self, name: str, entry: _Entry) -> NotReady:
        detail = f": {entry.reason}" if entry.reason else ""
        return NotReady(
            f"model {name!r} version {entry.source.version} is {entry.state}{detail}",
            self.settings.retry_after_seconds,
        )

    def models(self) -> list[ModelStatus]:
        """Every version of every model, sorted by name then version."""
        statuses = []
        for name in sorted(self._entries):
            versions = self._entries[name]
            ready = [v for v, entry in versions.items() if entry.state == "ready"]
            default = max(ready) if ready else None
            for version in sorted(versions):
                entry = versions[version]
                model = entry.model
                statuses.append(
                    ModelStatus(
                        name=name,
                        version=version,
                        state=entry.state,
                        default=version == default,
                        reason=entry.reason,
                        task=model.task if model else None,
                        labels=model.labels if model else None,
                        providers=model.providers if model else [],
                        inputs=model.inputs if model else [],
                        outputs=model.outputs if model else [],
                        load_seconds=round(model.load_seconds, 6) if model else None,
                    )
                )
        return statuses

    # ------------------------------------------------------------------------------------------ running
    async def infer(self, model: LoadedModel, inputs: dict[str, Any], *, background: bool = False) -> Tensors:
        """Validate inputs, run them through the model's batcher, return every graph output for these rows.

        Args:
            model: from `get_model`.
            inputs: one entry per graph input (arrays or nested lists), batch axis first.
            background: bulk work (`/evaluate`): yields to waiting foreground rows, waits for queue space.

        Raises:
            InvalidInput: see `LoadedModel.validate_inputs`.
            Overloaded, DeadlineExceeded, NotReady, InferenceFailed: see `Batcher.submit`.
        """
        arrays = model.validate_inputs(inputs)
        rows = next(iter(arrays.values())).shape[0]
        entry = self._entries.get(model.name, {}).get(model.version)
        if entry is None or entry.batcher is None or entry.model is not model:
            raise NotReady(
                f"model {model.name!r} version {model.version} was unloaded",
                self.settings.retry_after_seconds,
            )
        if not self.settings.batching:
            return await self._run_alone(model, arrays, rows)
        return await entry.batcher.submit(arrays, rows, background=background)

    async def _run_alone(self, model: LoadedModel, arrays: Tensors, rows: int) -> Tensors:
        """The unbatched path (`batching` off): one onnxruntime call per request, still off the loop."""
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, model.run, arrays)
        return split_rows(outputs, [rows])[0]
