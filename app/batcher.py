"""Dynamic batching for one model: concurrent requests share one onnxruntime call.

The rules (each is tested in `tests/serving/test_batcher.py`):

* Rows are counted, not requests. A batch holds at most `max_batch_rows` rows, except that a single
  request larger than that still runs, alone. Requests are never split.
* One batch runs at a time per model, in a thread (onnxruntime releases the GIL), never on the event loop.
* A request that arrives while the model is idle runs at once: no added latency at low load.
* Requests batch together only when their signatures are equal (the model says which can share a call),
  and a batch's inputs are stacked by the model's own collate.
* Requests that arrive while a batch runs wait for the next one, which starts when it has `max_batch_rows`
  rows or when its oldest request has waited `max_delay_seconds` (measured with the loop's monotonic clock,
  and re-checked after every wake-up so an early timer cannot flush early).
* The queue is bounded: a request that would exceed `max_queue_rows` raises `Overloaded` (503 +
  Retry-After); one still queued at its deadline raises `DeadlineExceeded` (504) and never runs. The
  deadline is the client's own (`deadline_seconds`) capped by `queue_timeout_seconds`; one timer, kept on
  the earliest pending deadline (a heap, since mixed deadlines do not follow arrival order), expires them.
* Outputs are split back per request after checking that every output has one row per input row. A batch
  that fails fails only its own requests. Callers that went away are skipped; results are only set on
  futures that are not done yet.
* Two ways to end: `stop()` (shutdown) answers whatever waits with `NotReady` at once; `close()` (a model
  version being retired) refuses new requests and returns once every queued and running one has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from app.errors import DeadlineExceeded, InferenceFailed, ModelServeError, NotReady, Overloaded
from app.observability import ModelPrometheusMetrics

logger = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RunBatch = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
Collate = Callable[[Sequence[Mapping[str, np.ndarray]]], Mapping[str, np.ndarray]]
Signature = Callable[[Mapping[str, np.ndarray]], Hashable]


def split_rows(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[Tensors]:
    """Cut every output back into one piece per request (`rows[i]` rows for request i).

    Raises:
        InferenceFailed: an output whose first axis is not the batch's total row count.
    """
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise InferenceFailed(
                f"output {name!r} has shape {list(value.shape)} for a batch of {total} rows"
            )
    if len(rows) == 1:
        return [dict(outputs)]
    pieces = []
    start = 0
    for count in rows:
        stop = start + count
        pieces.append({name: value[start:stop] for name, value in outputs.items()})
        start = stop
    return pieces


@dataclass(eq=False, slots=True)
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    signature: Hashable
    future: asyncio.Future[Tensors]
    enqueued_at: float
    wait_limit: float  # seconds it may stay queued before it fails
    queued: bool = True  # false once taken into a batch, expired, or abandoned by its caller


class Batcher:
    """The queue and the worker task of one model.

    Use `start()` inside a running loop, `await submit(...)` from request handlers, `await stop()` at
    shutdown (fails whatever still waits with `NotReady`) or `await close()` to drain it gracefully.
    """

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_rows: int,
        max_delay_seconds: float,
        max_queue_rows: int,
        collate: Collate,
        signature: Signature,
        queue_timeout_seconds: float = 30.0,
        retry_after_seconds: float = 1.0,
        executor: Executor | None = None,
        metrics: ModelPrometheusMetrics | None = None,
        name: str = "model",
    ) -> None:
        """Configure a batcher.

        Args:
            run: blocking call of the model on one batch (runs in `executor`).
            max_batch_rows: most rows per call (a larger single request runs alone).
            max_delay_seconds: longest the oldest waiting request waits for more rows once the model is free.
            max_queue_rows: rows that may wait; more raises `Overloaded`.
            collate: stacks the inputs of several requests into one batch.
            signature: requests batch together only when their signatures are equal.
            queue_timeout_seconds: longest a request may wait before `DeadlineExceeded`.
            retry_after_seconds: the `Retry-After` hint carried by `Overloaded` and `NotReady`.
            executor: where `run` executes (the loop's default executor when None).
            metrics: the model's bound metrics (queue time, inference time, batch rows, queue rows).
            name: the model's name, for logs.
        """
        self._run = run
        self.max_batch_rows = max_batch_rows
        self.max_delay_seconds = max_delay_seconds
        self.max_queue_rows = max_queue_rows
        self.queue_timeout_seconds = queue_timeout_seconds
        self.retry_after_seconds = retry_after_seconds
        self._collate = collate
        self._signature = signature
        self._executor = executor
        self._metrics = metrics
        self.name = name
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()  # set on every submission: wakes an idle or waiting worker
        self._in_flight: list[_Request] = []
        # Deadlines, earliest first (`(deadline, arrival number, request)`), and one timer for
        # the earliest. Entries of requests that left the queue are dropped lazily from the top.
        self._deadlines: list[tuple[float, int, _Request]] = []
        self._arrivals = itertools.count()
        self._expiry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._refusal = ""  # the `NotReady` message once stopped or closed
        self._active_at = 0.0  # loop time of the last submission or finished batch

    @property
    def queued_rows(self) -> int:
        """Rows waiting."""
        return self._queued_rows

    def idle_seconds(self) -> float:
        """Seconds since the last submission or finished batch; 0 while rows wait or a batch runs."""
        if self.queued_rows or self._in_flight:
            return 0.0
        return asyncio.get_running_loop().time() - self._active_at

    def start(self) -> None:
        """Start the worker task on the running loop (the reference is kept, so it is never collected)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher:{self.name}")
            self._task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Never expected: every batch's errors are caught. Say so loudly rather than hang callers.
            logger.critical("batcher worker died", exc_info=task.exception(), extra={"model": self.name})

    async def close(self, refusal: str) -> None:
        """Refuse new requests (`NotReady` with `refusal`), let every queued and running one finish, then end
        the worker."""
        self._closed, self._refusal = True, refusal
        self._arrived.set()  # a waiting worker runs what is queued now; an idle one ends
        if self._task is not None:
            await asyncio.wait({self._task})  # not `await task`: a `stop()` meanwhile cancels the task
            self._task = None
        self._cancel_expiry()  # the queue is empty; a pending timer would keep this batcher (and model) alive

    async def stop(self) -> None:
        """Stop the worker and answer every waiting or running request with `NotReady`."""
        self._closed, self._refusal = True, "the server is shutting down"
        self._cancel_expiry()
        in_flight = list(self._in_flight)  # the worker clears its list when cancelled
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request in [*in_flight, *self._queue]:
            self._dequeue(request)
            if not request.future.done():
                request.future.set_exception(NotReady(self._refusal, self.retry_after_seconds))
        self._queue.clear()
        self._deadlines.clear()
        self._in_flight = []
        self._report_queue()

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        *,
        deadline_seconds: float | None = None,
    ) -> Tensors:
        """Queue one request's rows and wait for its own outputs.

        Args:
            inputs: validated arrays, all with `rows` rows.
            rows: number of rows (the batch axis length).
            deadline_seconds: the client's own limit on queueing, capped by `queue_timeout_seconds`; None
                for that cap alone.

        Raises:
            Overloaded: the queue is full.
            DeadlineExceeded: still queued at its deadline; it never runs.
            NotReady: the batcher is stopped or closed.
            InferenceFailed: the batch this request ran in failed.
        """
        if self._closed:
            raise NotReady(self._refusal, self.retry_after_seconds)
        if self._queued_rows and self._queued_rows + rows > self.max_queue_rows:
            hint = "retry later" if rows <= self.max_queue_rows else "send fewer rows per request"
            raise Overloaded(
                f"model {self.name!r} has {self._queued_rows} rows queued and the limit is "
                f"{self.max_queue_rows}; {hint}",
                self.retry_after_seconds,
            )
        loop = asyncio.get_running_loop()
        wait_limit = self.queue_timeout_seconds
        if deadline_seconds is not None:
            wait_limit = min(wait_limit, deadline_seconds)
        request = _Request(
            inputs, rows, self._signature(inputs), loop.create_future(), loop.time(), wait_limit
        )
        self._active_at = request.enqueued_at
        self._queue.append(request)
        self._queued_rows += rows
        deadline = request.enqueued_at + request.wait_limit
        heapq.heappush(self._deadlines, (deadline, next(self._arrivals), request))
        if self._expiry is None or deadline < self._expiry.when():
            self._arm_expiry(loop)
        self._report_queue()
        self._arrived.set()
        try:
            return await request.future
        finally:
            # The caller went away (cancelled) while queued: give its rows back to the queue bound.
            if request.queued:
                self._dequeue(request)
                self._report_queue()

    # ------------------------------------------------------------------------------------------ internals
    def _dequeue(self, request: _Request) -> None:
        """Take a request's rows out of the queue bound (its caller reports the queue once it is done)."""
        if not request.queued:
            return
        request.queued = False
        self._queued_rows -= request.rows

    def _report_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_rows.set(self.queued_rows)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _drop_left_deadlines(self) -> None:
        """Drop the deadlines of requests that left the queue from the top of the heap."""
        deadlines = self._deadlines
        while deadlines and not deadlines[0][2].queued:
            heapq.heappop(deadlines)

    def _arm_expiry(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set the timer on the earliest pending deadline (none when nothing waits)."""
        self._cancel_expiry()
        self._drop_left_deadlines()
        if self._deadlines:
            deadline = self._deadlines[0][0]
            self._expiry = loop.call_at(deadline, self._expire, deadline)

    def _expire(self, due: float) -> None:
        """Fail the requests whose deadline is `due` or past, then wait for the next deadline."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        due = max(due, loop.time())  # a timer may fire a hair early: what it was set for is due
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= due:
            request = heapq.heappop(deadlines)[2]
            if request.queued:
                self._dequeue(request)  # left in its queue, unqueued: `_take` skips it
                if not request.future.done():
                    request.future.set_exception(self._deadline_error(request))
        self._arm_expiry(loop)
        self._report_queue()

    def _deadline_error(self, request: _Request) -> DeadlineExceeded:
        if request.wait_limit < self.queue_timeout_seconds:
            return DeadlineExceeded(
                f"the request's deadline of {request.wait_limit:g} s passed while it waited in the queue "
                f"of model {self.name!r}"
            )
        return DeadlineExceeded(
            f"waited {self.queue_timeout_seconds:g} s in the queue of model {self.name!r}; "
            "the server is overloaded"
        )

    def _oldest(self) -> _Request | None:
        """The oldest request still queued (dropping abandoned ones from the front)."""
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        return queue[0] if queue else None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._oldest() is None:
                if self._closed:
                    return  # closed and drained
                # Idle: the next request runs as soon as it arrives.
                self._arrived.clear()
                await self._arrived.wait()
            else:
                # Requests queued while the last batch ran: wait for a full batch or the oldest's deadline.
                await self._wait_for_batch(loop)
            batch = self._take()
            self._drop_left_deadlines()  # the batch's own deadlines, usually the earliest ones
            if not self._deadlines:
                self._cancel_expiry()  # nothing left to expire: no timer keeps this batcher alive
            self._report_queue()
            if batch:
                await self._execute(batch, loop)

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.queued_rows < self.max_batch_rows and not self._closed:  # closed: no more rows will come
            oldest = self._oldest()
            if oldest is None:
                return
            remaining = oldest.enqueued_at + self.max_delay_seconds - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[_Request]:
        """Form the next batch (FIFO)."""
        batch: list[_Request] = []
        rows = 0
        signature: Hashable = None
        queue = self._queue
        while queue:
            request = queue[0]
            if not request.queued or request.future.done():
                queue.popleft()
                self._dequeue(request)
                continue
            if batch and (rows + request.rows > self.max_batch_rows or request.signature != signature):
                break
            queue.popleft()
            self._dequeue(request)
            batch.append(request)
            rows += request.rows
            signature = request.signature
            if rows >= self.max_batch_rows:
                break
        return batch

    async def _execute(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if self._metrics is not None:
            for request in batch:
                self._metrics.queued(now - request.enqueued_at)
        rows = [request.rows for request in batch]
        self._in_flight = batch
        seconds = 0.0
        try:
            inputs = batch[0].inputs if len(batch) == 1 else self._collate([r.inputs for r in batch])
            outputs, seconds = await loop.run_in_executor(self._executor, self._timed_run, inputs)
            pieces = split_rows(outputs, rows)
        except Exception as err:
            logger.error(
                "a batch failed",
                exc_info=err,
                extra={"model": self.name, "batch_rows": sum(rows), "requests": len(batch)},
            )
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(self._failure(err, sum(rows)))
            return
        finally:
            self._in_flight = []
            self._active_at = loop.time()
            if self._metrics is not None:
                self._metrics.ran(seconds, sum(rows))
        for request, piece in zip(batch, pieces, strict=True):
            if not request.future.done():
                request.future.set_result(piece)

    def _timed_run(self, inputs: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], float]:
        """The model call and its duration, measured in the inference thread (no queueing for the thread)."""
        started = time.perf_counter()
        outputs = self._run(inputs)
        return outputs, time.perf_counter() - started

    @staticmethod
    def _failure(err: Exception, rows: int) -> ModelServeError:
        """A fresh error per waiter (one exception object must not be raised in several tasks)."""
        if isinstance(err, ModelServeError):
            failure = type(err)(err.message)
        else:
            failure = InferenceFailed(f"inference failed on a batch of {rows} rows: {type(err).__name__}")
        failure.__cause__ = err
        return failure
