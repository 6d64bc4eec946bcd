"""The evaluation loop: chunks of rows → the model → mergeable counts → the report.

Protocol-free: the HTTP route passes `DataPlane.run_validated` for a JSON body (the same batcher as
`/predict`); the worker process of a streamed upload and the CLI's local mode pass `direct_infer`, the
model's own session called in a thread. The inputs of each chunk go through the model's input validator
first (the rules of `/predict`, rows named from the start of the set), so ``infer`` gets arrays of the
graph's dtypes and shapes. Only the counts of `app.scoring` outlive a chunk, and at most
``max_inflight_chunks`` chunks are held at once (one being parsed while the previous one is in the
model), so memory does not grow with the number of rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app.errors import InferenceFailed, InvalidInput
from app.evaluate.readers.common import Chunk, EvaluationOptions, Schema, SchemaSource
from app.model_card import LABEL_INDEX_OUTPUT, PROBABILITIES_OUTPUT, REGRESSION_OUTPUT, ModelCard
from app.scoring import ClassificationAccumulator, RegressionAccumulator, default_top_k
from app.validation import Places, RowPlaces

Tensors = dict[str, npt.NDArray[Any]]
InferFn = Callable[[Tensors], Awaitable[Tensors]]
ProgressFn = Callable[[int], None]


class EvaluatedModel(SchemaSource, Protocol):
    """What the runner reads of a model (a `LoadedModel` has it all)."""

    @property
    def name(self) -> str:
        """The model's name."""
        ...

    @property
    def version(self) -> int:
        """The model's version."""
        ...

    @property
    def card(self) -> ModelCard:
        """Its card, whose test metrics the report sets beside the new ones."""
        ...

    def validate_inputs(
        self, inputs: Mapping[str, Any], places: Places | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Check and convert a chunk's inputs (see `LoadedModel.validate_inputs`)."""
        ...


def direct_infer(run: Callable[[Tensors], Mapping[str, npt.NDArray[Any]]]) -> InferFn:
    """An ``infer`` that calls ``run`` (a model's own onnxruntime call, e.g. `LoadedModel.run`) in a thread:
    onnxruntime releases the GIL, so the next chunk is parsed meanwhile. A failure is `InferenceFailed`,
    as the batcher reports it."""

    async def infer(inputs: Tensors) -> Tensors:
        try:
            outputs = await asyncio.to_thread(run, inputs)
        except Exception as err:
            rows = next(iter(inputs.values())).shape[0]
            raise InferenceFailed(
                f"inference failed on a batch of {rows} rows: {type(err).__name__}"
            ) from err
        return dict(outputs)

    return infer


# Card metric names → the report's, for the "difference" block. A classifier's recorded loss is the test
# cross-entropy, i.e. log loss; a regressor's is MSE on the standardized target, which has no counterpart in
# raw units, so it is shown but not compared.
_CARD_ALIASES = {
    "classification": {"loss": "log_loss", "cross_entropy": "log_loss", "top_k_accuracy": "top_k_accuracy"},
    "regression": {},
}


def resolve_pos_label(value: str | int | None, labels: tuple[str, ...]) -> int | None:
    """The positive class index for ROC AUC (two-class models): a class name or index; default 1."""
    if len(labels) != 2:
        if value is not None:
            raise InvalidInput(
                f"pos_label applies to two-class models (ROC AUC); this model has {len(labels)} classes"
            )
        return None
    if value is None:
        return 1
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        if value.strip().isdigit() and int(value) in (0, 1):
            return int(value)
    elif value in (0, 1):
        return int(value)
    raise InvalidInput(f"pos_label {value!r} is not one of the model's classes {list(labels)} (or 0, 1)")


def flat_scores(report: dict[str, Any]) -> dict[str, float]:
    """Scalar scores by name (`accuracy`, `f1_macro`, `roc_auc`, `mse`, ...): for gauges and the card."""
    flat: dict[str, float] = {}
    for key in ("accuracy", "log_loss", "mse", "rmse", "mae", "r2", "max_error"):
        if isinstance(report.get(key), int | float):
            flat[key] = float(report[key])
    for metric in ("precision", "recall", "f1"):
        for average, value in (report.get(metric) or {}).items():
            if isinstance(value, int | float):  # skips None (NaN) and the per_class rows
                flat[f"{metric}_{average}"] = float(value)
    for key in ("top_k_accuracy", "roc_auc"):
        block = report.get(key)
        if isinstance(block, dict) and block.get("value") is not None:
            flat[key] = float(block["value"])
    return flat


def compare_with_training(report: dict[str, Any], card_test_metrics: dict[str, Any], task: str) -> None:
    """Add ``training`` (the card's test metrics) and ``difference`` (now minus then) to the report."""
    training = {
        key: float(value)
        for key, value in card_test_metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
    ours = flat_scores(report)
    aliases = _CARD_ALIASES.get(task, {})
    difference = {}
    for key, then in training.items():
        now = ours.get(key, ours.get(aliases.get(key, "")))
        if now is not None:
            difference[key] = now - then
    report["training"] = training
    report["difference"] = difference


class Evaluation:
    """One evaluation of one model: feed chunks, then `report()`."""

    def __init__(
        self,
        model: EvaluatedModel,
        options: EvaluationOptions,
        infer: InferFn,
        *,
        piece_rows: int = 64,
        max_inflight_chunks: int = 2,
        max_inflight_pieces: int | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Prepare the accumulators for ``model``.

        Args:
            model: the model: its inputs validate each chunk (errors name the rows of the whole set).
            options: zero_division, top_k, pos_label.
            infer: runs the model on a dict of validated input arrays and returns its outputs for those
                rows.
            piece_rows: rows per ``infer`` call (through the batcher: at most its batch size, so the
                evaluation never occupies the model for longer than one batch while `/predict` waits).
            max_inflight_chunks: chunks read ahead while earlier ones are in the model.
            max_inflight_pieces: ``infer`` calls awaited at once (None: every piece of the chunks in
                flight). Through the batcher two keep the model busy (one runs while the next waits) and
                keep the evaluation's share of the queue at two pieces.
            progress: called with the number of rows scored after each chunk.
        """
        self.model = model
        self.schema = Schema.of(model)
        self.options = options
        self.infer = infer
        self.piece_rows = piece_rows
        self.max_inflight_chunks = max(1, max_inflight_chunks)
        self.progress = progress
        self.max_inflight_pieces = max_inflight_pieces
        self._pieces_in_flight = 0
        self._piece_done = asyncio.Condition()
        self.accumulator: ClassificationAccumulator | RegressionAccumulator
        if self.schema.classification:
            labels = self.schema.labels or ()
            k = options.top_k if options.top_k is not None else default_top_k(len(labels))
            if k > len(labels):
                raise InvalidInput(f"top_k {k} is more than the model's {len(labels)} classes")
            self.accumulator = ClassificationAccumulator(
                n_classes=len(labels), top_k=k, pos_label=resolve_pos_label(options.pos_label, labels)
            )
        else:
            if options.top_k is not None or options.pos_label is not None:
                raise InvalidInput("top_k and pos_label apply to classifiers; this model is a regressor")
            self.accumulator = RegressionAccumulator()

    async def _infer_chunk(self, chunk: Chunk) -> Tensors:
        rows, step = chunk.rows, max(1, self.piece_rows)
        pieces = [
            {name: array[start : start + step] for name, array in chunk.inputs.items()}
            for start in range(0, rows, step)
        ]
        tasks = [asyncio.ensure_future(self._infer_piece(piece)) for piece in pieces]
        try:
            results = await asyncio.gather(*tasks)
        except InvalidInput as err:
            raise InvalidInput(f"{chunk.where()}: {err.message}") from err
        finally:
            for task in tasks:
                task.cancel()
        wanted = (
            (PROBABILITIES_OUTPUT, LABEL_INDEX_OUTPUT) if self.schema.classification else (REGRESSION_OUTPUT,)
        )
        return {
            name: np.concatenate([result[name] for result in results])
            if len(results) > 1
            else results[0][name]
            for name in wanted
        }

    async def _infer_piece(self, piece: Tensors) -> Tensors:
        limit = self.max_inflight_pieces
        if limit is None:
            return await self.infer(piece)
        async with self._piece_done:
            await self._piece_done.wait_for(lambda: self._pieces_in_flight < limit)
            self._pieces_in_flight += 1
        try:
            return await self.infer(piece)
        finally:
            async with self._piece_done:
                self._pieces_in_flight -= 1
                self._piece_done.notify_all()

    def _count(self, chunk: Chunk, outputs: Tensors) -> None:
        if isinstance(self.accumulator, ClassificationAccumulator):
            self.accumulator.update(chunk.targets, outputs[LABEL_INDEX_OUTPUT], outputs[PROBABILITIES_OUTPUT])
        else:
            self.accumulator.update(chunk.targets, outputs[REGRESSION_OUTPUT].reshape(chunk.rows))

    async def consume(self, chunks: AsyncIterator[Chunk]) -> None:
        """Score every chunk, reading ahead while earlier chunks are in the model."""
        inflight: deque[tuple[Chunk, asyncio.Future[Tensors]]] = deque()
        scored = 0
        iterator = aiter(chunks)
        try:
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                chunk = self._validated(chunk)
                inflight.append((chunk, asyncio.ensure_future(self._infer_chunk(chunk))))
                while len(inflight) >= self.max_inflight_chunks:
                    scored += await self._settle(inflight)
                    self._report_progress(scored)
            while inflight:
                scored += await self._settle(inflight)
                self._report_progress(scored)
        finally:
            for _, future in inflight:
                future.cancel()

    def _validated(self, chunk: Chunk) -> Chunk:
        """The chunk with its inputs checked and converted by the model's validator (the core's rules)."""
        inputs = self.model.validate_inputs(chunk.inputs, RowPlaces(chunk.first_row, chunk.rows))
        return dataclasses.replace(chunk, inputs=inputs)

    async def _settle(self, inflight: deque[tuple[Chunk, asyncio.Future[Tensors]]]) -> int:
        chunk, future = inflight[0]
        outputs = await future
        inflight.popleft()
        self._count(chunk, outputs)
        return chunk.rows

    def _report_progress(self, rows: int) -> None:
        if self.progress is not None:
            self.progress(rows)

    def report(self) -> dict[str, Any]:
        """Every score, the card's test metrics beside them and the differences."""
        if isinstance(self.accumulator, ClassificationAccumulator):
            scores = self.accumulator.compute(list(self.schema.labels or ()), self.options.zero_division)
        else:
            scores = self.accumulator.compute()
        report: dict[str, Any] = {
            "model": self.model.name,
            "version": self.model.version,
            "task": self.schema.task,
            **scores,
        }
        compare_with_training(report, dict(self.model.card.metrics.test), self.schema.task)
        return report


async def evaluate(
    model: EvaluatedModel,
    chunks: AsyncIterator[Chunk],
    infer: InferFn,
    options: EvaluationOptions,
    *,
    piece_rows: int = 64,
    max_inflight_chunks: int = 2,
    max_inflight_pieces: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score ``chunks`` with ``infer`` and return the report (see `Evaluation`)."""
    run = Evaluation(
        model,
        options,
        infer,
        piece_rows=piece_rows,
        max_inflight_chunks=max_inflight_chunks,
        max_inflight_pieces=max_inflight_pieces,
        progress=progress,
    )
    await run.consume(chunks)
    return run.report()
