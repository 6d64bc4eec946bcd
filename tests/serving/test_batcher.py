"""Batcher rules without timing flakiness: huge delays so only size can flush, a threading.Event that holds
a batch in flight (the model runs in a worker thread), and upper-bound waits only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from app.batcher import Batcher
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded

HUGE = 1000.0  # seconds: a delay that never expires during a test
WAIT = 5.0  # seconds: upper bound for anything that must happen "now"


class Model:
    """A fake model: doubles `x`, records every batch, can be held in flight and can fail on a poison row."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.poison: float | None = None
        self.drop_a_row = False

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batches.append(x.copy())
        self.started.set()
        assert self.gate.wait(WAIT), "test left a batch held"
        if self.poison is not None and (x == self.poison).any():
            raise RuntimeError("poisoned batch")
        out = x * 2
        return {"y": out[:-1] if self.drop_a_row else out}

    def hold(self) -> None:
        self.gate.clear()
        self.started.clear()

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, WAIT)

    def release(self) -> None:
        self.gate.set()

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def rows(n: int, start: float = 0.0, width: int = 1) -> dict[str, np.ndarray]:
    return {"x": (start + np.arange(n * width, dtype=np.float32)).reshape(n, width)}


def stack(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The fake model's collate: its one input stacked along the batch axis."""
    return {"x": np.concatenate([part["x"] for part in parts])}


def row_width(inputs: Mapping[str, np.ndarray]) -> Hashable:
    """The fake model's batch signature: rows of different widths cannot share a call."""
    return inputs["x"].shape[1]


def run(test: Callable[[Model], Awaitable[Any]]) -> None:
    asyncio.run(asyncio.wait_for(test(Model()), 30))


def make(model: Model, **kwargs: Any) -> Batcher:
    options: dict[str, Any] = {
        "max_batch_rows": 4,
        "max_delay_seconds": HUGE,
        "max_queue_rows": 100,
        "collate": stack,
        "signature": row_width,
    }
    options.update(kwargs)
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


async def queued(batcher: Batcher, expected_rows: int) -> None:
    """Let submissions reach the queue (they are tasks): wait until it holds `expected_rows`."""
    async with asyncio.timeout(WAIT):
        while batcher.queued_rows != expected_rows:  # noqa: ASYNC110 (polls the batcher's own state)
            await asyncio.sleep(0)


async def submit(batcher: Batcher, inputs: dict[str, np.ndarray], **kwargs: Any) -> asyncio.Task[Any]:
    return asyncio.create_task(batcher.submit(inputs, len(inputs["x"]), **kwargs))


def test_idle_request_runs_at_once_despite_a_huge_delay() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        result = await asyncio.wait_for(batcher.submit(rows(3), 3), WAIT)
        np.testing.assert_array_equal(result["y"], rows(3)["x"] * 2)
        assert model.sizes == [3]
        await batcher.stop()

    run(body)


def test_size_only_flush_and_exact_split() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.hold()
        first = await submit(batcher, rows(1, 100))
        await model.wait_started()
        # While the model is busy, 3 rows wait: with a huge delay only a full batch may flush.
        waiting = [await submit(batcher, rows(1, 10)), await submit(batcher, rows(2, 20))]
        await queued(batcher, 3)
        model.release()
        await first
        await asyncio.sleep(0.05)
        assert model.sizes == [1], "flushed before the batch was full"
        waiting.append(await submit(batcher, rows(1, 30)))  # the fourth row fills the batch
        results = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
        assert model.sizes == [1, 4]
        for result, expected in zip(results, [rows(1, 10), rows(2, 20), rows(1, 30)], strict=True):
            np.testing.assert_array_equal(result["y"], expected["x"] * 2)
        await batcher.stop()

    run(body)


def test_requests_with_different_signatures_never_share_a_batch() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, max_delay_seconds=0.0)  # whatever waits runs as soon as the model is free
        model.hold()
        first = await submit(batcher, rows(1, 100))
        await model.wait_started()
        requests = [rows(1, 10), rows(1, 20, width=2), rows(1, 30), rows(1, 40)]
        waiting = [await submit(batcher, inputs) for inputs in requests]
        await queued(batcher, 4)
        model.release()
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), WAIT)
        # In arrival order: the wide row ends the first batch and runs alone; the narrow rows after it
        # share the next one.
        assert [batch.shape for batch in model.batches] == [(1, 1), (1, 1), (1, 2), (2, 1)]
        for result, inputs in zip(results[1:], requests, strict=True):
            np.testing.assert_array_equal(result["y"], inputs["x"] * 2)
        await batcher.stop()

    run(body)


