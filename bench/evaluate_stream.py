"""Streamed `/evaluate` at scale: a 1,000,000-row CSV against a live server (issue 4).

What it measures (`python -m bench.evaluate_stream --help`):

1. Builds (once, cached under `bench/results/`) a labelled CSV of N rows for the shipped `digits` model:
   the 8x8 pixels of scikit-learn's digits (rows drawn with replacement) plus a `label` column.
2. Starts `modelserve serve` on the shipped model repository in a subprocess and samples its memory every
   20 ms: the PSS of the server and of its child processes (the evaluation worker and the fork server
   that starts it; PSS counts the pages a forked child shares with its parent once).
3. The streamed evaluation alone: an httpx streaming upload of the CSV (`POST /evaluate?model=digits`);
   rows/s, the CPU seconds the server's processes spent (rows per CPU second does not depend on what
   else the machine runs), and the growth of that memory over its idle baseline (target: < 200 MB).
4. Idle `/predict` latency: sequential one-row requests over a keep-alive connection, 1 ms apart.
5. The same evaluation again while the `/predict` loop runs: `/predict` p99 during it vs idle (target:
   within 2x).
6. In-process baseline over the same file: CSV parsing (numpy, chunked) + onnxruntime in 4096-row batches
   + scikit-learn metrics; and the same with the data already in memory (no parsing). The server's report
   is checked against scikit-learn's numbers.

Results are printed and written to `bench/results/evaluate_stream.json`.

Side by side (`--compare-with DIR`): a second server runs from another source tree, e.g. the commit before
a change (`git archive <commit> app models | tar -x -C DIR`); both are measured in the same run, and with
`--rounds N` the idle and during-evaluation `/predict` phases are repeated N times in alternating order,
so that the other load on a shared machine hits both alike. Figures: `bench/README.md`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.server import serve_subprocess

RESULTS = Path(__file__).parent / "results"
MODELS = Path(__file__).parent.parent / "models"
READ_BYTES = 1 << 20


def make_csv(path: Path, rows: int, seed: int = 0) -> None:
    """N labelled digits rows (integer pixels 0..16 and the true label), written in blocks."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(np.int64)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        handle.write(",".join([f"p{i}" for i in range(64)] + ["label"]) + "\n")
        for start in range(0, rows, 100_000):
            pick = rng.integers(0, len(pixels), min(100_000, rows - start))
            block = np.column_stack([pixels[pick], digits.target[pick]])
            np.savetxt(handle, block, fmt="%d", delimiter=",")
    tmp.rename(path)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a process that ends meanwhile is left out)."""
    try:
        children = [
            int(child)
            for listing in Path(f"/proc/{pid}/task").glob("*/children")
            for child in listing.read_text().split()
        ]
    except OSError:
        return []
    return [pid, *(found for child in children for found in process_tree(child))]


def _field(path: str, name: str) -> int:
    """A `Name:   <n> kB` line of a /proc file in bytes (0 when the process is gone)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(name)), 0)


