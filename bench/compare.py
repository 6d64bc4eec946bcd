"""Side by side in one run: in-process onnxruntime, the HTTP floor, a naive FastAPI server and modelserve
(`/predict`, V2 JSON, V2 binary), loaded with `wrk` (`make bench`; `python -m bench.compare --help`).

What it does:

1. Builds a model repository in a temporary folder: two MLPs written with `onnx.helper`
   (`tests/factories.py`: `mlp_small` 64→256→256→10 and `mlp_heavy` 784→1024→1024→10) and a copy of the
   shipped `models/digits` CNN.
2. Starts three servers, each pinned to one core (`taskset -c`, `--server-cpu`): `modelserve serve`
   (1 worker, onnxruntime 1 intra-op thread), the naive server and the HTTP floor (`bench/servers.py`).
3. Each round, for each model: `wrk` on another core (`--load-cpu`) sends single-row requests at 1, 8 and
   64 connections and 64-row requests at 8 connections to the naive server, `/predict`, V2 JSON and
   V2 binary, and single-row requests at 64 connections to the floor; in-process onnxruntime
   (`app.session.create_session`, the servers' thread settings and core) runs at batch 1, 8 and 64. What
   one ratio compares runs one after the other (`case_groups`), in reverse order every other round, so
   machine noise hits both alike. Before each `wrk` run one request from Python must answer 200 with
   the predictions of in-process onnxruntime, and `wrk` must count no status >= 400.
4. Prints a Markdown table of req/s, rows/s, p50 and p99 (medians over the rounds) and the target ratios
   (met/missed; the median of each round's ratio), and writes it all as JSON under `bench/results/`.

Machine-dependent figures, not a test: the exit status is 0 whether targets are met or not.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import tritonclient.http as triton

from app.model_card import ONNX_FILENAME
from app.session import create_session
from app.settings import Settings
from bench.server import free_port, run_server, serve_subprocess
from bench.servers import FLOOR_BODY
from tests.factories import mlp_classifier, write_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
WRK_SCRIPT = Path(__file__).parent / "wrk_post.lua"
WRK_PREFIX = "wrk-json "

# modelserve as the comparison needs it: one process, one onnxruntime thread, no per-request log line.
MODELSERVE_ENV = {
    "MODELSERVE_WORKERS": "1",
    "MODELSERVE_INTRA_OP_THREADS": "1",
    "MODELSERVE_INTER_OP_THREADS": "1",
    "MODELSERVE_ACCESS_LOG": "false",
}

SERVERS = ("naive", "predict", "v2_json", "v2_binary")
LABELS = {
    "onnxruntime": "in-process onnxruntime",
    "floor": "HTTP floor",
    "naive": "naive FastAPI",
    "predict": "/predict",
    "v2_json": "V2 JSON",
    "v2_binary": "V2 binary",
}
BATCH_ROWS, BATCH_CONNECTIONS = 64, 8
IN_PROCESS_WARMUP_CALLS = 20
# /predict ÷ naive req/s, single row at 64 connections, at least:
PREDICT_OVER_NAIVE = {"mlp_small": 3.0, "mlp_heavy": 4.0, "digits": 3.0}


class BenchError(RuntimeError):
    """The benchmark cannot measure what it should (a wrong answer, error statuses, a missing tool)."""


# ---------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class BenchModel:
    name: str
    input_name: str
    row_shape: tuple[int, ...]

    def rows(self, count: int, seed: int = 0) -> np.ndarray:
        """`count` example rows as float64 with short decimal forms (JSON bodies stay realistic)."""
        rng = np.random.default_rng(seed)
        shape = (count, *self.row_shape)
        if self.name == "digits":
            return rng.integers(0, 17, size=shape).astype(np.float64)  # pixel intensities 0..16
        return rng.normal(size=shape).round(3)


MODELS = (
    BenchModel("mlp_small", "features", (64,)),
    BenchModel("mlp_heavy", "features", (784,)),
    BenchModel("digits", "image", (1, 8, 8)),
)


def build_repository(root: Path) -> Path:
    """The two MLPs (seeded random weights, valid cards) and a copy of the shipped `digits`."""
    write_model(root, "mlp_small", 1, mlp_classifier(64, [256, 256], seed=5))
    write_model(root, "mlp_heavy", 1, mlp_classifier(784, [1024, 1024], seed=6))
    shutil.copytree(ROOT / "models" / "digits", root / "digits")
    return root


# ---------------------------------------------------------------------------------------------- bodies
@dataclass(frozen=True)
class Body:
    """One request body, written to a file for `wrk`."""

    path: Path
    content: bytes
    content_type: str
    header_length: int | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(self.header_length)
        return headers


def write_bodies(folder: Path, model: BenchModel, rows: np.ndarray) -> dict[str, Body]:
    """The same rows as a `/predict` body (also the naive server's and the floor's), a V2 JSON and a V2
    binary body."""
    count = len(rows)
    flat_rows = rows.reshape(count, -1)
    shape = [count, *model.row_shape]
    v2_json = {
        "inputs": [{"name": model.input_name, "shape": shape, "datatype": "FP32", "data": rows.ravel()}]
    }
    tensor = triton.InferInput(model.input_name, shape, "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=True)
    binary, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    contents = {
        "predict": (
            orjson.dumps({"model": model.name, "inputs": flat_rows.tolist()}),
            "application/json",
            None,
        ),
        "v2_json": (orjson.dumps(v2_json, option=orjson.OPT_SERIALIZE_NUMPY), "application/json", None),
        "v2_binary": (binary, "application/octet-stream", header_length),
    }
    bodies = {}
    for kind, (content, content_type, length) in contents.items():
        path = folder / f"{model.name}-{count}-{kind}.body"
        path.write_bytes(content)
        bodies[kind] = Body(path, content, content_type, length)
    bodies["naive"] = bodies["floor"] = bodies["predict"]
    return bodies


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One measurement: `server` answering requests of `rows` rows on `connections` connections
    (`connections` 0: in-process onnxruntime at batch `rows`)."""

    model: str
    server: str
    rows: int
    connections: int

    def describe(self) -> str:
        load = f"batch {self.rows}" if self.server == "onnxruntime" else f"{self.rows} × {self.connections}"
        return f"{self.model} {LABELS[self.server]} {load}"