def test_flush_waits_the_full_delay_from_the_oldest_request() -> None:
    delay = 0.05

    async def body(model: Model) -> None:
        loop = asyncio.get_running_loop()
        batcher = make(model, max_delay_seconds=delay)
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        enqueued = loop.time()
        second = await submit(batcher, rows(1))
        await queued(batcher, 1)
        model.release()
        await first
        await asyncio.wait_for(second, WAIT)
        assert loop.time() - enqueued >= delay  # never early (MLServer #1936)
        assert model.sizes == [1, 1]
        await batcher.stop()

    run(body)


def test_cancelled_waiter_is_skipped_and_frees_its_rows() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        gone = await submit(batcher, rows(2, 50))
        stays = await submit(batcher, rows(1, 60))
        await queued(batcher, 3)
        gone.cancel()
        await queued(batcher, 1)
        stays_more = await submit(batcher, rows(3, 70))  # 1 + 3 rows: a full batch without the cancelled one
        model.release()
        await first
        result = await asyncio.wait_for(stays, WAIT)
        await asyncio.wait_for(stays_more, WAIT)
        np.testing.assert_array_equal(result["y"], rows(1, 60)["x"] * 2)
        assert model.sizes == [1, 4]
        assert not (model.batches[1] == 50).any()
        assert gone.cancelled()
        assert batcher.queued_rows == 0
        await batcher.stop()

    run(body)


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.poison = -1.0
        model.hold()
        first = await submit(batcher, rows(1, 5))
        await model.wait_started()
        bad = await submit(batcher, {"x": np.array([[-1.0]], dtype=np.float32)})
        neighbour = await submit(batcher, rows(3, 7))
        await queued(batcher, 4)
        model.release()
        np.testing.assert_array_equal((await first)["y"], rows(1, 5)["x"] * 2)
        outcomes = await asyncio.wait_for(asyncio.gather(bad, neighbour, return_exceptions=True), WAIT)
        assert all(isinstance(o, InferenceFailed) for o in outcomes)
        assert outcomes[0] is not outcomes[1]  # one error object per waiter
        after = await asyncio.wait_for(batcher.submit(rows(2, 9), 2), WAIT)  # the batcher keeps serving
        np.testing.assert_array_equal(after["y"], rows(2, 9)["x"] * 2)
        await batcher.stop()

    run(body)


def test_output_row_count_mismatch_fails_the_batch() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.drop_a_row = True
        with pytest.raises(InferenceFailed, match="for a batch of 2 rows"):
            await asyncio.wait_for(batcher.submit(rows(2), 2), WAIT)
        await batcher.stop()

    run(body)


def test_oversized_request_runs_alone_and_no_batch_exceeds_the_limit() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, max_delay_seconds=0.0)
        alone = await asyncio.wait_for(batcher.submit(rows(10), 10), WAIT)
        assert len(alone["y"]) == 10
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        tasks = [await submit(batcher, rows(n, 100 * n)) for n in (2, 10, 1, 3, 2)]
        await queued(batcher, 18)
        model.release()
        await first
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert [len(r["y"]) for r in results] == [2, 10, 1, 3, 2]
        assert model.sizes[:2] == [10, 1]
        assert all(size <= 4 for size in model.sizes[2:] if size != 10)
        assert 10 in model.sizes[2:]
        assert sum(model.sizes[2:]) == 18
        await batcher.stop()

    run(body)


def test_full_queue_raises_overloaded_and_the_queue_recovers() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, max_queue_rows=3, max_delay_seconds=0.0)
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        waiting = await submit(batcher, rows(2))
        await queued(batcher, 2)
        with pytest.raises(Overloaded) as excinfo:
            await batcher.submit(rows(2), 2)
        assert excinfo.value.retry_after_seconds >= 1
        model.release()
        await first
        assert len((await asyncio.wait_for(waiting, WAIT))["y"]) == 2
        assert len((await asyncio.wait_for(batcher.submit(rows(3), 3), WAIT))["y"]) == 3
        await batcher.stop()

    run(body)