def memory_bytes(pid: int) -> int:
    """Memory of a process and its descendants: the sum of their proportional set sizes (PSS), so pages a
    forked child shares with its parent count once."""
    return sum(_field(f"/proc/{each}/smaps_rollup", "Pss:") for each in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants, those already reaped included."""
    ticks = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """Peak `memory_bytes` of a process over a window, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_bytes(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> MemorySampler:
        self.peak = memory_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def server(repository: Path, source: Path | None = None) -> Iterator[tuple[int, int]]:
    """`modelserve serve` in a subprocess (from another source tree when `source` is given); yields
    (port, pid) once ready."""
    with serve_subprocess(repository, {"MODELSERVE_ACCESS_LOG": "false"}, source=source) as running:
        yield running


def predict_loop(
    port: int,
    body: bytes,
    stop: threading.Event,
    max_requests: int | None = None,
    think_seconds: float = 0.001,
) -> list[float]:
    """Sequential one-row /predict requests over one keep-alive connection until `stop` (or a count),
    with a short pause between them (a client that also does other work, not a closed-loop hammer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    samples: list[float] = []
    while not stop.is_set() and (max_requests is None or len(samples) < max_requests):
        started = time.perf_counter()
        connection.request("POST", "/predict", body, headers)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"/predict answered {response.status}")
        time.sleep(think_seconds)
    connection.close()
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
    }


def stream_evaluation(port: int, path: Path) -> tuple[dict[str, Any], float]:
    """Upload the CSV with an httpx streaming body; returns (report, seconds)."""

    def pieces() -> Iterator[bytes]:
        with path.open("rb") as handle:
            while block := handle.read(READ_BYTES):
                yield block

    started = time.perf_counter()
    response = httpx.post(
        f"http://127.0.0.1:{port}/evaluate",
        params={"model": "digits", "label_column": "label"},
        content=pieces(),
        headers={"content-type": "text/csv"},
        timeout=httpx.Timeout(3600, connect=10),
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"/evaluate answered {response.status_code}: {response.text}")
    return response.json(), seconds


def in_process_baseline(path: Path, with_parsing: bool) -> dict[str, Any]:
    """onnxruntime + scikit-learn over the same rows, in this process."""
    import onnxruntime as ort
    from sklearn import metrics as skm

    options = ort.SessionOptions()
    session = ort.InferenceSession(
        str(MODELS / "digits" / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )

    def blocks() -> Iterator[np.ndarray]:
        with path.open() as handle:
            handle.readline()
            while True:
                lines = [line for _, line in zip(range(100_000), handle, strict=False)]
                if not lines:
                    return
                yield np.loadtxt(lines, delimiter=",", dtype=np.float32, ndmin=2)

    data = None if with_parsing else np.concatenate(list(blocks()))
    started = time.perf_counter()
    labels, predictions, probabilities = [], [], []
    for block in blocks() if data is None else [data]:
        x, y = block[:, :64].reshape(-1, 1, 8, 8), block[:, 64].astype(np.int64)
        for lo in range(0, len(y), 4096):
            proba, index = session.run(["probabilities", "label_index"], {"image": x[lo : lo + 4096]})
            predictions.append(index)
            probabilities.append(proba)
        labels.append(y)
    y_true, y_pred, proba = np.concatenate(labels), np.concatenate(predictions), np.concatenate(probabilities)
    classes = list(range(10))
    scores: dict[str, Any] = {"accuracy": skm.accuracy_score(y_true, y_pred)}
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0
        )
        scores[f"precision_{average}"], scores[f"recall_{average}"], scores[f"f1_{average}"] = p, r, f
    skm.precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    scores["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=classes).tolist()
    scores["log_loss"] = skm.log_loss(y_true, proba, labels=classes)  # float32 arithmetic, as given
    # the same formula in float64 (clipped at float32's eps, as sklearn does for float32 input)
    eps = np.finfo(np.float32).eps
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], eps, 1 - eps).astype(np.float64)
    scores["log_loss_float64"] = float(-np.mean(np.log(p_true)))
    scores["top_k_accuracy"] = skm.top_k_accuracy_score(y_true, proba, k=5, labels=classes)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rows_per_second": len(y_true) / seconds,
        "scores": scores,
        "rows": len(y_true),
    }


def check_report(report: dict[str, Any], oracle: dict[str, Any]) -> dict[str, float]:
    """Largest |server - sklearn| per metric family (the confusion matrix must be identical)."""
    assert report["confusion_matrix"]["matrix"] == oracle["confusion_matrix"], "confusion matrices differ"
    diffs = {"accuracy": abs(report["accuracy"] - oracle["accuracy"])}
    for metric in ("precision", "recall", "f1"):
        diffs[metric] = max(
            abs(report[metric][a] - oracle[f"{metric}_{a}"]) for a in ("micro", "macro", "weighted")
        )
    diffs["log_loss_vs_sklearn_float32"] = abs(report["log_loss"] - oracle["log_loss"])
    diffs["log_loss_vs_float64_formula"] = abs(report["log_loss"] - oracle["log_loss_float64"])
    diffs["top_k_accuracy"] = abs(report["top_k_accuracy"]["value"] - oracle["top_k_accuracy"])
    return diffs


def evaluation_alone(port: int, pid: int, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The streamed evaluation with no other traffic: (report, figures)."""
    baseline = memory_bytes(pid)
    cpu_before = cpu_seconds(pid)
    with MemorySampler(pid) as sampler:
        report, seconds = stream_evaluation(port, path)
    cpu = cpu_seconds(pid) - cpu_before
    return report, {
        "seconds": seconds,
        "rows_per_second": report["n"] / seconds,
        "server_cpu_seconds": cpu,
        "rows_per_server_cpu_second": report["n"] / cpu,
        "memory_idle_mb": baseline / 1e6,
        "memory_peak_mb": sampler.peak / 1e6,
        "memory_growth_mb": (sampler.peak - baseline) / 1e6,
    }


def predict_during_evaluation(
    port: int, body: bytes, rows: int, uploader_nice: int = 0
) -> tuple[list[float], float]:
    """/predict latencies while a streamed evaluation runs, and the evaluation's seconds.

    The upload runs in its own process so that it does not share this process's GIL with the /predict
    client (which would inflate the client-side latencies measured here), made `uploader_nice` nicer."""
    stop = threading.Event()
    during: list[float] = []
    thread = threading.Thread(target=lambda: during.extend(predict_loop(port, body, stop)))
    thread.start()
    try:
        upload = subprocess.run(
            [
                *(["nice", "-n", str(uploader_nice)] if uploader_nice else []),
                *[
                    sys.executable,
                    "-m",
                    "bench.evaluate_stream",
                    "--upload-to",
                    str(port),
                    "--rows",
                    str(rows),
                ],
            ],
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        stop.set()
        thread.join()
    return during, json.loads(upload.stdout)["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--predict-requests", type=int, default=2000, help="idle /predict samples per round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="idle + during-evaluation /predict measurements per server"
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="DIR",
        help="another source tree (e.g. `git archive <commit> app | tar -x -C DIR`) served side by side: "
        "every round measures both servers, in alternating order",
    )
    parser.add_argument(
        "--uploader-nice",
        type=int,
        default=0,
        metavar="N",
        help="run the uploader of the during-evaluation phases N nicer (as if the upload came from another "
        "machine): what is left of the /predict tail is then the server's own",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="skip the in-process baseline")
    parser.add_argument("--upload-to", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upload_to is not None:  # child process: one streamed evaluation, result on stdout
        report, seconds = stream_evaluation(args.upload_to, RESULTS / f"digits_{args.rows}.csv")
        print(json.dumps({"seconds": seconds, "n": report["n"]}))
        return 0

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"digits_{args.rows}.csv"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        make_csv(path, args.rows)
    size_mb = path.stat().st_size / 1e6
    print(f"{args.rows} rows, {size_mb:.0f} MB", flush=True)
    predict_body = orjson.dumps({"model": "digits", "inputs": [[float(v) for v in range(64)]]})
    results: dict[str, Any] = {
        "rows": args.rows,
        "csv_mb": size_mb,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "rounds": args.rounds,
        "uploader_nice": args.uploader_nice,
    }
    sources: dict[str, Path | None] = {"current": None}
    if args.compare_with is not None:
        sources["compared"] = args.compare_with.resolve()
        results["compared_source"] = str(sources["compared"])

    with ExitStack() as stack:
        servers = {name: stack.enter_context(server(MODELS, source)) for name, source in sources.items()}
        reports: dict[str, dict[str, Any]] = {}
        for name, (port, pid) in servers.items():
            # The evaluation alone first: a server of older code (--compare-with) may take smaller
            # evaluation steps for seconds after a /predict, which this phase must not measure.
            reports[name], figures = evaluation_alone(port, pid, path)
            assert reports[name]["n"] == args.rows
            results[name] = {"server": figures}
            print(f"[{name}] streamed evaluation alone: {figures}", flush=True)
        samples = {name: {"idle": [], "during": [], "ratios": [], "seconds": []} for name in servers}
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                port, _ = servers[name]
                predict_loop(port, predict_body, threading.Event(), 200)  # warm-up
                idle = predict_loop(port, predict_body, threading.Event(), args.predict_requests)
                during, seconds = predict_during_evaluation(port, predict_body, args.rows, args.uploader_nice)
                ratio = summary(during)["p99_ms"] / summary(idle)["p99_ms"]
                mine = samples[name]
                mine["idle"] += idle
                mine["during"] += during
                mine["ratios"].append(ratio)
                mine["seconds"].append(seconds)
                print(
                    f"[{name}] round {round_ + 1}: idle {summary(idle)}, during {summary(during)}, "
                    f"p99 ratio {ratio:.2f}, evaluation {seconds:.1f} s",
                    flush=True,
                )
        for name, mine in samples.items():
            figures = {
                "idle": summary(mine["idle"]),
                "during_evaluation": summary(mine["during"]),
                "p99_ratio_per_round": mine["ratios"],
                "evaluation_seconds_with_predict_traffic": mine["seconds"],
            }
            figures["p99_ratio"] = figures["during_evaluation"]["p99_ms"] / figures["idle"]["p99_ms"]
            results[name]["predict"] = figures
            print(f"[{name}] /predict, all rounds: {figures}", flush=True)

    if not args.skip_baseline:
        for with_parsing in (True, False):
            base = in_process_baseline(path, with_parsing)
            key = "in_process_parse_csv" if with_parsing else "in_process_in_memory"
            results[key] = {k: v for k, v in base.items() if k != "scores"}
            print(f"{key}: {results[key]}", flush=True)
        results["max_abs_difference_vs_sklearn"] = check_report(reports["current"], base["scores"])
        print(f"server vs sklearn: {results['max_abs_difference_vs_sklearn']}", flush=True)

    (RESULTS / "evaluate_stream.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
