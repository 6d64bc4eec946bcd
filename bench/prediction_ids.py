"""What prediction ids cost on the hot path: the encoding step of `/predict` with and without them.

For the shipped `digits` model (outputs of a real onnxruntime run) at batch 1 and 64 rows, times
(`python -m bench.prediction_ids [--repeat N]`):

* `answer without ids`: `encode_predictions` + `orjson.dumps` of the answer, as `/predict` did before ids;
* `answer with ids`: the same plus `PredictionIds.issue` and one `id` per prediction, as `/predict` does;
* `ids alone`: `PredictionIds.issue` (what V2 inference adds to its answer).

Medians over `--repeat` runs of a timed loop, interleaved so that other load on the machine hits both alike.
Printed as a Markdown table and written to `bench/results/prediction_ids.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.api.predict import encode_predictions
from app.quality.ids import PredictionIds, predictions_of
from app.repository import load_model, scan_repository
from app.settings import Settings

RESULTS = Path(__file__).parent / "results"


def _per_call_us(work: Callable[[], Any], loops: int) -> float:
    started = time.perf_counter()
    for _ in range(loops):
        work()
    return (time.perf_counter() - started) / loops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    settings = Settings(model_repository=Path("models"))
    source = next(s for s in scan_repository(settings.model_repository) if s.name == "digits")
    model = load_model(source, settings, ["CPUExecutionProvider"])
    ids = PredictionIds(b"benchmark secret")
    results: dict[str, dict[str, float]] = {}
    for rows in (1, 64):
        pixels = np.random.default_rng(0).uniform(0, 16, size=(rows, 1, 8, 8)).astype(np.float32)
        outputs = model.run({"image": pixels})

        def without_ids(outputs: dict[str, Any] = outputs) -> bytes:
            predictions = encode_predictions(model, outputs, None)
            return orjson.dumps({"model": model.name, "version": model.version, "predictions": predictions})

        def with_ids(outputs: dict[str, Any] = outputs) -> bytes:
            predictions = encode_predictions(model, outputs, None)
            row_ids = ids.issue(model.name, model.version, predictions_of(model.task, outputs))
            for prediction, row_id in zip(predictions, row_ids, strict=True):
                prediction["id"] = row_id
            return orjson.dumps({"model": model.name, "version": model.version, "predictions": predictions})

        def ids_alone(outputs: dict[str, Any] = outputs) -> list[str]:
            return ids.issue(model.name, model.version, predictions_of(model.task, outputs))

        cases = {"answer without ids": without_ids, "answer with ids": with_ids, "ids alone": ids_alone}
        loops = 20000 // rows
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, work in cases.items():
                times[name].append(_per_call_us(work, loops))
        results[str(rows)] = {name: statistics.median(values) for name, values in times.items()}

    print("| rows | answer without ids (µs) | answer with ids (µs) | added by ids (µs) | ids alone (µs) |")
    print("|---|---|---|---|---|")
    for rows, figures in results.items():
        added = figures["answer with ids"] - figures["answer without ids"]
        print(
            f"| {rows} | {figures['answer without ids']:.1f} | {figures['answer with ids']:.1f} | "
            f"{added:.1f} | {figures['ids alone']:.1f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prediction_ids.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
