"""The evaluation loop: chunking, piece sizes and in-flight limits never change the result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from app.errors import InvalidInput
from app.evaluate.readers import Chunk, EvaluationOptions
from app.evaluate.runner import Tensors, compare_with_training, evaluate
from app.model_card import CardMetrics, TensorSpec
from app.validation import InputValidator

RNG = np.random.default_rng(3)
W = RNG.normal(size=(3, 4)).astype(np.float32)
X = RNG.normal(size=(103, 3)).astype(np.float32)
Y = RNG.integers(0, 4, 103)
INPUTS = [TensorSpec(name="features", dtype="float32", shape=[-1, 3])]
MODEL = SimpleNamespace(
    name="toy",
    version=1,
    task="classification",
    labels=["a", "b", "c", "d"],
    inputs=INPUTS,
    pads_sequences=False,
    card=SimpleNamespace(metrics=CardMetrics(test={"accuracy": 0.5, "loss": 1.0, "note": "text"})),
    validate_inputs=InputValidator(INPUTS, "toy").validate,
)


def softmax_model(inputs: Tensors) -> Tensors:
    assert inputs["features"].dtype == np.float32  # validated by the runner
    # row by row: a row's scores do not depend on how many rows share the call (BLAS may round a
    # matrix product of a different size differently)
    logits = np.stack([row @ W for row in inputs["features"]])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return {"probabilities": p, "label_index": p.argmax(axis=1)}


async def chunks_of(size: int) -> AsyncIterator[Chunk]:
    for start in range(0, len(Y), size):
        yield Chunk({"features": X[start : start + size]}, Y[start : start + size], start + 1)


def run(chunk: int, **kwargs: Any) -> tuple[dict[str, Any], int]:
    in_flight = peak = 0

    async def infer(inputs: Tensors) -> Tensors:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return softmax_model(inputs)

    report = asyncio.run(evaluate(MODEL, chunks_of(chunk), infer, EvaluationOptions(), **kwargs))
    return report, peak


def test_chunking_and_limits_do_not_change_the_report() -> None:
    whole, _ = run(1000, piece_rows=1000)
    for chunk, kwargs in [
        (7, {"piece_rows": 3}),
        (50, {"piece_rows": 5, "max_inflight_pieces": 1}),
        (10, {"piece_rows": 4, "max_inflight_pieces": 2, "max_inflight_chunks": 3}),
    ]:
        report, peak = run(chunk, **kwargs)
        limit = kwargs.get("max_inflight_pieces")
        if limit is not None:
            assert peak <= limit
        # the log loss is a sum over chunks: it may differ in its last bit, and so its difference does
        assert abs(report.pop("log_loss") - whole["log_loss"]) < 1e-14
        assert abs(report["difference"].pop("loss") - whole["difference"]["loss"]) < 1e-14
        exact = {k: v for k, v in whole.items() if k != "log_loss"}
        assert report == {
            **exact,
            "difference": {k: v for k, v in exact["difference"].items() if k != "loss"},
        }


def test_report_compares_with_the_card() -> None:
    report, _ = run(1000, piece_rows=64)
    assert report["training"] == {"accuracy": 0.5, "loss": 1.0}
    assert report["difference"]["accuracy"] == pytest.approx(report["accuracy"] - 0.5)
    assert report["difference"]["loss"] == pytest.approx(report["log_loss"] - 1.0)  # loss = cross-entropy


def test_inference_errors_name_the_rows() -> None:
    async def infer(inputs: Tensors) -> Tensors:
        raise InvalidInput("inputs: NaN or Inf is not a valid input")

    with pytest.raises(InvalidInput, match=r"rows 1-10: inputs: NaN"):
        asyncio.run(evaluate(MODEL, chunks_of(10), infer, EvaluationOptions(), piece_rows=4))


def test_chunks_are_validated_naming_rows_of_the_whole_set() -> None:
    async def chunks() -> AsyncIterator[Chunk]:
        rows = X.astype(np.float64).tolist()  # as a JSON reader parses them: lists of Python floats
        rows[13][1] = float("nan")
        for start in range(0, len(Y), 10):
            yield Chunk({"features": rows[start : start + 10]}, Y[start : start + 10], start + 1)

    async def infer(inputs: Tensors) -> Tensors:
        return softmax_model(inputs)

    with pytest.raises(
        InvalidInput, match=r"^row 14: input 'features'\[1\]: NaN or Inf is not a valid input$"
    ):
        asyncio.run(evaluate(MODEL, chunks(), infer, EvaluationOptions(), piece_rows=4))


def test_a_regressors_standardized_loss_is_shown_but_not_compared() -> None:
    report: dict[str, Any] = {"mse": 3775.0, "r2": 0.2}
    compare_with_training(report, {"mse": 3700.0, "r2": 0.25, "loss": 0.6}, "regression")
    assert report["training"] == {"mse": 3700.0, "r2": 0.25, "loss": 0.6}
    assert report["difference"] == pytest.approx({"mse": 75.0, "r2": -0.05})
