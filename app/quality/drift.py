"""Input drift: the rows a model version serves, against the training split its card summarises.

The trainer records in the card (`app.model_card.TrainingSummary`) the decile bin edges of each tracked
quantity of a row (each tabular column, or a few per-row statistics of an image or a sequence), the share of
training rows in each bin, and the training class priors. A `DriftMonitor` per served version counts the bins
of the rows that `/predict` and V2 infer answer (never `/evaluate`: that is not live traffic) over a window
of about `drift_window_rows` rows, and reports for each quantity the population stability index

    PSI = sum over bins of (served share - training share) * ln(served share / training share)

(shares floored at `PSI_EPSILON`), and the same for the predicted classes against the training priors. The
usual reading: below 0.1 stable, 0.1 to 0.2 a moderate shift, above `PSI_ALARM` (0.2) a significant one.

The window is the server's: the worker processes of one server share it through the state directory
(`app.quality.store.DriftStore`), so every worker reports the same drift and sets the same gauges. Each
worker counts the rows it serves into segments of a tenth of the window; the window of a version is the
newest segments of all its workers, as many as fit in `drift_window_rows` rows (so it holds between nine
tenths of the window and all of it), and it outlives a restart with the same state directory.

Cheap on the hot path: a request only appends references to its arrays; once `FLUSH_ROWS` rows are pending
(or `FLUSH_SECONDS` after the first of them) they are binned together, vectorised, on the event loop, and
their counts go to the store, whose thread writes them (one short transaction), reads the window back and
sets the gauges from it. Under heavy traffic only a random sample of the requests is binned, about
`SAMPLED_ROWS_PER_SECOND` rows a second per worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.model_card import (
    MAX_SUMMARY_FEATURES,
    ModelCard,
    TrainingSummary,
    bin_index,
    row_statistics,
)
from app.observability import PrometheusMetrics
from app.quality.ids import predictions_of
from app.quality.store import DriftSegment, DriftStore, DriftWindow

logger = logging.getLogger(__name__)

PSI_EPSILON = 1e-4
"""Floor of a share in the PSI: an empty bin counts as this share instead of making the index infinite."""
PSI_ALARM = 0.2
"""The usual alarm level: a PSI above it is a significant shift."""
MIN_ROWS = 100
"""Rows the window needs before a PSI is reported or set as a gauge (fewer: mostly sampling noise)."""
SAMPLED_ROWS_PER_SECOND = 1024
"""Served rows binned per second at most: above it, each request is binned with the probability that keeps
about this many (the PSI needs a sample, and binning then costs a bounded share of a core)."""
FLUSH_ROWS = 1024
FLUSH_SECONDS = 1.0
WINDOW_SEGMENTS = 10

Tensors = Mapping[str, np.ndarray]


class FeatureDrift(BaseModel):
    """The drift of one tracked quantity."""

    name: str
    statistic: str = Field(description="value (a tabular column), mean, std, nonzero_fraction or length")
    psi: float | None = Field(description="population stability index; null below the minimum rows")


class PredictionDrift(BaseModel):
    """The predicted classes over the window against the training class priors."""

    psi: float | None = Field(description="population stability index; null below the minimum rows")
    shares: dict[str, float] = Field(description="share of each predicted class in the window")
    training_priors: dict[str, float]


class DriftReport(BaseModel):
    """The input drift of one served model version, over the window its server's workers share."""

    window_rows: int = Field(description="rows the window holds at most")
    rows: int = Field(description="served rows in the window now, from every worker of the server")
    sampled_share: float = Field(
        description="share of the served requests binned now (1: all of them), the mean over the workers "
        "with rows in the window"
    )
    min_rows: int = Field(description="rows needed before a PSI is reported")
    psi_alarm: float = Field(description="the usual alarm level of a PSI")
    features: list[FeatureDrift]
    predictions: PredictionDrift | None = Field(description="classification only")


