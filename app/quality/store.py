"""The feedback state that the worker processes of one server share: an SQLite file in the state directory.

It remembers which prediction ids were counted (each is counted once; an id older than the feedback max age
is forgotten, since it would be refused as expired anyway), the last `feedback_window` feedback items of each
model version (the live scores come from them) and how many were counted in all. WAL mode lets readers go on
while one process writes; each call is one short transaction, run in this store's own low-priority thread so
that the event loop never waits on the disk or on another process's lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from app.threads import lower_thread_priority

FILENAME: Final = "feedback.sqlite3"
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


class FeedbackStore:
    """The SQLite file `state_dir/feedback.sqlite3`, opened on first use."""

    def __init__(self, state_dir: Path) -> None:
        """Nothing is opened or created until the first call."""
        self.path = state_dir / FILENAME
        self._connection: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="modelserve-feedback", initializer=lower_thread_priority
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

    async def close(self) -> None:
        """Close the connection and stop the thread."""

        def work() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, work)
        self._executor.shutdown(wait=False)


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
