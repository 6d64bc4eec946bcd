"""Service settings: one pydantic-settings class, read from `MODELSERVE_*` environment variables.

The command line (`modelserve serve --max-batch-rows 32 ...`) mirrors every field; nothing else in `app/`
reads the environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# Execution providers tried in order when `providers` is unset (those the build lacks are skipped).
AUTOMATIC_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Settings(BaseSettings):
    """Everything the service can be told; each field is `MODELSERVE_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="MODELSERVE_", extra="ignore", validate_default=True, use_attribute_docstrings=True
    )

    model_repository: Path = Path("models")
    """Directory holding `<name>/<version>/model.onnx` + `model.json`."""
    max_model_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest `model.onnx` loaded, in bytes (larger: the version is refused); protobuf caps one at 2 GiB."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to listen on."""
    api_key: SecretStr | None = None
    """Unset = no auth; set = `Authorization: Bearer <key>` on everything but health and metrics."""
    workers: int = Field(default=1, ge=1)
    """uvicorn worker processes (each loads every model; metrics are merged across them)."""
    log_level: LogLevel = "info"
    """Lowest level written to the JSON log."""
    access_log: bool = True
    """Write one JSON log line per HTTP request (method, path, status, duration, request id)."""

    max_batch_rows: int = Field(default=64, ge=1)
    """Most rows one onnxruntime call receives (a single larger request still runs, alone)."""
    max_batch_delay_seconds: float = Field(default=0.0, ge=0.0)
    """Longest the oldest queued request waits for more rows once the model is free (0: take what waits)."""
    max_queue_rows: int = Field(default=4096, ge=1)
    """Rows that may wait per model; beyond it a request gets 503 with Retry-After."""
    queue_timeout_seconds: float = Field(default=30.0, gt=0.0)
    """Longest a request may wait in the queue before it is answered 504."""
    batching: bool = True
    """Off: each request is its own onnxruntime call (for debugging and for the latency benchmark)."""
    retry_after_seconds: int = Field(default=1, ge=1)
    """Value of `Retry-After` on 503 answers."""
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest JSON request body accepted by `/predict` (larger: 413)."""
    drift_window_rows: int = Field(default=10_000, ge=0)
    """Rows served by `/predict` and V2 infer in each model version's input-drift window (0: off)."""

    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """onnxruntime execution providers in order of preference, comma-separated; empty = automatic."""
    intra_op_threads: int | None = Field(default=None, ge=1)
    """Threads onnxruntime uses inside one operator; unset = CPU cores / (2 x workers), at least 1."""
    inter_op_threads: int = Field(default=1, ge=1)
    """Threads onnxruntime uses to run independent operators in parallel."""

    repository_poll_seconds: float = Field(default=0.0, ge=0.0)
    """Rescan the repository this often and swap new or removed versions in and out (0: never)."""
    served_versions: int = Field(default=1, ge=0)
    """Serve the newest N versions that load of each model (0: every version)."""
    admin_api_key: SecretStr | None = None
    """Set = the admin routes (reload, the V2 repository extension) are on and need
    `Authorization: Bearer <admin key>`; the API key does not open them."""
    enable_repository_api: bool = False
    """Turn the admin routes on without an admin key: the API key (if any) guards them like other routes."""

    prediction_ids: bool = True
    """Give each prediction an id (for `POST /feedback`); off: answers carry none."""
    feedback_secret: SecretStr | None = None
    """Signs prediction ids (`POST /feedback` checks them). Unset: `modelserve serve` draws one at start for
    its workers; ids then do not survive a restart or reach other replicas."""
    feedback_max_age_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    """Feedback for a prediction older than this is refused (expired)."""
    feedback_window: int = Field(default=10000, ge=1)
    """`GET /models/{name}/quality` scores the last N feedback items of a model version."""
    state_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "modelserve")
    """Writable folder of the state the workers share (feedback counts in SQLite); created if missing."""

    prometheus_multiproc_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    )
    """Shared directory for metrics of several worker processes (prometheus_client's own variable)."""

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def resolved_intra_op_threads(self) -> int:
        """Threads per operator: the setting, or half the CPU cores this process may use, shared by workers.

        Half, because the event loop (parsing, encoding) needs cores too and several models may run at
        once; measured on 2 cores, one caller per 1-thread session beats fewer callers on multi-threaded ones.
        """
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // (2 * self.workers))
