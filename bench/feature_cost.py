"""What prediction ids and drift binning cost `/predict`: four `modelserve serve` processes on the same core,
with both on (the defaults), ids only (`MODELSERVE_DRIFT_WINDOW_ROWS=0`), drift only
(`MODELSERVE_PREDICTION_IDS=false`) and both off, loaded in turn by `wrk` with the bodies, checks and figures
of `bench.compare` (`python -m bench.feature_cost --help`).

Each round runs, for `digits`, single-row requests at 64 connections and 64-row requests at 8 connections
against the four servers one after the other (in reverse order every other round); the cost of a setting is
1 − its req/s ÷ the req/s with both off, within each round, and the median over the rounds is reported.
Prints a Markdown table and writes the figures as JSON under `bench/results/`. Machine-dependent figures, not
a test.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from app.model_card import ONNX_FILENAME
from app.session import create_session
from app.settings import Settings
from bench.compare import (
    BATCH_CONNECTIONS,
    BATCH_ROWS,
    MODELS,
    MODELSERVE_ENV,
    RESULTS,
    ROOT,
    BenchError,
    Body,
    Case,
    check_answer,
    check_tools,
    git_commit,
    run_wrk,
    write_bodies,
    wrk_figures,
)
from bench.server import serve_subprocess

MODEL = next(model for model in MODELS if model.name == "digits")
LOADS = ((1, 64), (BATCH_ROWS, BATCH_CONNECTIONS))
"""(rows per request, connections)."""
IDS_OFF = {"MODELSERVE_PREDICTION_IDS": "false"}
DRIFT_OFF = {"MODELSERVE_DRIFT_WINDOW_ROWS": "0"}
SETTINGS = {
    "ids+drift": {},
    "ids only": DRIFT_OFF,
    "drift only": IDS_OFF,
    "both off": {**IDS_OFF, **DRIFT_OFF},
}
BASELINE = "both off"
TARGET_COST = 0.05


def check_ids(port: int, body: Body, wanted: bool) -> None:
    """The server's predictions carry ids exactly when `wanted`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/predict", body.content, body.headers())
        predictions = orjson.loads(connection.getresponse().read())["predictions"]
    finally:
        connection.close()
    if any("id" in prediction for prediction in predictions) != wanted:
        raise BenchError(f"predictions {'without' if wanted else 'with'} ids: {predictions[0]}")


def measure(args: argparse.Namespace, folder: Path) -> dict[tuple[int, int], dict[str, list[float]]]:
    """req/s of each load with each of `SETTINGS`, one entry per round."""
    repository = folder / "models"
    shutil.copytree(ROOT / "models" / MODEL.name, repository / MODEL.name)
    rows_needed = {rows for rows, _ in LOADS}
    bodies = {rows: write_bodies(folder, MODEL, MODEL.rows(rows))["predict"] for rows in rows_needed}
    session = create_session(
        (repository / MODEL.name / "1" / ONNX_FILENAME).read_bytes(),
        Settings(intra_op_threads=1, inter_op_threads=1),
        ["CPUExecutionProvider"],
    )
    expected = {
        rows: session.run(["label_index"], {MODEL.input_name: MODEL.rows(rows).astype(np.float32)})[0]
        for rows in rows_needed
    }
    samples: dict[tuple[int, int], dict[str, list[float]]] = {
        load: {setting: [] for setting in SETTINGS} for load in LOADS
    }
    with ExitStack() as stack:
        ports = {
            setting: stack.enter_context(
                serve_subprocess(repository, {**MODELSERVE_ENV, **extra}, cpus=str(args.server_cpu))
            )[0]
            for setting, extra in SETTINGS.items()
        }
        for round_index in range(args.rounds):
            for rows, connections in LOADS:
                order = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
                for setting in order:
                    port, body = ports[setting], bodies[rows]
                    case = Case(MODEL.name, "predict", rows, connections)
                    check_answer(case, port, "/predict", body, expected[rows])
                    check_ids(port, body, "ids" in setting)
                    report = run_wrk(
                        f"http://127.0.0.1:{port}/predict",
                        body,
                        connections,
                        args.seconds,
                        str(args.load_cpu),
                    )
                    per_second = wrk_figures(report, rows)["requests_per_second"]
                    samples[(rows, connections)][setting].append(per_second)
                    print(
                        f"round {round_index + 1}/{args.rounds}  {rows} row(s) × {connections} conn  "
                        f"{setting:<10} {per_second:>9,.0f} req/s",
                        flush=True,
                    )
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the cost is their median")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU both servers run on (taskset)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU wrk runs on (taskset)")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    try:
        check_tools(args.server_cpu, args.load_cpu)
        with tempfile.TemporaryDirectory(prefix="modelserve-bench-") as folder:
            samples = measure(args, Path(folder))
    except BenchError as err:
        print(f"bench.feature_cost: {err}", file=sys.stderr)
        return 1
    print(
        f"\n| digits /predict | setting | req/s | cost vs {BASELINE} (median of rounds) | rounds | target |"
        "\n|---|---|---:|---:|---|---|"
    )
    costs_found = []
    for (rows, connections), figures in samples.items():
        baseline = figures[BASELINE]
        for setting, per_second in figures.items():
            line = (
                f"| {rows} row(s) × {connections} conn | {setting} | {statistics.median(per_second):,.0f} |"
            )
            if setting == BASELINE:
                print(f"{line} | | |")
                continue
            costs = [1 - mine / base for mine, base in zip(per_second, baseline, strict=True)]
            cost = statistics.median(costs)
            costs_found.append(
                {"rows": rows, "connections": connections, "setting": setting, "cost": cost, "rounds": costs}
            )
            target = ""
            if setting == "ids+drift":
                target = f"< {TARGET_COST:.0%}: {'met' if cost < TARGET_COST else '**missed**'}"
            print(f"{line} {cost:.1%} | {', '.join(f'{c:.1%}' for c in costs)} | {target} |")
    results = {
        "date": started.isoformat(timespec="seconds"),
        **git_commit(),
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "modelserve_env": MODELSERVE_ENV},
        "requests_per_second": [
            {"rows": rows, "connections": connections, "setting": setting, "rounds": per_second}
            for (rows, connections), figures in samples.items()
            for setting, per_second in figures.items()
        ],
        "costs": costs_found,
    }
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / f"feature_cost-{started:%Y%m%d-%H%M%S}.json"
    output.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"\nwritten: {output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
