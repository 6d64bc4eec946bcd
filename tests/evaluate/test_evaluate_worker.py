"""A streamed `/evaluate` runs in a worker process (`app.evaluate.worker`): niced, with its own session, gone
when its request ends however it ends; `/predict` is answered meanwhile; the answers are those of the
readers and the runner (the same report as a JSON body, the same 400 naming a row deep in the upload)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.evaluate.worker import PROCESS_NAME, WORKER_NICENESS
from app.main import create_app
from app.settings import Settings
from tests.factories import (
    CLASSIFIER_LABELS,
    copy_repository,
    csv_body,
    tabular_classifier,
    without_ids,
    write_model,
)

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2000, 4)).astype(np.float32)
Y = [CLASSIFIER_LABELS[i] for i in RNG.integers(0, 3, 2000)]
CSV = csv_body(X, Y)
HEAD, TAIL = CSV[: len(CSV) // 2], CSV[len(CSV) // 2 :]
WAIT_SECONDS = 60.0  # the first worker also starts the fork server: slow on a loaded machine


class Call:
    """One request to the app driven by hand: body pieces are given as the test goes on."""

    def __init__(self, app: FastAPI, path: str, query: bytes, media: bytes) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "query_string": query,
            "headers": [(b"content-type", media)],
        }
        self.task = asyncio.create_task(app(scope, self.messages.get, self._send))

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def give(self, body: bytes, *, more: bool) -> None:
        self.messages.put_nowait({"type": "http.request", "body": body, "more_body": more})

    def disconnect(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})

    async def answer(self) -> tuple[int, Any]:
        await asyncio.wait_for(self.task, WAIT_SECONDS)
        return self.sent[0]["status"], orjson.loads(self.sent[1]["body"])


def workers() -> list[multiprocessing.Process]:
    """This process's evaluation workers still running (`active_children` also reaps finished ones)."""
    return [child for child in multiprocessing.active_children() if child.name == PROCESS_NAME]


async def running_worker() -> int:
    """The pid of the one evaluation worker, once it has lowered its priority."""
    deadline = time.monotonic() + WAIT_SECONDS
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS)
    while time.monotonic() < deadline:
        found = workers()
        if found and found[0].pid is not None:
            pid = found[0].pid
            try:
                if os.getpriority(os.PRIO_PROCESS, pid) == expected:
                    return pid
            except ProcessLookupError:
                pass
        await asyncio.sleep(0.01)
    raise AssertionError("no niced evaluation worker appeared")


def exists(pid: int) -> bool:
    """Whether process `pid` exists (a zombie too: it has not been reaped)."""
    return Path(f"/proc/{pid}").exists()


async def gone(pid: int) -> bool:
    """Whether process `pid` has ended and been reaped (waits a while for it)."""
    deadline = time.monotonic() + 10
    while exists(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return not workers()


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with LifespanManager(app):
        yield app


def evaluate_csv(app: FastAPI) -> Call:
    return Call(app, "/evaluate", b"model=clf&version=2", b"text/csv")


def test_a_streamed_evaluation_runs_in_a_niced_worker_while_predict_is_answered(settings: Settings) -> None:
    async def scenario() -> None:
        async with serving(settings) as app:
            predict_body = orjson.dumps({"model": "clf", "version": 2, "inputs": X[:3].tolist()})
            before = Call(app, "/predict", b"", b"application/json")
            before.give(predict_body, more=False)
            expected_predictions = await before.answer()

            evaluation = evaluate_csv(app)
            evaluation.give(HEAD, more=True)
            pid = await running_worker()
            assert pid != os.getpid()
            # the upload is half sent and the worker waits for the rest: /predict is answered meanwhile
            during = Call(app, "/predict", b"", b"application/json")
            during.give(predict_body, more=False)
            status, answer = await during.answer()
            assert (status, without_ids(answer["predictions"])) == (
                expected_predictions[0],
                without_ids(expected_predictions[1]["predictions"]),
            )
            evaluation.give(TAIL, more=False)
            status, report = await evaluation.answer()
            assert status == 200, report
            assert await gone(pid)

            # the same rows as a JSON body (scored in this process) give the same report
            json_body = orjson.dumps({"model": "clf", "version": 2, "inputs": X.tolist(), "labels": Y})
            in_process = Call(app, "/evaluate", b"", b"application/json")
            in_process.give(json_body, more=False)
            assert await in_process.answer() == (200, report)
            assert report["n"] == len(Y)

    asyncio.run(scenario())


def test_a_client_gone_mid_upload_leaves_no_worker(settings: Settings) -> None:
    async def scenario() -> None:
        async with serving(settings) as app:
            evaluation = evaluate_csv(app)
            evaluation.give(HEAD, more=True)
            pid = await running_worker()
            evaluation.disconnect()
            await asyncio.wait_for(evaluation.task, WAIT_SECONDS)
            assert evaluation.sent == []  # nothing is sent to a client that went away
            assert await gone(pid)

    asyncio.run(scenario())


def test_a_cancelled_evaluation_leaves_no_worker(settings: Settings) -> None:
    async def scenario() -> None:
        async with serving(settings) as app:
            evaluation = evaluate_csv(app)
            evaluation.give(HEAD, more=True)
            pid = await running_worker()
            evaluation.task.cancel()  # as a server shutting down cancels the requests it still runs
            with pytest.raises(asyncio.CancelledError):
                await evaluation.task
            assert await gone(pid)

    asyncio.run(scenario())


def test_a_worker_that_dies_is_a_500(settings: Settings) -> None:
    async def scenario() -> None:
        async with serving(settings) as app:
            evaluation = evaluate_csv(app)
            evaluation.give(HEAD, more=True)
            os.kill(await running_worker(), signal.SIGKILL)
            evaluation.give(TAIL, more=False)
            status, body = await evaluation.answer()
            assert status == 500
            assert body["error"].startswith("internal server error")
            assert not workers()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=model_repository, access_log=False, served_versions=0)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _pieces(body: bytes, size: int = 50_000) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        ("x", "row 15000: column 'f2': 'x' is not a number"),
        ("nan", "row 15000: input 'features'[2]: NaN or Inf is not a valid input"),
    ],
)
def test_a_bad_row_deep_in_a_streamed_csv_is_named(client: TestClient, bad_value: str, message: str) -> None:
    x = RNG.normal(size=(20_000, 4)).round(3)
    lines = csv_body(x, [CLASSIFIER_LABELS[0]] * 20_000).decode().splitlines()
    fields = lines[15_000].split(",")  # line 0 is the header: line 15000 is row 15000
    fields[2] = bad_value
    lines[15_000] = ",".join(fields)
    body = ("\n".join(lines) + "\n").encode()
    response = client.post("/evaluate?model=clf", content=_pieces(body), headers={"content-type": "text/csv"})
    assert response.status_code == 400
    assert response.json() == {"error": message}
    assert not workers()


def test_a_version_changed_on_disk_is_not_evaluated(model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(model_repository, tmp_path / "models", ["clf"])
    settings = Settings(model_repository=repository, access_log=False, served_versions=0)
    with TestClient(create_app(settings)) as client:
        write_model(repository, "clf", 2, tabular_classifier(seed=99))  # the server still serves the old one
        response = client.post("/evaluate?model=clf", content=CSV, headers={"content-type": "text/csv"})
    assert response.status_code == 503
    assert response.json() == {"error": "model 'clf' version 2 changed on disk since it was loaded; retry"}