def case_groups() -> list[list[Case]]:
    """Every case of a round, grouped so that what a ratio compares is measured one after the other
    (in-process batch 1 and 8 beside the 1- and 8-connection runs, the floor beside the 64-connection
    runs, in-process batch 64 beside the 64-row runs)."""
    groups = []
    for model in (m.name for m in MODELS):
        groups += [
            [Case(model, "onnxruntime", 1, 0), *(Case(model, s, 1, 1) for s in SERVERS)],
            [Case(model, "onnxruntime", 8, 0), *(Case(model, s, 1, 8) for s in SERVERS)],
            [Case(model, "floor", 1, 64), *(Case(model, s, 1, 64) for s in SERVERS)],
            [
                Case(model, "onnxruntime", BATCH_ROWS, 0),
                *(Case(model, s, BATCH_ROWS, BATCH_CONNECTIONS) for s in SERVERS),
            ],
        ]
    return groups


# -------------------------------------------------------------------------------------------- measuring
def parse_wrk_output(stdout: str) -> dict[str, Any]:
    """The JSON line `wrk_post.lua` prints in `done()`."""
    for line in stdout.splitlines():
        if line.startswith(WRK_PREFIX):
            return dict(orjson.loads(line[len(WRK_PREFIX) :]))
    raise BenchError(f"no {WRK_PREFIX!r} line in wrk's output:\n{stdout}")


