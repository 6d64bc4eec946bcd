"""`Batcher.close()`: a retiring model version refuses new requests but finishes what it was given."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.errors import NotReady
from tests.serving.test_batcher import WAIT, Model, make, queued, rows, run, submit

REFUSAL = "version 1 was retired"


def test_close_finishes_running_and_queued_requests_and_refuses_new_ones() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)  # a huge batch delay: only the close can flush the queued rows
        model.hold()
        running = await submit(batcher, rows(1, 0))
        await model.wait_started()
        waiting = [await submit(batcher, rows(1, 10)), await submit(batcher, rows(2, 20))]
        await queued(batcher, 3)
        assert batcher.idle_seconds() == 0.0
        closing = asyncio.create_task(batcher.close(REFUSAL))
        await asyncio.sleep(0)
        with pytest.raises(NotReady, match=REFUSAL):
            await batcher.submit(rows(1), 1)
        assert not closing.done()  # the held batch and the queued rows are not finished yet
        model.release()
        results = await asyncio.wait_for(asyncio.gather(running, *waiting), WAIT)
        await asyncio.wait_for(closing, WAIT)
        for result, start, n in zip(results, (0, 10, 20), (1, 1, 2), strict=True):
            np.testing.assert_array_equal(result["y"], rows(n, start)["x"] * 2)
        assert model.sizes == [1, 3]  # the queued rows ran as one batch once the close flushed them

    run(body)


def test_close_of_an_idle_batcher_returns_at_once() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        await asyncio.wait_for(batcher.submit(rows(1), 1), WAIT)
        await asyncio.sleep(0.05)
        assert batcher.idle_seconds() >= 0.05
        await asyncio.wait_for(batcher.close(REFUSAL), WAIT)
        with pytest.raises(NotReady, match=REFUSAL):
            await batcher.submit(rows(1), 1)

    run(body)


def test_stop_during_a_close_answers_what_still_waits() -> None:
    async def body(model: Model) -> None:
        batcher = make(model)
        model.hold()
        running = await submit(batcher, rows(1))
        await model.wait_started()
        closing = asyncio.create_task(batcher.close(REFUSAL))
        await asyncio.sleep(0)
        await batcher.stop()  # shutdown overtakes the graceful close
        with pytest.raises(NotReady, match="shutting down"):
            await asyncio.wait_for(running, WAIT)
        await asyncio.wait_for(closing, WAIT)
        model.release()

    run(body)
