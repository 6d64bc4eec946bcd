"""Prometheus metrics (their names and labels are part of the public contract), JSON logging and the
request id.

Each app owns a `CollectorRegistry`, so several apps (tests) never share counters. When
`PROMETHEUS_MULTIPROC_DIR` is set (`modelserve serve --workers N` sets it), prometheus_client keeps every
value in per-process files there and `/metrics` merges them, so the numbers cover all workers.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# Latency buckets from 100 µs to 10 s: /predict on a small model answers in well under a millisecond.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)

# Label value for requests that name no loaded model (labels never carry user-supplied strings).
UNKNOWN_MODEL = "unknown"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@dataclass(slots=True)
class ModelStatistics:
    """Plain running totals of one model name in this process, kept beside its Prometheus metrics for what
    reads them back (the V2 statistics extension): answered requests by outcome, time queued, onnxruntime
    calls. Times are in nanoseconds."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0
    """Rows run."""
    execution_count: int = 0
    """onnxruntime calls."""

    def count_request(self, success: bool, seconds: float) -> None:
        """One answered request (success: a 2xx status)."""
        if success:
            self.success_count += 1
            self.success_ns += int(seconds * 1e9)
        else:
            self.fail_count += 1
            self.fail_ns += int(seconds * 1e9)


@dataclass(frozen=True, slots=True)
class ModelPrometheusMetrics:
    """The per-model children of `PrometheusMetrics`, bound once so the hot path skips the label lookup, and
    the model's `ModelStatistics`, which the batcher feeds with them."""

    queue_duration: Any
    inference_duration: Any
    batch_rows: Any
    queue_rows: Any
    statistics: ModelStatistics

    def queued(self, seconds: float) -> None:
        """One request left the queue for a batch after `seconds`."""
        self.queue_duration.observe(seconds)
        self.statistics.queue_count += 1
        self.statistics.queue_ns += int(seconds * 1e9)

    def ran(self, seconds: float, rows: int) -> None:
        """One onnxruntime call of `rows` rows took `seconds`."""
        self.inference_duration.observe(seconds)
        self.batch_rows.observe(rows)
        self.statistics.compute_count += 1
        self.statistics.compute_ns += int(seconds * 1e9)
        self.statistics.execution_count += 1
        self.statistics.inference_count += rows


class RequestMetrics:
    """The request metrics of one endpoint (in flight, duration, failures), their children bound once per
    label set. Each answered request also counts in its model's `ModelStatistics`."""

    def __init__(self, metrics: PrometheusMetrics, endpoint: str) -> None:
        """Bind the `endpoint` label."""
        self._metrics = metrics
        self._endpoint = endpoint
        self.in_flight = metrics.inflight_requests.labels(endpoint=endpoint)
        self._answered: dict[tuple[str, int], tuple[Any, ModelStatistics]] = {}
        self._failures: dict[tuple[str, str], Any] = {}

    def answered(self, model: str, status: int, seconds: float) -> None:
        """A request of `model` (a loaded model's name, or `UNKNOWN_MODEL`) answered `status` in `seconds`."""
        bound = self._answered.get((model, status))
        if bound is None:
            duration = self._metrics.request_duration.labels(
                endpoint=self._endpoint, model=model, status=str(status)
            )
            bound = self._answered[(model, status)] = (duration, self._metrics.statistics(model))
        bound[0].observe(seconds)
        bound[1].count_request(200 <= status < 300, seconds)

    def failed(self, model: str, reason: str) -> None:
        """A request of `model` failed for `reason` (a domain error's, or `internal_error`)."""
        counter = self._failures.get((model, reason))
        if counter is None:
            counter = self._failures[(model, reason)] = self._metrics.request_failures.labels(
                model=model, reason=reason
            )
        counter.inc()


