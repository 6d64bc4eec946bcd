"""Input drift: the rows a model version serves, against the training split its card summarises.

The trainer records in the card (`app.model_card.TrainingSummary`) the decile bin edges of each tracked
quantity of a row (each tabular column, or a few per-row statistics of an image or a sequence), the share of
training rows in each bin, and the training class priors. A `DriftMonitor` per served version counts the bins
of the rows that `/predict` and V2 infer answer (never `/evaluate`: that is not live traffic) over a window
of about `drift_window_rows` rows, and reports for each quantity the population stability index

    PSI = sum over bins of (served share - training share) * ln(served share / training share)

(shares floored at `PSI_EPSILON`), and the same for the predicted classes against the training priors. The
usual reading: below 0.1 stable, 0.1 to 0.2 a moderate shift, above `PSI_ALARM` (0.2) a significant one.

Cheap on the hot path: a request only appends references to its arrays; once `FLUSH_ROWS` rows are pending
(or `FLUSH_SECONDS` after the first of them) they are binned together, vectorised, and the gauges are set
(at most every `GAUGE_SECONDS`). Under heavy traffic only a random sample of the requests is binned, about
`SAMPLED_ROWS_PER_SECOND` rows a second.
The window is `WINDOW_SEGMENTS` segments of rows: the newest fills, then the oldest is emptied for the next
rows, so a report covers between nine tenths of the window and all of it.

Each worker process counts the rows it serves: with several workers, a report and the gauges are that
worker's share of the traffic (the gauges keep the most recent value of the live workers).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from app.model_card import (
    LABEL_INDEX_OUTPUT,
    MAX_SUMMARY_FEATURES,
    PROBABILITIES_OUTPUT,
    ModelCard,
    TrainingSummary,
    bin_index,
    row_statistics,
)
from app.observability import PrometheusMetrics

logger = logging.getLogger(__name__)

PSI_EPSILON = 1e-4
"""Floor of a share in the PSI: an empty bin counts as this share instead of making the index infinite."""
PSI_ALARM = 0.2
"""The usual alarm level: a PSI above it is a significant shift."""
MIN_ROWS = 100
"""Rows the window needs before a PSI is reported or set as a gauge (fewer: mostly sampling noise)."""
SAMPLED_ROWS_PER_SECOND = 4096
"""Served rows binned per second at most: above it, each request is binned with the probability that keeps
about this many (the PSI needs a sample, and binning then costs a bounded share of a core)."""
FLUSH_ROWS = 1024
FLUSH_SECONDS = 1.0
GAUGE_SECONDS = 1.0
"""Least time between two updates of the gauges (a report updates them too)."""
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
    """The input drift of one served model version in this worker process."""

    window_rows: int = Field(description="rows the window holds at most")
    rows: int = Field(description="served rows in the window now")
    sampled_share: float = Field(description="share of the served requests binned now (1: all of them)")
    min_rows: int = Field(description="rows needed before a PSI is reported")
    psi_alarm: float = Field(description="the usual alarm level of a PSI")
    features: list[FeatureDrift]
    predictions: PredictionDrift | None = Field(description="classification only")


class DriftMonitor:
    """Bin counts of the rows one model version served, in a window of recent rows, and their PSI."""

    @classmethod
    def for_card(
        cls, card: ModelCard, window_rows: int, metrics: PrometheusMetrics | None
    ) -> DriftMonitor | None:
        """A monitor for a served version; None when its card carries no training summary or the window
        is 0 (drift monitoring off)."""
        if card.training_summary is None or window_rows <= 0:
            return None
        return cls(card, card.training_summary, window_rows, metrics)

    def __init__(
        self, card: ModelCard, summary: TrainingSummary, window_rows: int, metrics: PrometheusMetrics | None
    ) -> None:
        self.name, self.version, self.modality = card.name, str(card.version), card.modality
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
        self._segment_rows = max(1, math.ceil(window_rows / WINDOW_SEGMENTS))
        self._counts = np.zeros((WINDOW_SEGMENTS, sum(sizes)), dtype=np.int64)
        self._filled = np.zeros(WINDOW_SEGMENTS, dtype=np.int64)
        self._segment = 0
        self._pending: list[tuple[Tensors, Tensors]] = []
        self._pending_rows = 0
        self._pending_since = 0.0
        self._lock = threading.Lock()  # observe runs on the event loop; a report may come from a thread
        self._failed = False
        self._metrics = metrics
        self._gauges: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._gauges_set_at = -math.inf
        self.sampled_share = 1.0
        """Share of the served requests binned: 1 until the traffic exceeds `SAMPLED_ROWS_PER_SECOND`."""
        self._seen_rows = 0
        self._rate_since = time.monotonic()
        self._random = random.Random()  # noqa: S311 - sampling, not security

    # ---------------------------------------------------------------------------------------- counting
    def observe(self, inputs: Tensors, outputs: Tensors) -> None:
        """Count the rows of one answered request (its graph inputs and outputs), or skip them when the
        traffic is sampled; never raises."""
        rows = len(next(iter(inputs.values())))
        now = time.monotonic()
        with self._lock:
            self._seen_rows += rows
            if now - self._rate_since >= FLUSH_SECONDS:  # the sampling share for the next second
                rate = self._seen_rows / (now - self._rate_since)
                self.sampled_share = min(1.0, SAMPLED_ROWS_PER_SECOND / rate)
                self._seen_rows, self._rate_since = 0, now
            if self.sampled_share < 1.0 and self._random.random() >= self.sampled_share:
                return
            if not self._pending:
                self._pending_since = now
            self._pending.append((inputs, outputs))
            self._pending_rows += rows
            if self._pending_rows >= FLUSH_ROWS or now - self._pending_since >= FLUSH_SECONDS:
                self._flush()
                if now - self._gauges_set_at >= GAUGE_SECONDS:
                    self._set_gauges(now)

    def _flush(self) -> None:
        """Bin the pending rows into the window (under the lock; never raises: a failure is logged once)."""
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if not pending:
            return
        try:
            self._add(self._bin(pending)[-self.window_rows :])
        except Exception:
            self._log_failure_once()

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
                predicted = np.concatenate([_predicted(outputs) for _, outputs in group])
                codes.append(np.where((predicted >= 0) & (predicted < len(self._labels)), predicted, -1))
            blocks.append(np.stack(codes, axis=1))
        stacked = np.concatenate(blocks)
        flat: np.ndarray = np.where(stacked >= 0, stacked + self._starts, -1)
        return flat

    def _add(self, codes: np.ndarray) -> None:
        """Count binned rows into the newest segment, moving on to the next (emptied) one when it is full."""
        start = 0
        while start < len(codes):
            segment = self._segment
            rows = codes[start : start + self._segment_rows - int(self._filled[segment])]
            self._counts[segment] += np.bincount(rows[rows >= 0], minlength=self._counts.shape[1])
            self._filled[segment] += len(rows)
            start += len(rows)
            if self._filled[segment] >= self._segment_rows:
                self._segment = (segment + 1) % WINDOW_SEGMENTS
                self._counts[self._segment] = 0
                self._filled[self._segment] = 0

    # ---------------------------------------------------------------------------------------- reporting
    def _window(self) -> tuple[np.ndarray, int]:
        return self._counts.sum(axis=0), int(self._filled.sum())

    def _psi(self, counts: np.ndarray) -> np.ndarray:
        """The PSI of each block of bins (each quantity, then the classes) from the window's counts."""
        totals = np.add.reduceat(counts, self._starts)
        block_totals = np.repeat(np.maximum(totals, 1), self._sizes)
        served = np.maximum(counts / block_totals, PSI_EPSILON)
        terms = (served - self._expected) * np.log(served / self._expected)
        psi: np.ndarray = np.add.reduceat(terms, self._starts)
        return psi

    def report(self) -> DriftReport:
        """The drift over the window now (pending rows binned first)."""
        with self._lock:
            self._flush()
            self._set_gauges(time.monotonic())
            counts, rows = self._window()
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
            sampled_share=round(self.sampled_share, 6),
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

    def _set_gauges(self, now: float) -> None:
        """Set the gauges from the window (under the lock; never raises: a failure is logged once)."""
        metrics = self._metrics
        if metrics is None:
            return
        self._gauges_set_at = now
        try:
            self._set_gauge_values(metrics)
        except Exception:
            self._log_failure_once()

    def _set_gauge_values(self, metrics: PrometheusMetrics) -> None:
        counts, rows = self._window()
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
            for metric, labels in self._gauges:
                metric.remove(self.name, self.version, *labels)
            self._gauges.clear()


def _stack(group: list[Tensors]) -> Tensors:
    if len(group) == 1:
        return group[0]
    return {name: np.concatenate([inputs[name] for inputs in group]) for name in group[0]}


def _predicted(outputs: Tensors) -> np.ndarray:
    """The predicted class index of each row: `label_index`, or the argmax of `probabilities`."""
    if LABEL_INDEX_OUTPUT in outputs:
        return np.asarray(outputs[LABEL_INDEX_OUTPUT], dtype=np.int64).reshape(-1)
    return np.asarray(np.argmax(outputs[PROBABILITIES_OUTPUT], axis=1), dtype=np.int64)