def wrk_figures(report: dict[str, Any], rows: int) -> dict[str, float]:
    """req/s, rows/s, p50 and p99 (ms) of one `wrk` report; raises `BenchError` on error statuses."""
    if report["status_errors"]:
        raise BenchError(f"{report['status_errors']} answers with status >= 400: {report}")
    if not report["requests"]:
        raise BenchError(f"no request completed: {report}")
    per_second = report["requests"] / (report["duration_us"] / 1e6)
    socket_errors = sum(report[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return {
        "requests_per_second": per_second,
        "rows_per_second": per_second * rows,
        "p50_ms": report["p50_us"] / 1000,
        "p99_ms": report["p99_us"] / 1000,
        "requests": report["requests"],
        "socket_errors": socket_errors,
    }


def run_wrk(url: str, body: Body, connections: int, seconds: int, cpu: str) -> dict[str, Any]:
    command = [
        *("taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"),
        *("-s", str(WRK_SCRIPT), url, "--", str(body.path), body.content_type),
        str(body.header_length) if body.header_length is not None else "",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stderr}{completed.stdout}")
    return parse_wrk_output(completed.stdout)


def answer_labels(server: str, content: bytes, header_length: str | None, rows: int) -> np.ndarray:
    """The predicted class indices in an answer, after checking its shape."""
    if server in ("naive", "predict"):
        return np.array([p["index"] for p in orjson.loads(content)["predictions"]])
    if server == "v2_json":
        outputs = {o["name"]: o for o in orjson.loads(content)["outputs"]}
        if (
            outputs["probabilities"]["shape"] != [rows, 10]
            or len(outputs["probabilities"]["data"]) != rows * 10
        ):
            raise BenchError(f"V2 JSON probabilities of the wrong shape: {outputs['probabilities']['shape']}")
        return np.array(outputs["label_index"]["data"])
    result = triton.InferenceServerClient.parse_response_body(
        content, header_length=int(header_length) if header_length else None
    )
    probabilities = result.as_numpy("probabilities")
    if probabilities is None or probabilities.shape != (rows, 10):
        raise BenchError("V2 binary probabilities missing or of the wrong shape")
    return np.asarray(result.as_numpy("label_index"))


def check_answer(case: Case, port: int, path: str, body: Body, expected: np.ndarray | None) -> None:
    """One request from Python: status 200 and the predictions of in-process onnxruntime (the floor:
    its constant body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body.content, body.headers())
        response = connection.getresponse()
        content = response.read()
    except OSError as err:
        raise BenchError(f"{case.describe()}: no answer to the check request ({err!r})") from err
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"{case.describe()}: HTTP {response.status}: {content[:500]!r}")
    if expected is None:
        if content != FLOOR_BODY:
            raise BenchError(f"{case.describe()}: unexpected body {content[:200]!r}")
        return
    labels = answer_labels(
        case.server, content, response.getheader("Inference-Header-Content-Length"), case.rows
    )
    if labels.shape != expected.shape or not np.array_equal(labels, expected):
        raise BenchError(
            f"{case.describe()}: predicted {labels[:8]}..., in-process onnxruntime {expected[:8]}..."
        )


@contextmanager
def pinned_to(cpu: int) -> Iterator[None]:
    """Run the calling thread on one CPU (in-process onnxruntime on the servers' core)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def in_process(session: Any, feeds: dict[str, np.ndarray], rows: int, seconds: float) -> dict[str, float]:
    """Back-to-back `session.run` calls for `seconds`: rows/s and per-call p50/p99."""
    for _ in range(IN_PROCESS_WARMUP_CALLS):
        session.run(None, feeds)
    latencies = []
    started = time.perf_counter()
    deadline = started + seconds
    while (now := time.perf_counter()) < deadline:
        session.run(None, feeds)
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests_per_second": len(ordered) / elapsed,
        "rows_per_second": len(ordered) * rows / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        "requests": len(ordered),
    }


# ------------------------------------------------------------------------------------------- reporting
def median_figures(samples: list[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over the rounds."""
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def ratios(samples: dict[Case, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """The issue's targets (with `target` and `met`) and a few ratios for context (`target` None).

    Each ratio is computed within each round (its two figures were measured minutes apart at most) and
    the median over the rounds is reported, which cancels the machine's slower and faster spells.
    """
    found: list[dict[str, Any]] = []

    def add(name: str, per_round: np.ndarray, target: float | None = None, at_most: bool = False) -> None:
        value = float(np.median(per_round))
        met = None if target is None else (value <= target if at_most else value >= target)
        found.append(
            {
                "name": name,
                "value": value,
                "rounds": per_round.tolist(),
                "target": target,
                "at_most": at_most,
                "met": met,
            }
        )

    def figure(model: str, server: str, rows: int, connections: int, key: str) -> np.ndarray:
        return np.array([s[key] for s in samples[Case(model, server, rows, connections)]])

    for model in (m.name for m in MODELS):
        rps = {s: figure(model, s, 1, 64, "requests_per_second") for s in (*SERVERS, "floor")}
        add(
            f"{model}: /predict ÷ naive req/s, 1 row, 64 conn",
            rps["predict"] / rps["naive"],
            PREDICT_OVER_NAIVE[model],
        )
        add(f"{model}: V2 JSON ÷ /predict req/s, 1 row, 64 conn", rps["v2_json"] / rps["predict"], 0.8)
        for server in ("predict", "v2_json", "v2_binary"):
            p99, p50 = (figure(model, server, 1, 64, key) for key in ("p99_ms", "p50_ms"))
            add(f"{model}: {LABELS[server]} p99 ÷ p50, 1 row, 64 conn", p99 / p50, 3.0, at_most=True)
        p50_predict, p50_naive = (figure(model, s, 1, 1, "p50_ms") for s in ("predict", "naive"))
        add(f"{model}: /predict p50 ÷ naive p50, 1 row, 1 conn", p50_predict / p50_naive, 1.0, at_most=True)
        in_process_rows = figure(model, "onnxruntime", BATCH_ROWS, 0, "rows_per_second")
        heavy = model == "mlp_heavy"
        for server, target in (("predict", 0.6), ("v2_json", None), ("v2_binary", 0.8)):
            served = figure(model, server, BATCH_ROWS, BATCH_CONNECTIONS, "rows_per_second")
            add(
                f"{model}: {LABELS[server]} ÷ in-process rows/s, {BATCH_ROWS} rows, {BATCH_CONNECTIONS} conn",
                served / in_process_rows,
                target if heavy else None,
            )
        add(f"{model}: /predict ÷ HTTP floor req/s, 1 row, 64 conn", rps["predict"] / rps["floor"])
    return found


def markdown_tables(medians: dict[Case, dict[str, float]], found: list[dict[str, Any]]) -> str:
    lines = [
        "| model | rows × connections | server | req/s | rows/s | p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for case, m in medians.items():
        load = f"batch {case.rows}" if case.server == "onnxruntime" else f"{case.rows} × {case.connections}"
        lines.append(
            f"| {case.model} | {load} | {LABELS[case.server]} | {m['requests_per_second']:,.0f} "
            f"| {m['rows_per_second']:,.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} |"
        )
    lines += ["", "| ratio (median of the rounds' ratios) | value | target | |", "|---|---:|---:|---|"]
    for r in found:
        target = "" if r["target"] is None else f"{'≤' if r['at_most'] else '≥'} {r['target']:g}"
        status = "" if r["met"] is None else ("met" if r["met"] else "**missed**")
        lines.append(f"| {r['name']} | {r['value']:.2f} | {target} | {status} |")
    return "\n".join(lines)


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("log", "-1", "--format=%h"), "dirty": bool(git("status", "--porcelain"))}


# ------------------------------------------------------------------------------------------------- main
def check_tools(server_cpu: int, load_cpu: int) -> None:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (Debian: apt-get install -y {tool})")
    usable = os.sched_getaffinity(0)
    if server_cpu == load_cpu or not {server_cpu, load_cpu} <= usable:
        raise BenchError(f"need two different usable CPUs for server and load; usable: {sorted(usable)}")


def measure(args: argparse.Namespace, folder: Path) -> dict[Case, list[dict[str, float]]]:
    """Every case of every round; returns each case's figures, one entry per round."""
    repository = build_repository(folder / "models")
    groups = case_groups()
    models = {model.name: model for model in MODELS}
    session_settings = Settings(intra_op_threads=1, inter_op_threads=1)
    sessions: dict[str, Any] = {}
    features: dict[tuple[str, int], np.ndarray] = {}
    bodies: dict[tuple[str, int], dict[str, Body]] = {}
    expected: dict[tuple[str, int], np.ndarray] = {}
    for model in MODELS:
        graph = (repository / model.name / "1" / ONNX_FILENAME).read_bytes()
        session = sessions[model.name] = create_session(graph, session_settings, ["CPUExecutionProvider"])
        for rows in {case.rows for group in groups for case in group if case.model == model.name}:
            data = model.rows(rows)
            bodies[model.name, rows] = write_bodies(folder, model, data)
            features[model.name, rows] = data.astype(np.float32)
            feeds = {model.input_name: features[model.name, rows]}
            expected[model.name, rows] = session.run(["label_index"], feeds)[0]

    server_cpu, load_cpu = str(args.server_cpu), str(args.load_cpu)
    samples: dict[Case, list[dict[str, float]]] = {}
    with ExitStack() as stack:
        modelserve_port, _ = stack.enter_context(
            serve_subprocess(repository, MODELSERVE_ENV, cpus=server_cpu)
        )
        naive_port, floor_port = free_port(), free_port()
        reference = [sys.executable, "-m", "bench.servers"]
        naive = [*reference, "naive", "--port", str(naive_port), "--repository", str(repository)]
        floor = [*reference, "floor", "--port", str(floor_port)]
        stack.enter_context(run_server(naive, naive_port, cwd=ROOT, cpus=server_cpu, ready_path="/health"))
        stack.enter_context(run_server(floor, floor_port, cwd=ROOT, cpus=server_cpu, ready_path="/"))
        addresses = {
            "floor": (floor_port, "/"),
            "naive": (naive_port, "/predict"),
            "predict": (modelserve_port, "/predict"),
        }

        def measure_case(case: Case) -> dict[str, float]:
            key = (case.model, case.rows)
            if case.server == "onnxruntime":
                with pinned_to(args.server_cpu):
                    feeds = {models[case.model].input_name: features[key]}
                    return in_process(sessions[case.model], feeds, case.rows, args.seconds)
            port, path = addresses.get(case.server, (modelserve_port, f"/v2/models/{case.model}/infer"))
            body = bodies[key][case.server]
            check_answer(case, port, path, body, None if case.server == "floor" else expected[key])
            report = run_wrk(f"http://127.0.0.1:{port}{path}", body, case.connections, args.seconds, load_cpu)
            return wrk_figures(report, case.rows)

        for round_index in range(args.rounds):
            for group in groups:
                for case in group if round_index % 2 == 0 else reversed(group):
                    figures = measure_case(case)
                    samples.setdefault(case, []).append(figures)
                    report_progress(round_index, args.rounds, case, figures)
    return samples


def report_progress(round_index: int, rounds: int, case: Case, figures: dict[str, float]) -> None:
    errors = f", {figures['socket_errors']:.0f} socket errors" if figures.get("socket_errors") else ""
    print(
        f"round {round_index + 1}/{rounds}  {case.describe():<44}"
        f" {figures['requests_per_second']:>9,.0f} req/s"
        f"  p50 {figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms{errors}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run and in-process run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every case; figures are medians")
    parser.add_argument("--quick", action="store_true", help="one round of 1-second runs (smoke use, ~2 min)")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU the servers run on (taskset)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU wrk runs on (taskset)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 1, 1
    try:
        check_tools(args.server_cpu, args.load_cpu)
    except BenchError as err:
        print(f"bench.compare: {err}", file=sys.stderr)
        return 2

    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="modelserve-bench-") as folder:
        try:
            samples = measure(args, Path(folder))
        except BenchError as err:
            print(f"bench.compare: {err}", file=sys.stderr)
            return 1
    medians = {
        case: median_figures(s) for case, s in sorted(samples.items(), key=lambda item: _order(item[0]))
    }
    found = ratios(samples)
    tables = markdown_tables(medians, found)
    print()
    print(tables)

    results = {
        "date": started.isoformat(timespec="seconds"),
        **git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "server_cpu": args.server_cpu,
            "load_cpu": args.load_cpu,
            "modelserve_env": MODELSERVE_ENV,
            "wrk": "wrk -t1 --timeout 10s -s bench/wrk_post.lua",
        },
        "results": [
            {
                "model": c.model,
                "server": c.server,
                "rows": c.rows,
                "connections": c.connections,
                **m,
                "rounds": samples[c],
            }
            for c, m in medians.items()
        ],
        "ratios": found,
    }
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / f"compare-{started:%Y%m%d-%H%M%S}.json"
    output.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"\nwritten: {output.relative_to(ROOT)}")
    return 0


def _order(case: Case) -> tuple[int, bool, int, int, int]:
    """Table order: by model, in-process first, then by rows, connections and server."""
    model = next((i for i, m in enumerate(MODELS) if m.name == case.model), len(MODELS))
    return model, case.server != "onnxruntime", case.rows, case.connections, list(LABELS).index(case.server)


if __name__ == "__main__":
    raise SystemExit(main())