class DriftMonitor:
    """One worker's counting of the rows a model version serves into the window the server's workers share
    (`DriftStore`), and the PSI of that window."""

    @classmethod
    def for_card(
        cls, card: ModelCard, window_rows: int, metrics: PrometheusMetrics | None, store: DriftStore
    ) -> DriftMonitor | None:
        """A monitor for a served version; None when its card carries no training summary or the window
        is 0 (drift monitoring off)."""
        if card.training_summary is None or window_rows <= 0:
            return None
        return cls(card, card.training_summary, window_rows, metrics, store)

    def __init__(
        self,
        card: ModelCard,
        summary: TrainingSummary,
        window_rows: int,
        metrics: PrometheusMetrics | None,
        store: DriftStore,
    ) -> None:
        self.name, self.version, self.modality = card.name, str(card.version), card.modality
        self._version = card.version
        self.window_rows = window_rows
        self._features = summary.features
        self._edges = [np.asarray(feature.edges, dtype=np.float64) for feature in summary.features]
        expected = [feature.fractions for feature in summary.features]
        self._priors = summary.class_priors
        self._labels = list(card.labels or []) if self._priors is not None else []
        if self._priors is not None:
            expected.append([self._priors[label] for label in self._labels])
        # Every quantity's bins, then the classes', side by side in one flat array of counts.
        sizes = [len(shares) for shares in expected]
        self._starts = np.cumsum([0, *sizes[:-1]])
        self._sizes = np.array(sizes)
        self._expected = np.maximum(np.concatenate(expected), PSI_EPSILON)
        self._bins = sum(sizes)
        self._store = store
        self._segment_rows = max(1, math.ceil(window_rows / WINDOW_SEGMENTS))
        # This worker's open segment: the counts of its rows binned since its last segment filled up.
        self._open_counts = np.zeros(self._bins, dtype=np.int64)
        self._open_rows = 0
        self._pending: list[tuple[Tensors, Tensors]] = []
        self._pending_rows = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()  # the gauges are set on the event loop and in the store's thread
        self._failed = False
        self._metrics = metrics
        self._gauges: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._released = False
        self.sampled_share = 1.0
        """Share of this worker's served requests binned: 1 until its traffic exceeds
        `SAMPLED_ROWS_PER_SECOND`."""
        self._seen_rows = 0
        self._rate_since = time.monotonic()
        self._random = random.Random()  # noqa: S311 - sampling, not security
        self._worker = self._random.getrandbits(63)
        """Names this worker's segments in the store."""

    # ---------------------------------------------------------------------------------------- counting
    def observe(self, inputs: Tensors, outputs: Tensors) -> None:
        """Count the rows of one answered request (its graph inputs and outputs), or skip them when the
        traffic is sampled; never raises. On the event loop."""
        rows = len(next(iter(inputs.values())))
        now = time.monotonic()
        self._seen_rows += rows
        if now - self._rate_since >= FLUSH_SECONDS:  # the sampling share for the next second
            rate = self._seen_rows / (now - self._rate_since)
            self.sampled_share = min(1.0, SAMPLED_ROWS_PER_SECOND / rate)
            self._seen_rows, self._rate_since = 0, now
        if self.sampled_share < 1.0 and self._random.random() >= self.sampled_share:
            return
        if not self._pending:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
        self._pending.append((inputs, outputs))
        self._pending_rows += rows
        if self._pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Bin the pending rows into this worker's segments and hand them to the store (on the event loop;
        never raises: a failure is logged once)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        try:
            full, open_segment = self._add(self._bin(pending)[-self.window_rows :])
            written = self._store.append(
                self.name, self._version, self._worker, full, open_segment, window_rows=self.window_rows
            )
            written.add_done_callback(self._written)
        except Exception:
            self._log_failure_once()

    def _written(self, written: Future[DriftWindow]) -> None:
        """Set the gauges from the window the store read back after a write (in the store's thread)."""
        try:
            window = written.result()
        except Exception:
            self._log_failure_once()
        else:
            self._set_gauges(window)

    def _log_failure_once(self) -> None:
        """A failure of the monitor is a bug, not the client's: say it once (in the handler), keep serving."""
        if not self._failed:
            self._failed = True
            logger.exception(
                "drift monitoring failed; the rows or gauges concerned are left out",
                extra={"model": self.name, "version": self.version},
            )

    def _bin(self, pending: list[tuple[Tensors, Tensors]]) -> np.ndarray:
        """The flat bin index of each tracked quantity (and the predicted class) of each pending row:
        `[rows, blocks]`, -1 for a predicted class out of range."""
        # Requests whose inputs have the same shape are stacked and summarised together.
        groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[tuple[Tensors, Tensors]]] = {}
        for inputs, outputs in pending:
            key = tuple((name, value.shape[1:]) for name, value in inputs.items())
            groups.setdefault(key, []).append((inputs, outputs))
        blocks = []
        for group in groups.values():
            values = row_statistics(self._features, self.modality, _stack([inputs for inputs, _ in group]))
            codes = [bin_index(edges, values[:, j]) for j, edges in enumerate(self._edges)]
            if self._labels:
                predicted = np.concatenate(
                    [predictions_of("classification", outputs) for _, outputs in group]
                )
                codes.append(np.where((predicted >= 0) & (predicted < len(self._labels)), predicted, -1))
            blocks.append(np.stack(codes, axis=1))
        stacked = np.concatenate(blocks)
        flat: np.ndarray = np.where(stacked >= 0, stacked + self._starts, -1)
        return flat

    def _add(self, codes: np.ndarray) -> tuple[list[DriftSegment], DriftSegment | None]:
        """Count binned rows into the open segment, closing it each time it is full: the segments that
        filled up, and the open one (None when it is empty)."""
        full = []
        start = 0
        while start < len(codes):
            rows = codes[start : start + self._segment_rows - self._open_rows]
            self._open_counts += np.bincount(rows[rows >= 0], minlength=self._bins)
            self._open_rows += len(rows)
            start += len(rows)
            if self._open_rows >= self._segment_rows:
                full.append(DriftSegment(self._open_rows, self._open_counts, self.sampled_share))
                self._open_counts = np.zeros(self._bins, dtype=np.int64)
                self._open_rows = 0
        if not self._open_rows:
            return full, None
        return full, DriftSegment(self._open_rows, self._open_counts.copy(), self.sampled_share)

    # ---------------------------------------------------------------------------------------- reporting
    def _psi(self, counts: np.ndarray) -> np.ndarray:
        """The PSI of each block of bins (each quantity, then the classes) from the window's counts."""
        totals = np.add.reduceat(counts, self._starts)
        block_totals = np.repeat(np.maximum(totals, 1), self._sizes)
        served = np.maximum(counts / block_totals, PSI_EPSILON)
        terms = (served - self._expected) * np.log(served / self._expected)
        psi: np.ndarray = np.add.reduceat(terms, self._starts)
        return psi

    async def report(self) -> DriftReport:
        """The drift over the server's window now (this worker's pending rows binned first)."""
        self.flush()
        window = await self._store.window(
            self.name, self._version, window_rows=self.window_rows, bins=self._bins
        )
        self._set_gauges(window)
        counts, rows = window.counts, window.rows
        psi = [round(float(value), 6) for value in self._psi(counts)] if rows >= MIN_ROWS else None
        features = [
            FeatureDrift(name=feature.name, statistic=feature.statistic, psi=None if psi is None else psi[j])
            for j, feature in enumerate(self._features)
        ]
        predictions = None
        if self._priors is not None:
            predictions = PredictionDrift(
                psi=None if psi is None else psi[-1],
                shares=self._class_shares(counts),
                training_priors=self._priors,
            )
        return DriftReport(
            window_rows=self.window_rows,
            rows=rows,
            sampled_share=round(
                self.sampled_share if window.sampled_share is None else window.sampled_share, 6
            ),
            min_rows=MIN_ROWS,
            psi_alarm=PSI_ALARM,
            features=features,
            predictions=predictions,
        )

    def _class_shares(self, counts: np.ndarray) -> dict[str, float]:
        classes = counts[int(self._starts[-1]) :]
        total = max(int(classes.sum()), 1)
        return {
            label: round(int(count) / total, 6) for label, count in zip(self._labels, classes, strict=True)
        }

    # ------------------------------------------------------------------------------------------- gauges
    def _gauge(self, metric: Any, *labels: str) -> Any:
        """The child of a drift gauge for this version and `labels`, bound once (only then does it show)."""
        key = (metric, labels)
        child = self._gauges.get(key)
        if child is None:
            child = self._gauges[key] = metric.labels(self.name, self.version, *labels)
        return child

    def _set_gauges(self, window: DriftWindow) -> None:
        """Set the gauges from the window (never raises: a failure is logged once)."""
        metrics = self._metrics
        if metrics is None:
            return
        with self._lock:
            if self._released:
                return
            try:
                self._set_gauge_values(metrics, window)
            except Exception:
                self._log_failure_once()

    def _set_gauge_values(self, metrics: PrometheusMetrics, window: DriftWindow) -> None:
        counts, rows = window.counts, window.rows
        self._gauge(metrics.drift_window_rows).set(rows)
        if rows < MIN_ROWS:
            return
        psi = self._psi(counts)
        for j, feature in enumerate(self._features):
            self._gauge(metrics.drift_psi, feature.name).set(psi[j])
        if self._labels:
            self._gauge(metrics.prediction_psi).set(psi[-1])
            # A series per class for the first classes only (as many as tracked quantities at most).
            for label, share in list(self._class_shares(counts).items())[:MAX_SUMMARY_FEATURES]:
                self._gauge(metrics.prediction_class_share, label).set(share)

    def remove_gauges(self) -> None:
        """Drop this version's drift series (the version was released)."""
        with self._lock:
            self._released = True
            for metric, labels in self._gauges:
                metric.remove(self.name, self.version, *labels)
            self._gauges.clear()


def _stack(group: list[Tensors]) -> Tensors:
    if len(group) == 1:
        return group[0]
    return {name: np.concatenate([inputs[name] for inputs in group]) for name in group[0]}
