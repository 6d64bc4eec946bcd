"""Ground-truth feedback for served predictions, and the live scores computed from it.

`POST /feedback` takes items `{"id": "<prediction id>", "label": <true class name or index, or value>}`.
Each item is checked on its own (the id is genuine and not expired, its model version is served or its card
is still in the repository, the label fits the model) and counted once, whichever worker or replica issued
the id; a bad item is reported by its position and never stops the others. Counted items go to the state
the workers share (`FeedbackStore`) and to the Prometheus counters, from which PromQL scores any time window
across replicas.

`GET /models/{name}/quality` scores the last `feedback_window` items of a model version with the counts of
`app.scoring` (the report of `/evaluate`), beside the card's test metrics. The same scores go to the gauge
`modelserve_live_score`, refreshed at most once a second per version after feedback is counted.

Labels arrive long after predictions, often after a hot swap retired the version that made them: a version
that is no longer served is checked and scored with the card of its folder, read once from the repository.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from app.dataplane import DataPlane
from app.errors import InvalidInput, ModelServeError
from app.evaluate.runner import compare_with_training, flat_scores
from app.model_card import MODEL_NAME_PATTERN, ModelCard
from app.observability import PrometheusMetrics
from app.quality.ids import InvalidId, PredictionId, PredictionIds
from app.quality.store import CheckedItem, FeedbackStore, Window
from app.repository import ModelLoadError, ModelSource, read_card
from app.scoring import ClassificationAccumulator, RegressionAccumulator
from app.settings import Settings

logger = logging.getLogger(__name__)

ITEM_FIELDS: Final = frozenset({"id", "label"})
CHECK_STEP_ITEMS: Final = 512
"""Items checked between two yields to the event loop (a large backfill never holds it for long)."""
LIVE_SCORE_INTERVAL_SECONDS: Final = 1.0
"""Shortest time between two refreshes of a model version's `modelserve_live_score` gauges."""
REGRESSION_QUANTITIES: Final = (
    "count",
    "error_sum",
    "abs_error_sum",
    "squared_error_sum",
    "label_sum",
    "label_squared_sum",
)


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why the item at `index` (0-based) was not counted."""

    index: int
    error: str


class _Refused(Exception):
    """An item that cannot be counted (its message is the caller's)."""


def parse_items(body: bytes, *, ndjson: bool) -> tuple[list[Any], list[ItemError]]:
    """The items of a body (JSON `{"items": [...]}` or NDJSON, one item per line, blank lines skipped: an
    empty NDJSON body has none), and the NDJSON lines that are not JSON (by item position).

    Raises:
        InvalidInput: the JSON body is malformed or not `{"items": [...]}` with at least one item.
    """
    if ndjson:
        items: list[Any] = []
        errors: list[ItemError] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as err:
                errors.append(ItemError(len(items), f"malformed JSON: {err}"))
                items.append(None)
        return items, errors
    if not body:
        raise InvalidInput('empty body; send {"items": [{"id": "...", "label": ...}, ...]}')
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"malformed JSON: {err}") from err
    if not isinstance(document, dict) or set(document) != {"items"}:
        raise InvalidInput('body: expected {"items": [{"id": "...", "label": ...}, ...]} and no other field')
    items = document["items"]
    if not isinstance(items, list) or not items:
        raise InvalidInput("items: expected a non-empty list of {id, label} objects")
    return items, []


def true_target(card: ModelCard, label: Any) -> float:
    """The item's label as the model's target: a class index (from a class name or an index) or a value."""
    if card.task == "classification":
        labels = card.labels or []
        if isinstance(label, str):
            if label in labels:
                return float(labels.index(label))
            raise _Refused(f"label: {label!r} is not one of the model's classes {labels}")
        if isinstance(label, int) and not isinstance(label, bool):
            if 0 <= label < len(labels):
                return float(label)
            raise _Refused(
                f"label: class index {label} is not among the model's {len(labels)} classes "
                f"(0..{len(labels) - 1})"
            )
        raise _Refused("label: expected a class name (text) or a class index (integer)")
    if isinstance(label, int | float) and not isinstance(label, bool) and math.isfinite(label):
        return float(label)
    raise _Refused("label: expected a finite number (the true value)")


def live_report(card: ModelCard, window: Window, window_size: int) -> dict[str, Any]:
    """The quality report of a model version's feedback window (without items: no scores), beside its card's
    test metrics."""
    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "task": card.task,
        "count": window.count,
        "window": window_size,
    }
    if window.truth.shape[0] == 0:
        report["n"] = 0
    elif card.task == "classification":
        labels = card.labels or []
        accumulator = ClassificationAccumulator(n_classes=len(labels))
        accumulator.update(window.truth.astype(np.int64), window.prediction.astype(np.int64))
        report.update(accumulator.compute(labels))
    else:
        regression = RegressionAccumulator()
        regression.update(window.truth, window.prediction)
        report.update(regression.compute())
    compare_with_training(report, dict(card.metrics.test), card.task)
    return report


