"""`DataPlane`: the protocol-free core every route calls (registry → batcher → onnxruntime session).

`/predict`, `/evaluate` and the V2 routes differ only in how they decode requests and encode answers; they
all find a model with `get_model`, run it with `infer`, and report state with `models`/`ready`.

Versions come and go while requests run (`load`, `unload`, and the repository poll when
`repository_poll_seconds` is set). A new version loads and warms up in the loader thread while the old one
serves; then one step, with no await in it, makes it ready and retires the versions the policy no longer
serves (the newest `served_versions` ready ones are served; a version whose folder is gone is not). A
retired version still answers the requests that found it before the swap, until its batcher has been idle
for `RETIRED_IDLE_SECONDS`; then the batcher closes and the core lets go of the model, so onnxruntime frees
its session once the last of those requests is done. A version that fails to load replaces nothing: it is
listed as failed, with its reason, and the versions already serving go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from app.batcher import Batcher, Tensors, split_rows
from app.errors import ModelNotFound, NotReady
from app.model_card import CARD_FILENAME, ONNX_FILENAME, TensorSpec
from app.observability import PrometheusMetrics
from app.quality.drift import DriftMonitor, DriftReport
from app.quality.ids import PREDICTION_IDS, PredictionIds, predictions_of
from app.quality.store import DriftStore
from app.repository import LoadedModel, ModelLoadError, ModelSource, load_model, scan_repository
from app.session import resolve_providers
from app.settings import Settings

logger = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "failed", "unloaded"]

RETIRED_IDLE_SECONDS = 2.0
"""How long a retired version's batcher must go without a request before it closes: a request that found
the version just before the swap may still be reading its body (V2) or between two pieces (`/evaluate`)."""
FOLDER_REMOVED = "its folder was removed from the repository"

# Inode, size and modification time of a version's card and graph (None: missing or unreadable).
_Stamp = tuple[tuple[int, int, int] | None, ...]


class ModelStatus(BaseModel):
    """One model version as `GET /models` (and the V2 repository index) reports it."""

    name: str
    version: int
    state: ModelState
    default: bool = Field(description="served when a request names no version")
    reason: str | None = Field(
        default=None, description="why the version failed to load, or why it is not served"
    )
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
    drift: DriftMonitor | None = None
    """Counts the rows it serves against its card's training summary (None: no summary, or tracking off)."""
    retired: bool = False
    """Not served by the version policy, or its folder is gone: a request naming it gets 404, not 503."""
    removed: bool = False
    """Its folder is gone: the entry is dropped once nothing runs on it."""
    stamp: _Stamp = ()
    """Its files when it was last loaded: the poll retries a failed version only once they change."""


def _stamp(source: ModelSource) -> _Stamp:
    stamps: list[tuple[int, int, int] | None] = []
    for filename in (CARD_FILENAME, ONNX_FILENAME):
        try:
            info = os.stat(source.directory / filename)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


