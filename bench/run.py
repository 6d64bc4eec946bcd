"""Latency of `/predict` with dynamic batching against a direct, unbatched path, at concurrency 1.

What it does (`python -m bench.run`; `--help` for its options):

1. Builds a model repository of fixture models (`tests/factories.py`) in a temporary folder.
2. HTTP: starts two real servers with `modelserve serve`, identical except `MODELSERVE_BATCHING`
   (true: the batcher; false: each request is its own onnxruntime call, still off the event loop), and
   sends them the same requests one at a time, alternating between them so machine noise hits both
   alike. Reports median / p90 / p99 client-side latency and the added median latency.
3. In-process: the same comparison without HTTP (`DataPlane.infer` of two apps, batching on and off,
   vs. a plain `session.run` on the event loop), which isolates the batcher's own cost.
4. Throughput: N concurrent clients for a few seconds against each server; rows per onnxruntime call are
   read from `/metrics` (`modelserve_batch_rows`).

The target (issue 3): at concurrency 1 the batcher adds at most 0.2 ms at the median. Results are printed
and written to `bench/results/latest.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.server import serve_subprocess
from tests.factories import build_repository

TARGET_ADDED_MEDIAN_MS = 0.2
RESULTS = Path(__file__).parent / "results"


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p90 and p99 in milliseconds."""
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "n": len(ordered),
    }


@contextmanager
def server(repository: Path, *, batching: bool) -> Iterator[int]:
    """`modelserve serve` in a subprocess; yields its port once ready."""
    settings = {"MODELSERVE_BATCHING": str(batching).lower()}
    with serve_subprocess(repository, settings, ready_timeout_seconds=60) as (port, _):
        yield port


def http_latency(ports: dict[str, int], body: bytes, requests: int, warmup: int) -> dict[str, list[float]]:
    """Sequential POSTs over keep-alive connections, alternating between the servers."""
    connections = {name: http.client.HTTPConnection("127.0.0.1", port) for name, port in ports.items()}
    headers = {"Content-Type": "application/json"}
    samples: dict[str, list[float]] = {name: [] for name in ports}
    for i in range(warmup + requests):
        for name, connection in connections.items():
            started = time.perf_counter()
            connection.request("POST", "/predict", body, headers)
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise RuntimeError(f"{name}: HTTP {response.status}")
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


async def _throughput(port: int, body: bytes, concurrency: int, seconds: float) -> float:
    """Closed-loop clients on raw keep-alive sockets (a light client: the server, not httpx, is measured)."""
    request = (
        b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.decode(errors="replace"))
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


def batch_stats(port: int, model: str) -> tuple[float, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()

    def value(suffix: str) -> float:
        match = re.search(rf'^modelserve_batch_rows_{suffix}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return value("count"), value("sum")


async def _in_process(repository: Path, requests: int, warmup: int) -> dict[str, list[float]]:
    from asgi_lifespan import LifespanManager

    from app.main import create_app
    from app.settings import Settings

    batched_app = create_app(Settings(model_repository=repository, access_log=False))
    unbatched_app = create_app(Settings(model_repository=repository, access_log=False, batching=False))
    samples: dict[str, list[float]] = {"batched": [], "unbatched": [], "inline_session_run": []}
    async with LifespanManager(batched_app), LifespanManager(unbatched_app):
        batched, unbatched = batched_app.state.dataplane, unbatched_app.state.dataplane
        batched_model, unbatched_model = batched.get_model("clf"), unbatched.get_model("clf")
        inputs = {"features": np.ones((1, 4), np.float32)}

        async def inline() -> Any:
            return batched_model.run(inputs)

        paths: dict[str, Callable[[], Awaitable[Any]]] = {
            "batched": lambda: batched.infer(batched_model, inputs),
            "unbatched": lambda: unbatched.infer(unbatched_model, inputs),
            "inline_session_run": inline,
        }
        for i in range(warmup + requests):
            for name, call in paths.items():
                started = time.perf_counter()
                await call()
                if i >= warmup:
                    samples[name].append(time.perf_counter() - started)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32, help="clients for the throughput part")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput run")
    args = parser.parse_args(argv)

    import uvloop

    body = orjson.dumps({"model": "clf", "inputs": [[5.1, 3.5, 1.4, 0.2]]})
    results: dict[str, Any] = {"requests": args.requests, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        repository = build_repository(Path(folder))

        in_process = uvloop.run(_in_process(repository, args.requests, args.warmup))
        results["in_process"] = {name: summary(s) for name, s in in_process.items()}

        with server(repository, batching=True) as batched, server(repository, batching=False) as unbatched:
            ports = {"batched": batched, "unbatched": unbatched}
            latency = http_latency(ports, body, args.requests, args.warmup)
            results["http_concurrency_1"] = {name: summary(s) for name, s in latency.items()}
            throughput = {}
            for name, port in ports.items():
                count_before, rows_before = batch_stats(port, "clf")
                rate = uvloop.run(_throughput(port, body, args.concurrency, args.seconds))
                count_after, rows_after = batch_stats(port, "clf")
                calls = count_after - count_before
                throughput[name] = {
                    "requests_per_second": rate,
                    "rows_per_onnxruntime_call": (rows_after - rows_before) / calls if calls else None,
                }
            results[f"http_concurrency_{args.concurrency}"] = throughput

    http1 = results["http_concurrency_1"]
    added = http1["batched"]["median_ms"] - http1["unbatched"]["median_ms"]
    inproc = results["in_process"]
    results["added_median_ms"] = {
        "http": added,
        "in_process": inproc["batched"]["median_ms"] - inproc["unbatched"]["median_ms"],
    }
    results["target_met"] = added <= TARGET_ADDED_MEDIAN_MS

    print(f"{'path':<40} {'median ms':>10} {'p90 ms':>10} {'p99 ms':>10}")
    for section in ("in_process", "http_concurrency_1"):
        for name, s in results[section].items():
            label = f"{section} {name}"
            print(f"{label:<40} {s['median_ms']:>10.3f} {s['p90_ms']:>10.3f} {s['p99_ms']:>10.3f}")
    for name, t in results[f"http_concurrency_{args.concurrency}"].items():
        per_call = t["rows_per_onnxruntime_call"]
        print(
            f"concurrency {args.concurrency} {name:<26} {t['requests_per_second']:>10.0f} req/s"
            f"   rows per onnxruntime call: {per_call if per_call is None else round(per_call, 2)}"
        )
    print(
        f"added median latency of batching at concurrency 1: http {added * 1000:.1f} µs, "
        f"in-process {results['added_median_ms']['in_process'] * 1000:.1f} µs "
        f"(target ≤ {TARGET_ADDED_MEDIAN_MS * 1000:.0f} µs: {'met' if results['target_met'] else 'NOT met'})"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
