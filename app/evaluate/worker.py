"""The process that scores a streamed `/evaluate` upload, away from the serving process's event loop.

Each streamed evaluation runs in a process of its own, forked by multiprocessing's fork server: a process
that serves nothing and has this module (numpy, onnxruntime, the readers) imported, so a worker starts in
milliseconds and the serving process, with its threads and sessions, is never forked. The
worker makes itself as nice as it can be (`WORKER_NICENESS`), loads the model version the request
resolved into its own onnxruntime session (one thread per operator), and reads the upload from a pipe
that the event loop fills as the body arrives: the pipe's buffer is the back-pressure. It parses,
validates, infers and counts with the readers and the runner (the CLI's local mode runs the same code),
then writes back the report or the error, and exits. `EvaluationWorker` is the serving process's side:
it kills the worker when the request ends early (client gone, shutdown), so none outlives its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import sys
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from app.errors import ModelServeError, NotReady
from app.evaluate.readers import ByteStream, EvaluationOptions, Schema, StreamFormat, stream_chunks
from app.evaluate.readers.common import DEFAULT_CHUNK_ROWS
from app.evaluate.runner import direct_infer, evaluate
from app.repository import LoadedModel, ModelLoadError, ModelSource, load_model
from app.settings import Settings

WORKER_NICENESS = 19
"""How much nicer than the server a worker makes itself (19: the lowest priority), so that `/predict` gets
the CPU first whenever both want it."""
MAX_NPZ_UPLOAD_BYTES = 4 * 1024**3
"""Largest NPZ upload (a zip needs random access, so it is spooled to a temporary file: the temporary
directory must have room for it). Text formats are never stored, so they have no limit."""
PIECE_ROWS = 512
"""Rows per onnxruntime call, one call at a time: a session's memory grows with its largest batch (4096 rows
of the shipped digits CNN take ~100 MB more than 512), and larger calls are not faster."""
READ_BYTES = 1 << 16
"""Most bytes a worker takes from the upload pipe at once (a pipe's buffer holds 64 KiB)."""
PROCESS_NAME = "modelserve-evaluate"


@dataclass(frozen=True)
class EvaluationJob:
    """What a worker needs to score one upload (pickled to it)."""

    source: ModelSource
    """The version the request resolved."""
    sha256: str
    """Its graph's sha256 as the server loaded it: the worker refuses a graph that changed since."""
    providers: list[str]
    """The execution providers the server's session uses."""
    settings: Settings
    """The server's settings, for loading the model."""
    fmt: StreamFormat
    label_column: str | None
    options: EvaluationOptions


def _context() -> Any:
    """multiprocessing's fork server, preloaded with this module and the server's main module.

    multiprocessing runs the parent's main module again in each child it starts (as ``__mp_main__``; so
    a program that serves the app must guard its own start with ``if __name__ == "__main__":``); what the
    fork server imported already costs a worker nothing.
    """
    preload = [__name__, "__main__"]  # "__main__": a main module run from its path (console scripts)
    main_name = getattr(sys.modules["__main__"].__spec__, "name", None)  # one run with `python -m`
    if main_name is not None and not main_name.endswith("__main__"):
        preload.append(main_name)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    return context


class EvaluationWorker:
    """One worker process and its two pipes, seen from the event loop: `send` the upload, `finish`, then
    `answer`; leaving the ``async with`` block kills a worker that is still running."""

    def __init__(self, job: EvaluationJob) -> None:
        """Prepare the process and its pipes (entering the ``async with`` block starts it)."""
        context = _context()
        self._upload_end, upload = context.Pipe(duplex=False)
        answer, self._answer_end = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_work, args=(job, self._upload_end, self._answer_end), name=PROCESS_NAME, daemon=True
        )
        self._upload: int | None = _fd_of(upload)
        self._answer = _fd_of(answer)
        os.set_blocking(self._upload, False)
        os.set_blocking(self._answer, False)

    async def __aenter__(self) -> EvaluationWorker:
        """Start the worker: the fork server forks it (a few milliseconds; the first evaluation starts the
        fork server itself, about a second, in a thread)."""
        try:
            await asyncio.to_thread(forkserver.ensure_running)
            self.process.start()
        except BaseException:
            self._close_pipes()
            raise
        finally:
            # The worker holds its own copies now: EOF on either pipe means the other side is done.
            self._upload_end.close()
            self._answer_end.close()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Kill the worker if it still runs (it has answered, or nobody waits for its answer), wait for its
        end, close the pipes."""
        try:
            if self.process.is_alive():
                self.process.kill()
            await _readable(self.process.sentinel)
            self.process.join()
            self.process.close()
        finally:
            self._close_pipes()

    async def send(self, data: bytes) -> bool:
        """Write ``data`` into the upload pipe, waiting while the pipe is full; False once the worker has
        stopped reading (it has its answer: an error)."""
        assert self._upload is not None
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._upload, view) :]
            except BlockingIOError:
                await _writable(self._upload)
            except BrokenPipeError:
                return False
        return True

    def finish(self) -> None:
        """End of the upload: the worker reads EOF."""
        self._close_upload()

    async def answer(self) -> dict[str, Any]:
        """The report, once the worker has written it.

        Raises:
            ModelServeError: the evaluation's error (e.g. `InvalidInput` naming the row).
            RuntimeError: the worker failed unexpectedly or died.
        """
        parts = []
        while True:
            try:
                part = os.read(self._answer, 1 << 20)
            except BlockingIOError:
                await _readable(self._answer)
                continue
            if not part:
                break
            parts.append(part)
        if not parts:
            await _readable(self.process.sentinel)
            raise RuntimeError(
                f"the evaluation worker exited with code {self.process.exitcode} and no answer"
            )
        kind, value = pickle.loads(b"".join(parts))  # noqa: S301 (written by our own worker process)
        if kind == "report":
            report: dict[str, Any] = value
            return report
        if kind == "error":
            raise value
        raise RuntimeError(f"the evaluation worker failed:\n{value}")

    def _close_upload(self) -> None:
        if self._upload is not None:
            os.close(self._upload)
            self._upload = None

    def _close_pipes(self) -> None:
        self._close_upload()
        os.close(self._answer)


async def evaluate_upload(job: EvaluationJob, body: AsyncIterator[bytes]) -> dict[str, Any]:
    """Score a streamed upload in a worker process: ``body`` goes into its pipe as it arrives.

    Raises:
        ModelServeError: the evaluation's error (the same as the readers and the runner raise).
        Whatever ``body`` raises (e.g. `ClientDisconnected`): the worker is killed first.
    """
    async with EvaluationWorker(job) as worker:
        async for piece in body:
            if not await worker.send(piece):
                break  # the worker stopped early: its answer says why
        worker.finish()
        return await worker.answer()


def _fd_of(end: Connection) -> int:
    """The pipe's file descriptor, for raw reads and writes (the connection object is closed)."""
    fd = os.dup(end.fileno())
    end.close()
    return fd