class DataPlane:
    """Every model version of the repository, its state, and the way to run it."""

    def __init__(
        self, settings: Settings, metrics: PrometheusMetrics, prediction_ids: PredictionIds | None = None
    ) -> None:
        """Nothing loads here: `await start()` (the app's lifespan) scans and loads the repository.

        `prediction_ids`: when given, every batch's outputs also carry one id per row under
        `PREDICTION_IDS`, issued in the inference thread for the whole batch at once.
        """
        self.settings = settings
        self.metrics = metrics
        self._prediction_ids = prediction_ids
        self._entries: dict[str, dict[int, _Entry]] = {}
        self._providers: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._started = False
        self._stopping = False
        self._lock = asyncio.Lock()  # serializes scans, loads and unloads
        self._unloaded: set[str] = set()  # models unloaded on request: the poll leaves them unloaded
        self._poll_task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._drift_store = DriftStore(settings.state_dir)
        """The input-drift windows that the workers of the server share (opened on the first write)."""

    # ---------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Scan the repository, load and warm up the versions the policy serves (a failure is recorded, not
        raised), then start the repository poll if one is set."""
        sources = scan_repository(self.settings.model_repository)
        self._providers = resolve_providers(self.settings.providers)
        # One batch runs at a time per model, so one thread per model (and a few spare) never queues.
        self._executor = ThreadPoolExecutor(
            max_workers=max(4, len(sources) + 2), thread_name_prefix="inference"
        )
        # Loads run one at a time in a thread of their own.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        async with self._lock:
            await self._apply_repository(sources, retry_failed=True)
        self._started = True
        if not sources:
            logger.warning("no models to serve", extra={"repository": str(self.settings.model_repository)})
        if self.settings.repository_poll_seconds > 0:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        """Stop the poll and every batcher (waiting requests get 503), then the inference threads; write
        the drift counts still pending."""
        self._stopping = True
        tasks = [*self._drains, *([self._poll_task] if self._poll_task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for versions in self._entries.values():
            for entry in versions.values():
                if entry.batcher is not None:
                    await entry.batcher.stop()
                if entry.drift is not None:
                    entry.drift.flush()
        await self._drift_store.close()
        for executor in (self._executor, self._loader):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    async def load(self, name: str) -> None:
        """Rescan one model's folder now (the reload route, the V2 repository `load`).

        New versions, and versions that failed or were unloaded, load in the background while the served
        ones go on; each that loads is swapped in, and what the policy no longer serves is retired.

        Raises:
            ModelNotFound: no folder of that name in the repository (whatever it served is retired).
        """
        async with self._lock:
            sources = [source for source in await self._scan() if source.name == name]
            self._unloaded.discard(name)
            await self._reconcile(name, sources, retry_failed=True)
        if not sources:
            raise ModelNotFound(f"no model {name!r} in the repository")

    async def unload(self, name: str) -> None:
        """Stop serving every version of one model (requests already queued still finish); it stays
        unloaded, even for the poll, until `load`.

        Raises:
            ModelNotFound: the model is not known.
        """
        async with self._lock:
            versions = self._entries.get(name)
            if versions is None:
                raise ModelNotFound(f"unknown model {name!r}")
            self._unloaded.add(name)
            for entry in versions.values():
                self._retire(name, entry, None, retired=False)

    async def _poll(self) -> None:
        """Rescan the whole repository every `repository_poll_seconds` (a failed scan is logged)."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                async with self._lock:
                    await self._apply_repository(await self._scan(), retry_failed=False)
            except Exception:
                logger.exception("repository poll failed")

    async def _scan(self) -> list[ModelSource]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, scan_repository, self.settings.model_repository)

    async def _apply_repository(self, sources: Sequence[ModelSource], *, retry_failed: bool) -> None:
        """`_reconcile` every model found or known, but those unloaded on request (under the lock)."""
        by_name: defaultdict[str, list[ModelSource]] = defaultdict(list)
        for source in sources:
            by_name[source.name].append(source)
        for name in sorted(by_name.keys() | self._entries.keys()):
            if name not in self._unloaded:
                await self._reconcile(name, by_name[name], retry_failed=retry_failed)

    async def _reconcile(self, name: str, sources: Sequence[ModelSource], *, retry_failed: bool) -> None:
        """Bring one model in line with its folders (under the lock): load versions newest first until the
        policy's count is ready, then retire the ready versions it no longer serves.

        Args:
            name: the model.
            sources: its version folders now.
            retry_failed: also reload a failed version whose files did not change (the poll does not).
        """
        versions = self._entries.setdefault(name, {})
        on_disk = {source.version: source for source in sources}
        for version, entry in list(versions.items()):
            if version not in on_disk:
                entry.removed = True  # a ready one serves until the policy retires it, below
                if entry.batcher is None:
                    del versions[version]
        for version, source in on_disk.items():
            if version not in versions:
                versions[version] = _Entry(source, "unloaded", self._not_served_reason(), retired=True)
        wanted = self.settings.served_versions or len(on_disk)
        ready = 0
        for version in sorted(on_disk, reverse=True):
            if ready == wanted:
                break
            entry = versions[version]
            if entry.state != "ready" and (
                entry.state != "failed" or retry_failed or entry.stamp != _stamp(entry.source)
            ):
                entry = versions[version] = _Entry(on_disk[version])
                await self._load(name, entry)
            ready += entry.state == "ready"
        self._apply_policy(name)
        if not versions and self._entries.get(name) is versions:
            del self._entries[name]

    async def _load(self, name: str, entry: _Entry) -> None:
        """Load and warm up one version in the loader thread, then publish it (or record its failure)."""
        source = entry.source
        entry.stamp = _stamp(source)
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                self._loader, load_model, source, self.settings, self._providers
            )
        except Exception as err:
            # A version that cannot load is reported and skipped; it never stops or replaces the others.
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
        if self._stopping:
            return
        # The swap: from here on no await, so every request sees either the old versions or the new set.
        entry.model, entry.batcher = model, self._batcher_for(model)
        entry.drift = DriftMonitor.for_card(
            model.card, self.settings.drift_window_rows, self.metrics, self._drift_store
        )
        entry.batcher.start()
        entry.state = "ready"
        self._apply_policy(name)
        self.metrics.model_load_seconds.labels(model=model.name, version=str(model.version)).set(
            model.load_seconds
        )
        self.metrics.set_card_test_scores(model.name, model.version, model.card.metrics.test)
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
            self._run_of(model),
            # A graph with a frozen batch axis takes exactly that many rows: each request then runs alone.
            max_batch_rows=settings.max_batch_rows if model.batchable else 1,
            max_delay_seconds=settings.max_batch_delay_seconds,
            max_queue_rows=settings.max_queue_rows,
            queue_timeout_seconds=settings.queue_timeout_seconds,
            retry_after_seconds=settings.retry_after_seconds,
            collate=model.collate,
            signature=model.batch_signature,
            executor=self._executor,
            metrics=self.metrics.for_model(model.name),
            name=model.name,
        )

    def _run_of(self, model: LoadedModel) -> Callable[[Mapping[str, np.ndarray]], Tensors]:
        """What runs a batch of `model`: its session, then the batch's prediction ids when they are on
        (one call per batch, not one per request, off the event loop)."""
        ids = self._prediction_ids
        if ids is None:
            return model.run

        def run_and_issue(arrays: Mapping[str, np.ndarray]) -> Tensors:
            outputs = model.run(arrays)
            issued = ids.issue(model.name, model.version, predictions_of(model.task, outputs))
            return {**outputs, PREDICTION_IDS: np.array(issued, dtype=object)}

        return run_and_issue

    def _apply_policy(self, name: str) -> None:
        """Retire the ready versions of `name` that are not served: beyond the newest `served_versions`
        ready ones (0: every ready one is served), or whose folder is gone. Synchronous: part of the swap."""
        versions = self._entries[name]
        ready = sorted((v for v, e in versions.items() if e.state == "ready" and not e.removed), reverse=True)
        count = self.settings.served_versions
        served = set(ready[:count] if count else ready)
        for version, entry in versions.items():
            if entry.state == "ready" and version not in served:
                self._retire(name, entry, FOLDER_REMOVED if entry.removed else self._not_served_reason())

    def _not_served_reason(self) -> str:
        count = self.settings.served_versions
        return f"MODELSERVE_SERVED_VERSIONS={count} serves only the newest {count} version(s) that load"

    def _retire(self, name: str, entry: _Entry, reason: str | None, *, retired: bool = True) -> None:
        """Stop serving `entry` now; if it was serving, its batcher drains in the background."""
        was_ready = entry.state == "ready"
        entry.state, entry.reason, entry.retired = "unloaded", reason, retired
        if was_ready:
            task = asyncio.get_running_loop().create_task(
                self._drain(name, entry), name=f"drain:{name}/{entry.source.version}"
            )
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    async def _drain(self, name: str, entry: _Entry) -> None:
        """Let a retired version finish what it was given, then let go of its model."""
        batcher = entry.batcher
        assert batcher is not None  # a version that was ready has one
        version = entry.source.version
        try:
            # Each sleep lasts until the batcher could first have been idle long enough: not a busy poll.
            while (idle := batcher.idle_seconds()) < RETIRED_IDLE_SECONDS:  # noqa: ASYNC110
                await asyncio.sleep(RETIRED_IDLE_SECONDS - idle)
            await batcher.close(
                f"model {name!r} version {version} was retired; retry to reach the served one"
            )
        except asyncio.CancelledError:
            await batcher.stop()  # shutting down: whatever still waits gets 503
            raise
        entry.model, entry.batcher = None, None
        if entry.drift is not None:
            entry.drift.flush()  # its last rows, now rather than on a timer that may outlive the server
        versions = self._entries.get(name, {})
        if entry.removed and versions.get(version) is entry:
            del versions[version]
            if not versions:
                del self._entries[name]
        current = versions.get(version)
        # prometheus_client cannot remove a label from the files that worker processes share.
        if (current is None or current.state != "ready") and self.settings.prometheus_multiproc_dir is None:
            self.metrics.model_load_seconds.remove(name, str(version))
            self.metrics.remove_scores(name, version)
            if entry.drift is not None:
                entry.drift.remove_gauges()
        logger.info("model version released", extra={"model": name, "version": version})

    # ------------------------------------------------------------------------------------------ queries
    def ready(self) -> bool:
        """Startup loaded what it serves, and the server is not shutting down (failed versions do not block,
        and nor do later loads: the versions they would replace serve meanwhile)."""
        return self._started and not self._stopping

    def get_model(self, name: str, version: int | None = None) -> LoadedModel:
        """The version a request asks for: the named one, or the highest ready one.

        Raises:
            ModelNotFound: unknown model, a version it does not have, or one it does not serve.
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
        if entry.retired:
            served = sorted(v for v, other in versions.items() if other.state == "ready")
            raise ModelNotFound(
                f"model {name!r} version {version} is not served ({entry.reason}); versions served: {served}"
            )
        if entry.state != "ready" or entry.model is None:
            raise self._not_ready(name, entry)
        return entry.model

    def source_of(self, model: LoadedModel) -> ModelSource:
        """Where a version from `get_model` was loaded from (its files may change after that: a reader of
        them compares the graph's sha256 with the model card's).

        Raises:
            NotReady: the version is no longer known (its folder was removed and its requests are done).
        """
        entry = self._entries.get(model.name, {}).get(model.version)
        if entry is None:
            raise NotReady(
                f"model {model.name!r} version {model.version} was unloaded",
                self.settings.retry_after_seconds,
            )
        return entry.source

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
                model = entry.model if entry.state == "ready" else None
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
    async def infer(
        self,
        model: LoadedModel,
        inputs: dict[str, Any],
        *,
        deadline_seconds: float | None = None,
    ) -> Tensors:
        """Validate inputs, run them through the model's batcher, return every graph output for these rows.

        Args:
            model: from `get_model`.
            inputs: one entry per graph input (arrays or nested lists), batch axis first.
            deadline_seconds: the client's limit on queueing (see `Batcher.submit`); without batching
                nothing queues, so it does not apply.

        Raises:
            InvalidInput: see `LoadedModel.validate_inputs`.
            Overloaded, DeadlineExceeded, NotReady, InferenceFailed: see `Batcher.submit`.
        """
        return await self.run_validated(
            model, model.validate_inputs(inputs), deadline_seconds=deadline_seconds
        )

    async def run_validated(
        self,
        model: LoadedModel,
        arrays: Tensors,
        *,
        deadline_seconds: float | None = None,
        live: bool = True,
    ) -> Tensors:
        """`infer` for arrays that `model.validate_inputs` already returned (`/evaluate` validates each
        chunk once, naming its rows, then runs it in pieces): the same batcher, without checking again.
        `live`: served traffic, counted for input drift (`/evaluate` is not).

        Raises:
            Overloaded, DeadlineExceeded, NotReady, InferenceFailed: see `Batcher.submit`.
        """
        rows = next(iter(arrays.values())).shape[0]
        entry = self._entries.get(model.name, {}).get(model.version)
        if entry is None or entry.batcher is None or entry.model is not model:
            raise NotReady(
                f"model {model.name!r} version {model.version} was unloaded",
                self.settings.retry_after_seconds,
            )
        if not self.settings.batching:
            outputs = await self._run_alone(model, arrays, rows)
        else:
            outputs = await entry.batcher.submit(arrays, rows, deadline_seconds=deadline_seconds)
        if live and entry.drift is not None:
            entry.drift.observe(arrays, outputs)
        return outputs

    async def drift_report(self, model: LoadedModel) -> DriftReport | None:
        """The input drift of a version from `get_model`, over the window the server's workers share (None:
        its card carries no training summary, or `drift_window_rows` is 0)."""
        entry = self._entries.get(model.name, {}).get(model.version)
        if entry is None or entry.model is not model or entry.drift is None:
            return None
        return await entry.drift.report()

    async def _run_alone(self, model: LoadedModel, arrays: Tensors, rows: int) -> Tensors:
        """The unbatched path (`batching` off): one onnxruntime call per request, still off the loop."""
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, self._run_of(model), arrays)
        return split_rows(outputs, [rows])[0]
