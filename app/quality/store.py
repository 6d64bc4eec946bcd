"""The state that the worker processes of one server share: an SQLite file in the state directory.

Feedback (`FeedbackStore`): which prediction ids were counted (each is counted once; an id older than the
feedback max age is forgotten, since it would be refused as expired anyway), the last `feedback_window`
feedback items of each model version (the live scores come from them) and how many were counted in all.

Input drift (`DriftStore`): the bin counts of the rows each worker served, in segments (see
`app.quality.drift`); the window of a model version is its newest segments, whichever worker wrote them.

WAL mode lets readers go on while one process writes; each call is one short transaction, run in the store's
own low-priority thread so that the event loop never waits on the disk or on another process's lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FILENAME: Final = "feedback.sqlite3"
THREAD_NICE_INCREMENT: Final = 10
"""How much nicer the store's thread is than the rest of the process (Linux threads have their own nice
value: on a busy machine the scheduler runs the event loop and inference threads first)."""
COUNTS_DTYPE: Final = np.dtype("<i4")
"""A drift segment's bin counts as stored: little-endian int32 (a segment holds a tenth of the window)."""
BUSY_TIMEOUT_MS: Final = 30_000
"""How long a transaction waits for another process's write lock before it fails."""
_SCHEMA: Final = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS counted_ids (mac BLOB PRIMARY KEY, issued INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counted_ids_by_issued ON counted_ids (issued);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    truth REAL NOT NULL,
    prediction REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_version ON feedback (model, version, seq);
CREATE TABLE IF NOT EXISTS totals (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (model, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drift_segments (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    sampled_share REAL NOT NULL,
    counts BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS drift_segments_by_version ON drift_segments (model, version, seq);
COMMIT;
"""
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CheckedItem:
    """A feedback item whose id is genuine and whose label fits its model: ready to count."""

    mac: bytes
    """The id's MAC (its identity)."""
    issued: int
    model: str
    version: int
    truth: float
    """The true class index, or the true value."""
    prediction: float
    """The predicted class index, or the predicted value."""


@dataclass(frozen=True, slots=True)
class Window:
    """The last feedback items of one model version, oldest first, and how many were counted in all."""

    truth: npt.NDArray[np.float64]
    prediction: npt.NDArray[np.float64]
    count: int


@dataclass(frozen=True, slots=True)
class DriftSegment:
    """Consecutive rows of one model version that one worker binned: their count and bin counts."""

    rows: int
    counts: npt.NDArray[np.int64]
    sampled_share: float
    """The worker's sampling share when it wrote the segment (see `DriftMonitor.sampled_share`)."""


@dataclass(frozen=True, slots=True)
class DriftWindow:
    """The newest segments of a model version, whichever worker wrote them: their rows and bin counts
    summed, and the mean of the workers' sampling shares (each worker's newest segment; None: no segment)."""

    rows: int
    counts: npt.NDArray[np.int64]
    sampled_share: float | None


class _SharedState:
    """The SQLite file `state_dir/feedback.sqlite3`, opened on first use by this object's own thread."""

    def __init__(self, state_dir: Path, thread_name: str) -> None:
        """Nothing is opened or created until the first call."""
        self.path = state_dir / FILENAME
        self._connection: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=thread_name, initializer=_lower_thread_priority
        )

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: work(self._connect()))

    def _connect(self) -> sqlite3.Connection:
        """The connection of the store's thread (the folder, file and tables are made on first use)."""
        if self._connection is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            connection.executescript(_SCHEMA)
            self._connection = connection
        return self._connection

    async def close(self) -> None:
        """Close the connection (after the work already queued) and stop the thread."""

        def work() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, work)
        self._executor.shutdown(wait=False)


class FeedbackStore(_SharedState):
    """Counted prediction ids and feedback items."""

    def __init__(self, state_dir: Path) -> None:
        """Nothing is opened or created until the first call."""
        super().__init__(state_dir, "modelserve-feedback")

    async def record(self, items: Sequence[CheckedItem], *, forget_before: int, window: int) -> list[bool]:
        """Count each item whose id was not counted before: whether it was counted (False: a duplicate).

        Ids issued before `forget_before` (Unix seconds) are forgotten; each model version touched keeps its
        last `window` items.
        """

        def work(connection: sqlite3.Connection) -> list[bool]:
            counted: list[bool] = []
            added: dict[tuple[str, int], int] = {}
            with _transaction(connection):
                connection.execute("DELETE FROM counted_ids WHERE issued < ?", (forget_before,))
                for item in items:
                    cursor = connection.execute(
                        "INSERT OR IGNORE INTO counted_ids (mac, issued) VALUES (?, ?)",
                        (item.mac, item.issued),
                    )
                    is_new = cursor.rowcount == 1
                    counted.append(is_new)
                    if is_new:
                        connection.execute(
                            "INSERT INTO feedback (model, version, truth, prediction) VALUES (?, ?, ?, ?)",
                            (item.model, item.version, item.truth, item.prediction),
                        )
                        key = (item.model, item.version)
                        added[key] = added.get(key, 0) + 1
                for (model, version), count in added.items():
                    connection.execute(
                        "INSERT INTO totals (model, version, count) VALUES (?, ?, ?) "
                        "ON CONFLICT (model, version) DO UPDATE SET count = count + excluded.count",
                        (model, version, count),
                    )
                    connection.execute(
                        "DELETE FROM feedback WHERE model = ? AND version = ? AND seq <= ("
                        "SELECT seq FROM feedback WHERE model = ? AND version = ? "
                        "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                        (model, version, model, version, window),
                    )
            return counted

        return await self._run(work)

    async def window(self, model: str, version: int, size: int) -> Window:
        """The last `size` feedback items of `model` `version` and its total count."""

        def work(connection: sqlite3.Connection) -> Window:
            with _transaction(connection, "BEGIN"):
                rows = connection.execute(
                    "SELECT truth, prediction FROM feedback WHERE model = ? AND version = ? "
                    "ORDER BY seq DESC LIMIT ?",
                    (model, version, size),
                ).fetchall()
                total = connection.execute(
                    "SELECT count FROM totals WHERE model = ? AND version = ?", (model, version)
                ).fetchone()
            pairs = np.array(rows[::-1], dtype=np.float64).reshape(len(rows), 2)
            return Window(pairs[:, 0], pairs[:, 1], int(total[0]) if total else 0)

        return await self._run(work)


class DriftStore(_SharedState):
    """The drift segments of every model version, written by each worker as it bins served rows.

    Each worker has at most one open segment per version, which it rewrites (with the rows added) at each
    flush until it is full; a rewritten segment is the newest. The window of a version is its newest
    segments, as many as fit in `window_rows` rows; older ones are deleted at each write.
    """

    def __init__(self, state_dir: Path) -> None:
        """Nothing is opened or created until the first call."""
        super().__init__(state_dir, "modelserve-drift")
        self._open: dict[tuple[str, int, int], int] = {}
        """The open segment of each (model, version, worker) as stored: its seq (only the thread uses it)."""

    def append(
        self,
        model: str,
        version: int,
        worker: int,
        full: Sequence[DriftSegment],
        open_segment: DriftSegment | None,
        *,
        window_rows: int,
    ) -> Future[DriftWindow]:
        """Queue a worker's segments that filled up and its open one (the first of them continues the open
        segment it wrote before); the future gives the window after the write. Returns at once: the write
        runs in the store's thread."""
        segments = [*full, *([open_segment] if open_segment is not None else [])]
        bins = len(segments[0].counts)

        def work() -> DriftWindow:
            connection = self._connect()
            key = (model, version, worker)
            replaced, written = self._open.get(key), None
            with _transaction(connection):
                if replaced is not None:
                    connection.execute(
                        "DELETE FROM drift_segments "
                        "WHERE seq = ? AND model = ? AND version = ? AND worker = ?",
                        (replaced, model, version, worker),
                    )
                for segment in segments:
                    written = connection.execute(
                        "INSERT INTO drift_segments (model, version, worker, rows, sampled_share, counts) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            model,
                            version,
                            worker,
                            segment.rows,
                            segment.sampled_share,
                            segment.counts.astype(COUNTS_DTYPE).tobytes(),
                        ),
                    ).lastrowid
                window, outside = _drift_window(connection, model, version, window_rows, bins)
                if outside is not None:
                    connection.execute(
                        "DELETE FROM drift_segments WHERE model = ? AND version = ? AND seq <= ?",
                        (model, version, outside),
                    )
            if open_segment is not None and written is not None:
                self._open[key] = written
            else:
                self._open.pop(key, None)
            return window

        return self._executor.submit(work)

    async def window(self, model: str, version: int, *, window_rows: int, bins: int) -> DriftWindow:
        """The window of `model` `version` now (after the writes already queued here)."""

        def work(connection: sqlite3.Connection) -> DriftWindow:
            with _transaction(connection, "BEGIN"):
                return _drift_window(connection, model, version, window_rows, bins)[0]

        return await self._run(work)