async def _wait_for(register: Any, unregister: Any, fd: int) -> None:
    ready = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    register(fd, wake)
    try:
        await ready
    finally:
        unregister(fd)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    await _wait_for(loop.add_reader, loop.remove_reader, fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    await _wait_for(loop.add_writer, loop.remove_writer, fd)


# ---------------------------------------------------------------------------------- in the worker process
def _work(job: EvaluationJob, upload: Connection, answer: Connection) -> None:
    """The worker's main: score the upload, write ``(kind, value)`` pickled to the answer pipe, exit."""
    os.nice(WORKER_NICENESS)
    upload_fd = _fd_of(upload)
    outcome: tuple[str, Any]
    try:
        outcome = ("report", asyncio.run(_score(job, upload_fd)))
    except ModelServeError as err:
        outcome = ("error", err)
    except Exception:
        outcome = ("failure", traceback.format_exc())
    finally:
        os.close(upload_fd)  # the server's next write fails: it stops sending and reads the answer
    data = pickle.dumps(outcome)
    with contextlib.suppress(BrokenPipeError), open(_fd_of(answer), "wb") as out:
        out.write(data)  # a broken pipe: the server went away, nobody waits for this answer


async def _score(job: EvaluationJob, upload: int) -> dict[str, Any]:
    model = _load(job)
    chunks = stream_chunks(
        job.fmt,
        _read_pipe(upload),
        Schema.of(model),
        label_column=job.label_column,
        chunk_rows=DEFAULT_CHUNK_ROWS,
        max_npz_bytes=MAX_NPZ_UPLOAD_BYTES,
    )
    return await evaluate(
        model, chunks, direct_infer(model.run), job.options, piece_rows=PIECE_ROWS, max_inflight_pieces=1
    )


def _load(job: EvaluationJob) -> LoadedModel:
    """The job's model version in a session of this process (one thread per operator)."""
    source = job.source
    settings = job.settings.model_copy(update={"intra_op_threads": 1, "inter_op_threads": 1})
    try:
        model = load_model(source, settings, job.providers)
    except ModelLoadError as err:
        raise NotReady(
            f"model {source.name!r} version {source.version} cannot be loaded for the evaluation: "
            f"{err.reason}",
            settings.retry_after_seconds,
        ) from err
    if model.card.onnx.sha256 != job.sha256:
        raise NotReady(
            f"model {source.name!r} version {source.version} changed on disk since it was loaded; retry",
            settings.retry_after_seconds,
        )
    return model


async def _read_pipe(fd: int) -> ByteStream:
    """The upload as the server writes it (blocking reads: nothing else runs in this process's loop while
    it waits, but the model call of the chunk before)."""
    while piece := os.read(fd, READ_BYTES):
        yield piece


__all__ = ["EvaluationJob", "EvaluationWorker", "evaluate_upload"]
