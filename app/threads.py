"""Low-priority worker threads for bulk work (`/evaluate`), so that interactive requests get the CPU first.

On Linux a thread has its own nice value: the CPU-heavy parts of an evaluation that release the GIL (numpy's
text parser) run in threads made nicer than the event loop and the inference threads, so on a busy machine
the scheduler runs `/predict`'s threads first. Elsewhere the threads run at normal priority.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

BULK_NICE_INCREMENT = 10
"""How much nicer bulk threads are than the rest of the process (Linux nice values; 10: about a tenth of
the CPU share of a normal thread when both want it)."""


def lower_thread_priority(increment: int | None = None) -> None:
    """Make the calling thread ``increment`` nicer (default `BULK_NICE_INCREMENT`; a no-op where threads
    have no own nice value)."""
    increment = BULK_NICE_INCREMENT if increment is None else increment
    if not increment or not hasattr(os, "setpriority") or not hasattr(os, "PRIO_PROCESS"):
        return
    thread_id = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, os.getpriority(os.PRIO_PROCESS, thread_id) + increment)
    except OSError as err:  # not permitted here: run at normal priority
        logger.debug("cannot lower the priority of a bulk thread", extra={"error": str(err)})


class BulkExecutor:
    """A lazily started pool of low-priority threads (one process-wide pool per use)."""

    def __init__(self, max_workers: int, name: str) -> None:
        """Threads start on first use, not at import time."""
        self.max_workers = max_workers
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        """The pool (started on the first call)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_workers,
                    thread_name_prefix=self.name,
                    initializer=lower_thread_priority,
                )
            return self._pool