def _drift_window(
    connection: sqlite3.Connection, model: str, version: int, window_rows: int, bins: int
) -> tuple[DriftWindow, int | None]:
    """The window (newest segments first, until one does not fit: the window is full, or the segment counts
    other bins, from an earlier card of the version) and the seq of the newest segment left out, if any."""
    counts = np.zeros(bins, dtype=np.int64)
    rows = 0
    shares: dict[int, float] = {}
    cursor = connection.execute(
        "SELECT seq, worker, rows, sampled_share, counts FROM drift_segments "
        "WHERE model = ? AND version = ? ORDER BY seq DESC",
        (model, version),
    )
    for seq, worker, segment_rows, share, blob in cursor.fetchall():
        if rows + segment_rows > window_rows or len(blob) != bins * COUNTS_DTYPE.itemsize:
            return _window_of(rows, counts, shares), seq
        counts += np.frombuffer(blob, dtype=COUNTS_DTYPE)
        rows += segment_rows
        shares.setdefault(worker, share)
    return _window_of(rows, counts, shares), None


def _window_of(rows: int, counts: npt.NDArray[np.int64], shares: dict[int, float]) -> DriftWindow:
    return DriftWindow(rows, counts, sum(shares.values()) / len(shares) if shares else None)


class _transaction:
    """`BEGIN IMMEDIATE` (a writer takes the lock up front, so it never fails half-way) ... `COMMIT`, or
    `ROLLBACK` on an error."""

    def __init__(self, connection: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._connection = connection
        self._begin = begin

    def __enter__(self) -> None:
        self._connection.execute(self._begin)

    def __exit__(self, kind: object, *_: object) -> None:
        self._connection.execute("COMMIT" if kind is None else "ROLLBACK")


def _lower_thread_priority() -> None:
    """Make the calling thread `THREAD_NICE_INCREMENT` nicer (a no-op where threads have no nice value)."""
    if not hasattr(os, "setpriority"):
        return
    thread_id = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, thread_id, os.getpriority(os.PRIO_PROCESS, thread_id) + THREAD_NICE_INCREMENT
        )
    except OSError as err:  # not permitted here: run at normal priority
        logger.debug("cannot lower the priority of the state thread", extra={"error": str(err)})
