"""Batching is invisible (hypothesis): requests submitted together through a real `Batcher` around a real
onnxruntime session each get what the same request gets when run alone through `session.run`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.batcher import Batcher
from app.repository import LoadedModel, load_model, scan_repository
from app.settings import Settings
from tests.factories import reference_outputs

MAX_BATCH_ROWS = 16
FEATURES = 4  # the `clf` fixture model's input width
CHANNELS = 2  # the `seq` fixture model's values per step
VALUES = st.floats(-10, 10, width=32)

Request = dict[str, np.ndarray]


@st.composite
def tabular_request(draw: st.DrawFn) -> Request:
    rows = draw(st.integers(1, MAX_BATCH_ROWS + 4))  # now and then more than a batch: it runs alone
    return {"features": draw(hnp.arrays(np.float32, (rows, FEATURES), elements=VALUES))}


@st.composite
def sequence_request(draw: st.DrawFn) -> Request:
    """Rows right-padded with zeros to the request's own longest row; the mask is true on real steps."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=MAX_BATCH_ROWS + 4))
    steps = max(lengths)
    sequence = draw(hnp.arrays(np.float32, (len(lengths), steps, CHANNELS), elements=VALUES))
    mask = np.arange(steps) < np.array(lengths)[:, None]
    return {"sequence": np.where(mask[:, :, None], sequence, np.float32(0)), "mask": mask}


REQUESTS = {"clf": tabular_request(), "seq": sequence_request()}


@pytest.fixture(scope="module")
def models(model_repository: Path) -> dict[str, LoadedModel]:
    server_settings = Settings(model_repository=model_repository, max_batch_rows=MAX_BATCH_ROWS)
    sources = {source.name: source for source in scan_repository(model_repository) if source.version == 1}
    return {name: load_model(sources[name], server_settings, ["CPUExecutionProvider"]) for name in REQUESTS}


def row_count(inputs: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(inputs.values())))


async def submit_together(model: LoadedModel, requests: list[Request]) -> tuple[list[Request], list[int]]:
    """Every request submitted at once; returns each one's answer and the row count of every model call."""
    calls: list[int] = []

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(row_count(inputs))
        return model.run(inputs)

    batcher = Batcher(
        run,
        max_batch_rows=MAX_BATCH_ROWS,
        max_delay_seconds=0.01,
        max_queue_rows=100_000,
        collate=model.collate,
        signature=model.batch_signature,
    )
    batcher.start()
    try:
        answers = await asyncio.gather(*(batcher.submit(r, row_count(r)) for r in requests))
    finally:
        await batcher.stop()
    return answers, calls


@pytest.mark.parametrize("name", list(REQUESTS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_each_answer_in_a_batch_equals_the_request_run_alone(
    models: dict[str, LoadedModel], model_repository: Path, name: str, data: st.DataObject
) -> None:
    requests = data.draw(st.lists(REQUESTS[name], min_size=1, max_size=8), label="requests")
    answers, calls = asyncio.run(submit_together(models[name], requests))

    for request, answer in zip(requests, answers, strict=True):
        alone = reference_outputs(model_repository, name, 1, request)
        assert answer.keys() == alone.keys()
        np.testing.assert_array_equal(answer["label_index"], alone["label_index"])
        np.testing.assert_allclose(answer["probabilities"], alone["probabilities"], rtol=1e-5, atol=1e-6)
    assert sum(calls) == sum(map(row_count, requests))
    # All requests queue before the idle worker wakes, so the first call takes as many as fit: the
    # property is checked on real shared batches, not only on requests that each ran alone.
    if len(requests) > 1 and row_count(requests[0]) + row_count(requests[1]) <= MAX_BATCH_ROWS:
        assert len(calls) < len(requests)