class Feedback:
    """Prediction ids, feedback and live scores of one app (built by `create_app`)."""

    def __init__(
        self,
        settings: Settings,
        dataplane: DataPlane,
        metrics: PrometheusMetrics,
        ids: PredictionIds,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Read ids with `ids` (see `signer`; `clock` gives Unix seconds for their age); keep state in
        `state_dir`."""
        self.ids = ids
        self.settings = settings
        self.dataplane = dataplane
        self.metrics = metrics
        self.store = FeedbackStore(settings.state_dir)
        self._clock = clock
        self._cards_on_disk: dict[tuple[str, int], ModelCard] = {}
        """Cards of versions not served, read from the repository (a version's card never changes)."""
        self._refreshes: dict[tuple[str, int], asyncio.Task[None]] = {}
        """The pending refresh of each version's live score gauges."""
        self._refresh_tasks: set[asyncio.Task[None]] = set()
        """Every refresh not finished yet (pending or reading the state), for `close`."""
        self._refreshed: dict[tuple[str, int], float] = {}
        """When each version's live score gauges were last refreshed (monotonic seconds)."""

    async def receive(self, items: Sequence[Any], errors: Sequence[ItemError] = ()) -> dict[str, Any]:
        """Check and count `items`; the answer `{"counted": N, "errors": [{"index", "error"}, ...]}`.

        `errors` are items already refused (by position); they are reported with the others.
        """
        refused = {error.index: error.error for error in errors}
        now = int(self._clock())
        checked: list[tuple[int, CheckedItem, ModelCard]] = []
        cards: dict[tuple[str, int], ModelCard | str] = {}
        for index, item in enumerate(items):
            if index and index % CHECK_STEP_ITEMS == 0:
                await asyncio.sleep(0)
            if index in refused:
                continue
            try:
                checked.append((index, *await self._check(item, now, cards)))
            except _Refused as err:
                refused[index] = str(err)
        counted = (
            await self.store.record(
                [item for _, item, _ in checked],
                forget_before=now - self.settings.feedback_max_age_seconds,
                window=self.settings.feedback_window,
            )
            if checked
            else []
        )
        for (index, _, _), is_new in zip(checked, counted, strict=True):
            if not is_new:
                refused[index] = "id: already counted (duplicate)"
        new = [(item, card) for (_, item, card), is_new in zip(checked, counted, strict=True) if is_new]
        self._count(new)
        for card in {(card.name, card.version): card for _, card in new}.values():
            self._refresh_live_scores(card)
        return {
            "counted": sum(counted),
            "errors": [{"index": index, "error": refused[index]} for index in sorted(refused)],
        }

    async def _check(
        self, item: Any, now: int, cards: dict[tuple[str, int], ModelCard | str]
    ) -> tuple[CheckedItem, ModelCard]:
        if not isinstance(item, dict) or set(item) != ITEM_FIELDS:
            raise _Refused(
                'expected an object {"id": "<prediction id>", "label": <true label>} and no other field'
            )
        try:
            prediction = self.ids.read(item["id"])
        except InvalidId as err:
            raise _Refused(f"id: {err.reason}") from None
        age = now - prediction.issued
        if age > self.settings.feedback_max_age_seconds:
            raise _Refused(
                f"id: expired (issued {age} s ago; feedback is taken for "
                f"{self.settings.feedback_max_age_seconds} s)"
            )
        card = await self._card_of(prediction, cards)
        return (
            CheckedItem(
                mac=prediction.mac,
                issued=prediction.issued,
                model=card.name,
                version=card.version,
                truth=true_target(card, item["label"]),
                prediction=float(prediction.prediction),
            ),
            card,
        )

    async def _card_of(
        self, prediction: PredictionId, cards: dict[tuple[str, int], ModelCard | str]
    ) -> ModelCard:
        """The card of the id's model version: the served one's, else the one in its folder of the
        repository (`cards`: those this request already looked up, or why they cannot be had)."""
        key = (prediction.model, prediction.version)
        card = cards.get(key)
        if card is None:
            try:
                card = self.dataplane.get_model(*key).card
            except ModelServeError as err:
                try:
                    card = await self._card_on_disk(*key)
                except ModelLoadError as disk:
                    card = f"id: {err.message}; nor can its card be read: {disk.reason}"
            cards[key] = card
        if isinstance(card, str):
            raise _Refused(card)
        if prediction.is_class_index != (card.task == "classification"):
            raise _Refused(f"id: model {card.name!r} version {card.version} is no longer a {card.task} model")
        return card

    async def _card_on_disk(self, name: str, version: int) -> ModelCard:
        """The card in the version's folder of the repository, read once (off the event loop).

        Raises:
            ModelLoadError: see `read_card`; or `name` cannot be a model's.
        """
        card = self._cards_on_disk.get((name, version))
        if card is None:
            if re.fullmatch(MODEL_NAME_PATTERN, name) is None:
                raise ModelLoadError(f"{name!r} is not a model name")
            root = self.settings.model_repository
            source = ModelSource(name, version, root / name / str(version), root)
            card = self._cards_on_disk[(name, version)] = await asyncio.to_thread(read_card, source)
        return card

    def _count(self, items: Sequence[tuple[CheckedItem, ModelCard]]) -> None:
        """Add counted items to the Prometheus counters (one increment per label set)."""
        pairs: dict[tuple[str, int], dict[tuple[str, str], int]] = {}
        sums: dict[tuple[str, int], dict[str, float]] = {}
        for item, card in items:
            key = (item.model, item.version)
            if card.task == "classification":
                labels = card.labels or []
                pair = (labels[int(item.truth)], labels[int(item.prediction)])
                counts = pairs.setdefault(key, {})
                counts[pair] = counts.get(pair, 0) + 1
            else:
                error = item.prediction - item.truth
                totals = sums.setdefault(key, dict.fromkeys(REGRESSION_QUANTITIES, 0.0))
                totals["count"] += 1
                totals["error_sum"] += error
                totals["abs_error_sum"] += abs(error)
                totals["squared_error_sum"] += error * error
                totals["label_sum"] += item.truth
                totals["label_squared_sum"] += item.truth * item.truth
        for (model_name, version), counts in pairs.items():
            self.metrics.count_feedback(model_name, version, counts)
        for (model_name, version), totals in sums.items():
            self.metrics.add_feedback_sums(model_name, version, totals)

    def _refresh_live_scores(self, card: ModelCard) -> None:
        """Set the version's live score gauges from the shared state soon: now, or a second after the last
        refresh (a refresh already pending reads the items counted meanwhile)."""
        key = (card.name, card.version)
        if key not in self._refreshes:
            task = asyncio.get_running_loop().create_task(
                self._set_live_scores(card), name=f"live-scores:{card.name}/{card.version}"
            )
            self._refreshes[key] = task
            self._refresh_tasks.add(task)
            task.add_done_callback(self._refresh_tasks.discard)

    async def _set_live_scores(self, card: ModelCard) -> None:
        key = (card.name, card.version)
        try:
            wait = self._refreshed.get(key, -math.inf) + LIVE_SCORE_INTERVAL_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            del self._refreshes[key]  # items counted from here on ask for the next refresh
            self._refreshed[key] = time.monotonic()
            window = await self.store.window(card.name, card.version, self.settings.feedback_window)
            report = await asyncio.to_thread(live_report, card, window, self.settings.feedback_window)
            self.metrics.set_live_scores(card.name, card.version, flat_scores(report))
            self.metrics.set_card_test_scores(card.name, card.version, card.metrics.test)
        except Exception:
            self._refreshes.pop(key, None)
            logger.exception("live scores not refreshed", extra={"model": card.name, "version": card.version})

    async def quality(self, name: str, version: int | None) -> dict[str, Any]:
        """The live scores of a model version (default: the highest ready one; a version no longer served
        is scored with the card in its folder): the report of `/evaluate` over its last `feedback_window`
        feedback items (without them: no scores), `count` (every item counted), `window`, the card's test
        metrics and the difference, and `drift` (the input drift of a served version over the window that
        the server's workers share, see `app.quality.drift`; None for a version no longer served)."""
        try:
            model = self.dataplane.get_model(name, version)
            card, drift = model.card, await self.dataplane.drift_report(model)
        except ModelServeError as not_served:
            if version is None:
                raise
            try:
                card, drift = await self._card_on_disk(name, version), None
            except ModelLoadError:
                raise not_served from None
        window = await self.store.window(card.name, card.version, self.settings.feedback_window)
        report = live_report(card, window, self.settings.feedback_window)
        report["drift"] = None if drift is None else drift.model_dump()
        return report

    async def close(self) -> None:
        """Stop the pending live score refreshes and let go of the store."""
        tasks = list(self._refresh_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()


def signer(settings: Settings, clock: Callable[[], float] = time.time) -> PredictionIds:
    """The prediction ids of an app: signed with `feedback_secret` (unset: a secret of this process alone)."""
    secret = settings.feedback_secret
    return PredictionIds(
        secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32), clock
    )