def test_queue_deadline_raises_deadline_exceeded() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, queue_timeout_seconds=0.05)
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(batcher.submit(rows(1), 1), WAIT)
        assert batcher.queued_rows == 0
        model.release()
        await first
        await batcher.stop()

    run(body)


def test_each_queued_request_expires_at_its_own_deadline() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, queue_timeout_seconds=1.0)
        model.hold()
        held = await submit(batcher, rows(1))
        await model.wait_started()
        loop = asyncio.get_running_loop()
        first_queued = loop.time()
        first = await submit(batcher, rows(1))
        await asyncio.sleep(0.5)
        second = await submit(batcher, rows(1))
        await queued(batcher, 2)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(first, WAIT)
        assert loop.time() - first_queued >= 0.99  # not before its deadline (timers may fire a hair early)
        assert not second.done()  # queued half a second later: still inside its own deadline
        assert batcher.queued_rows == 1
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(second, WAIT)
        assert batcher.queued_rows == 0
        model.release()
        await held
        await batcher.stop()

    run(body)


def test_a_short_client_deadline_expires_in_the_queue_and_never_runs() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, queue_timeout_seconds=HUGE, max_delay_seconds=0.0)
        model.hold()
        held = await submit(batcher, rows(1))
        await model.wait_started()
        patient = await submit(batcher, rows(1, start=10.0), deadline_seconds=HUGE)
        hasty = await submit(batcher, rows(1, start=20.0), deadline_seconds=0.05)
        await queued(batcher, 2)
        with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.05 s"):
            await asyncio.wait_for(hasty, WAIT)
        assert not patient.done()
        assert batcher.queued_rows == 1
        model.release()
        await held
        assert (await asyncio.wait_for(patient, WAIT))["y"].tolist() == [[20.0]]
        assert not any((batch >= 20.0).any() for batch in model.batches)  # its rows never reached the model
        await batcher.stop()

    run(body)


def test_mixed_deadlines_expire_in_deadline_order_not_arrival_order() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, queue_timeout_seconds=HUGE, max_delay_seconds=0.0)
        model.hold()
        held = await submit(batcher, rows(1))
        await model.wait_started()
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        late = await submit(batcher, rows(1, start=10.0), deadline_seconds=0.6)
        early = await submit(batcher, rows(1, start=20.0), deadline_seconds=0.1)
        capped = await submit(batcher, rows(1, start=30.0))  # only the huge cap: never expires here
        await queued(batcher, 3)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(early, WAIT)
        assert not late.done()  # queued first, but its deadline is later
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late, WAIT)
        assert loop.time() - queued_at >= 0.59  # not before its own deadline (timers may fire a hair early)
        assert not capped.done()
        assert batcher.queued_rows == 1
        model.release()
        await held
        assert (await asyncio.wait_for(capped, WAIT))["y"].tolist() == [[60.0]]
        assert [batch.tolist() for batch in model.batches] == [[[0.0]], [[30.0]]]
        await batcher.stop()

    run(body)


def test_the_queue_timeout_caps_a_longer_client_deadline() -> None:
    async def body(model: Model) -> None:
        batcher = make(model, queue_timeout_seconds=0.05)
        model.hold()
        held = await submit(batcher, rows(1))
        await model.wait_started()
        with pytest.raises(DeadlineExceeded, match=r"waited 0\.05 s"):
            await asyncio.wait_for(batcher.submit(rows(1), 1, deadline_seconds=HUGE), WAIT)
        model.release()
        await held
        await batcher.stop()

    run(body)


def test_stop_answers_waiting_requests_with_not_ready() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.hold()
        first = await submit(batcher, rows(1))
        await model.wait_started()
        waiting = await submit(batcher, rows(1))
        await queued(batcher, 1)
        stopping = asyncio.create_task(batcher.stop())
        outcomes = await asyncio.wait_for(asyncio.gather(first, waiting, return_exceptions=True), WAIT)
        model.release()
        await stopping
        assert all(isinstance(o, NotReady) for o in outcomes)
        with pytest.raises(NotReady):
            await batcher.submit(rows(1), 1)

    run(body)