class PrometheusMetrics:
    """Every metric of the public contract, registered in a registry of this app's own.

    Attributes are the prometheus_client metric objects: `request_duration`, `queue_duration`,
    `inference_duration`, `batch_rows`, `queue_rows`, `inflight_requests`, `request_failures`,
    `model_load_seconds`, `evaluation_score`, `feedback`, `feedback_regression_sum`, `live_score`,
    `card_test_score`, and the drift gauges `drift_psi`, `drift_window_rows`, `prediction_psi`,
    `prediction_class_share`.
    """

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        """Create the metrics.

        Args:
            multiprocess_dir: prometheus_client's multiprocess directory, when several workers share one.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        registry = self.registry
        self.request_duration = Histogram(
            "modelserve_request_duration_seconds",
            "Time from request received to response sent, by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "modelserve_queue_duration_seconds",
            "Time a request waited in its model's batch queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "modelserve_inference_duration_seconds",
            "Time of one onnxruntime call (one batch).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "modelserve_batch_rows",
            "Rows per onnxruntime call; _count is the number of calls.",
            ["model"],
            buckets=BATCH_ROW_BUCKETS,
            registry=registry,
        )
        self.queue_rows = Gauge(
            "modelserve_queue_rows",
            "Rows waiting in a model's batch queue.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.inflight_requests = Gauge(
            "modelserve_inflight_requests",
            "Requests being handled, by endpoint.",
            ["endpoint"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.request_failures = Counter(
            "modelserve_request_failures",
            "Requests answered with an error, by model and reason (snake_case error name).",
            ["model", "reason"],
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            "modelserve_model_load_seconds",
            "Seconds it took to load and warm up a model version.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.evaluation_score = Gauge(
            "modelserve_evaluation_score",
            "Latest score reported by /evaluate, by model and metric.",
            ["model", "metric"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        # Input drift (`app.quality.drift`): per served version, each worker's own window of served rows.
        self.drift_psi = Gauge(
            "modelserve_drift_psi",
            "Population stability index of a tracked input quantity: served rows vs the training split.",
            ["model", "version", "feature"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.drift_window_rows = Gauge(
            "modelserve_drift_window_rows",
            "Served rows in the input-drift window of a model version.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.prediction_psi = Gauge(
            "modelserve_prediction_psi",
            "Population stability index of the predicted classes vs the training class priors.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.prediction_class_share = Gauge(
            "modelserve_prediction_class_share",
            "Share of a predicted class among the served rows of the input-drift window.",
            ["model", "version", "class"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.feedback = Counter(
            "modelserve_feedback",
            "Feedback items counted for a classifier, by model version, true class and predicted class.",
            ["model", "version", "true", "predicted"],
            registry=registry,
        )
        self.feedback_regression_sum = Gauge(
            "modelserve_feedback_regression_sum",
            "Running sums over the feedback items counted for a regressor, by model version and quantity "
            "(count, error_sum of prediction minus label, abs_error_sum, squared_error_sum, label_sum, "
            "label_squared_sum).",
            ["model", "version", "quantity"],
            registry=registry,
            multiprocess_mode="sum",
        )
        # Quality against the card: set from the feedback state the workers share, so every worker agrees.
        self.live_score = Gauge(
            "modelserve_live_score",
            "Score of a model version over its last feedback items (GET /models/{name}/quality), by metric.",
            ["model", "version", "metric"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.card_test_score = Gauge(
            "modelserve_card_test_score",
            "Test score of a model version in its card, by metric (beside modelserve_live_score).",
            ["model", "version", "metric"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self._scored: dict[tuple[str, str], set[tuple[Gauge, str]]] = {}
        """(model, version) → the (gauge, metric) label sets of its score gauges set in this process."""
        self._per_model: dict[str, ModelPrometheusMetrics] = {}
        self._statistics: dict[str, ModelStatistics] = {}

    def for_model(self, model: str) -> ModelPrometheusMetrics:
        """Children of the per-model metrics for a loaded model's name (cached)."""
        bound = self._per_model.get(model)
        if bound is None:
            bound = ModelPrometheusMetrics(
                queue_duration=self.queue_duration.labels(model=model),
                inference_duration=self.inference_duration.labels(model=model),
                batch_rows=self.batch_rows.labels(model=model),
                queue_rows=self.queue_rows.labels(model=model),
                statistics=self.statistics(model),
            )
            self._per_model[model] = bound
        return bound

    def statistics(self, model: str) -> ModelStatistics:
        """The running totals of a model name in this process (created empty on first use; they outlive
        unloads and reloads, like the Prometheus metrics)."""
        statistics = self._statistics.get(model)
        if statistics is None:
            statistics = self._statistics[model] = ModelStatistics()
        return statistics

    def set_evaluation_scores(self, model: str, scores: Mapping[str, float]) -> None:
        """Set `modelserve_evaluation_score{model,metric}` for every finite score."""
        for metric, value in scores.items():
            if math.isfinite(value):
                self.evaluation_score.labels(model=model, metric=metric).set(value)

    def set_live_scores(self, model: str, version: int, scores: Mapping[str, float]) -> None:
        """Set `modelserve_live_score{model,version,metric}` for every finite score."""
        self._set_scores(self.live_score, model, version, scores)

    def set_card_test_scores(self, model: str, version: int, test_metrics: Mapping[str, Any]) -> None:
        """Set `modelserve_card_test_score{model,version,metric}` for every finite number of the card's test
        metrics."""
        numbers = {
            metric: float(value)
            for metric, value in test_metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        self._set_scores(self.card_test_score, model, version, numbers)

    def _set_scores(self, gauge: Gauge, model: str, version: int, scores: Mapping[str, float]) -> None:
        scored = self._scored.setdefault((model, str(version)), set())
        for metric, value in scores.items():
            if math.isfinite(value):
                gauge.labels(model=model, version=str(version), metric=metric).set(value)
                scored.add((gauge, metric))

    def remove_scores(self, model: str, version: int) -> None:
        """Drop the live and card test score gauges of a model version (a released version)."""
        for gauge, metric in self._scored.pop((model, str(version)), set()):
            gauge.remove(model, str(version), metric)

    def count_feedback(self, model: str, version: int, pairs: Mapping[tuple[str, str], int]) -> None:
        """Add classifier feedback: `pairs` maps (true class, predicted class) names to item counts."""
        for (true, predicted), count in pairs.items():
            self.feedback.labels(model=model, version=str(version), true=true, predicted=predicted).inc(count)

    def add_feedback_sums(self, model: str, version: int, sums: Mapping[str, float]) -> None:
        """Add regressor feedback: `sums` maps each quantity to its sum over the new items."""
        for quantity, value in sums.items():
            self.feedback_regression_sum.labels(model=model, version=str(version), quantity=quantity).inc(
                value
            )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (merged across workers in multiprocess mode)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    def mark_process_dead(self) -> None:
        """Drop this worker's live gauges from the shared directory (called when the app shuts down)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, request id, and any `extra` fields.

    It writes a line per request when the access log is on (the default), so it is built for speed: the
    date and time to the second are formatted once per second, and orjson writes the JSON.
    """

    _RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        entry: dict[str, Any] = {
            "time": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in self._RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # what orjson refuses (an integer over 64 bits, keys that are not strings)
            return json.dumps(entry, default=str)


def logging_config(level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict sending app and uvicorn logs as JSON to stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "loggers": {
            "app": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
