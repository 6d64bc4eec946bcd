"""Ground-truth feedback for served predictions, and the live scores computed from it.

`POST /feedback` takes items `{"id": "<prediction id>", "label": <true class name or index, or value>}`.
Each item is checked on its own (the id is genuine and not expired, its model version is served, the label
fits the model) and counted once, whichever worker or replica issued the id; a bad item is reported by its
position and never stops the others. Counted items go to the state the workers share (`FeedbackStore`) and
to the Prometheus counters, from which PromQL scores any time window across replicas.

`GET /models/{name}/quality` scores the last `feedback_window` items of a model version with the counts of
`app.scoring` (the report of `/evaluate`), beside the card's test metrics.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from app.dataplane import DataPlane
from app.errors import InvalidInput, ModelServeError
from app.evaluate.runner import compare_with_training
from app.observability import PrometheusMetrics
from app.quality.ids import InvalidId, PredictionId, PredictionIds
from app.quality.store import CheckedItem, FeedbackStore
from app.repository import LoadedModel
from app.scoring import ClassificationAccumulator, RegressionAccumulator
from app.settings import Settings

ITEM_FIELDS: Final = frozenset({"id", "label"})
CHECK_STEP_ITEMS: Final = 512
"""Items checked between two yields to the event loop (a large backfill never holds it for long)."""
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


def true_target(model: LoadedModel, label: Any) -> float:
    """The item's label as the model's target: a class index (from a class name or an index) or a value."""
    if model.task == "classification":
        labels = model.labels or []
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


class Feedback:
    """Prediction ids, feedback and live scores of one app (built by `create_app`)."""

    def __init__(
        self,
        settings: Settings,
        dataplane: DataPlane,
        metrics: PrometheusMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Sign with `feedback_secret` (unset: a secret of this process alone); keep state in `state_dir`."""
        secret = settings.feedback_secret
        self.ids = PredictionIds(
            secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32), clock
        )
        self.settings = settings
        self.dataplane = dataplane
        self.metrics = metrics
        self.store = FeedbackStore(settings.state_dir)
        self._clock = clock

    async def receive(self, items: Sequence[Any], errors: Sequence[ItemError] = ()) -> dict[str, Any]:
        """Check and count `items`; the answer `{"counted": N, "errors": [{"index", "error"}, ...]}`.

        `errors` are items already refused (by position); they are reported with the others.
        """
        refused = {error.index: error.error for error in errors}
        now = int(self._clock())
        checked: list[tuple[int, CheckedItem, LoadedModel]] = []
        models: dict[tuple[str, int], LoadedModel] = {}
        for index, item in enumerate(items):
            if index and index % CHECK_STEP_ITEMS == 0:
                await asyncio.sleep(0)
            if index in refused:
                continue
            try:
                checked.append((index, *self._check(item, now, models)))
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
        self._count(
            [(item, model) for (_, item, model), is_new in zip(checked, counted, strict=True) if is_new]
        )
        return {
            "counted": sum(counted),
            "errors": [{"index": index, "error": refused[index]} for index in sorted(refused)],
        }

    def _check(
        self, item: Any, now: int, models: dict[tuple[str, int], LoadedModel]
    ) -> tuple[CheckedItem, LoadedModel]:
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
        model = self._model(prediction, models)
        return (
            CheckedItem(
                mac=prediction.mac,
                issued=prediction.issued,
                model=model.name,
                version=model.version,
                truth=true_target(model, item["label"]),
                prediction=float(prediction.prediction),
            ),
            model,
        )

    def _model(self, prediction: PredictionId, models: dict[tuple[str, int], LoadedModel]) -> LoadedModel:
        key = (prediction.model, prediction.version)
        model = models.get(key)
        if model is None:
            try:
                model = self.dataplane.get_model(*key)
            except ModelServeError as err:
                raise _Refused(f"id: {err.message}") from None
            models[key] = model
        if prediction.is_class_index != (model.task == "classification"):
            raise _Refused(
                f"id: model {model.name!r} version {model.version} is no longer a {model.task} model"
            )
        return model

    def _count(self, items: Sequence[tuple[CheckedItem, LoadedModel]]) -> None:
        """Add counted items to the Prometheus counters (one increment per label set)."""
        pairs: dict[tuple[str, int], dict[tuple[str, str], int]] = {}
        sums: dict[tuple[str, int], dict[str, float]] = {}
        for item, model in items:
            key = (item.model, item.version)
            if model.task == "classification":
                labels = model.labels or []
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

    async def quality(self, name: str, version: int | None) -> dict[str, Any]:
        """The live scores of a served model version: the report of `/evaluate` over its last
        `feedback_window` feedback items (without them: no scores), `count` (every item counted), `window`,
        the card's test metrics and the difference, and `drift` (the input drift over the window the
        server's workers share, see `app.quality.drift`)."""
        model = self.dataplane.get_model(name, version)
        window = await self.store.window(model.name, model.version, self.settings.feedback_window)
        report: dict[str, Any] = {
            "model": model.name,
            "version": model.version,
            "task": model.task,
            "count": window.count,
            "window": self.settings.feedback_window,
        }
        if window.truth.shape[0] == 0:
            report["n"] = 0
        elif model.task == "classification":
            labels = model.labels or []
            accumulator = ClassificationAccumulator(n_classes=len(labels))
            accumulator.update(window.truth.astype(np.int64), window.prediction.astype(np.int64))
            report.update(accumulator.compute(labels))
        else:
            regression = RegressionAccumulator()
            regression.update(window.truth, window.prediction)
            report.update(regression.compute())
        compare_with_training(report, dict(model.card.metrics.test), model.task)
        drift = await self.dataplane.drift_report(model)
        report["drift"] = None if drift is None else drift.model_dump()
        return report

    async def close(self) -> None:
        """Let go of the store."""
        await self.store.close()
