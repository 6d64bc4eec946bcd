"""Soak and overload: many mixed requests against one `modelserve serve`, its memory sampled throughout
(`python -m bench.soak`; `--help` for its options).

What it does:

1. Starts `modelserve serve` (defaults: 1 worker, the default queue bound and body limit, access log on,
   written to /dev/null) on the shipped models (`models/`: digits, wine, diabetes, waves).
2. Soak: closed-loop clients on raw keep-alive sockets (`--connections`) send `--requests` requests drawn
   with a fixed seed from a mix: `/predict` with 1 row and with 8-64 rows, V2 JSON and V2 binary infer for
   each model, small `/evaluate` JSON bodies, `GET /models` and `GET /metrics` now and then, and about 5%
   bad requests (malformed JSON, wrong shape, NaN, unknown model, a body declared over the size limit),
   each with the status it must get. Any other status (and any 5xx, any broken connection) is counted.
   A warm-up of the same mix runs first. The server's RSS (`VmRSS` in `/proc/<pid>/status`) is sampled
   every second.
3. Overload: `--overload-requests` concurrent 256-row `/predict` requests sent at once, far more rows than
   the default queue bound (4,096 rows per model) holds: every answer must be 200 or 503, and every 503
   must carry `Retry-After`.
4. Prints RSS at the start (after the warm-up), its maximum and its end, the slope over the second half of
   the soak (MB per 10k requests), RSS every 10% of the requests, the statuses, and writes it all as JSON
   under `bench/results/`. Exit status 1 when any answer was not the expected one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import tritonclient.http as triton

from bench.server import serve_subprocess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODELS_FOLDER = ROOT / "models"
# Larger than the server's default body limit (32 MiB): declared in Content-Length, refused before reading.
OVERSIZED_BYTES = 33 * 1024 * 1024
SAMPLE_SECONDS = 1.0


class SoakError(RuntimeError):
    """The soak cannot run as it should (the server went away, a response could not be parsed)."""


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One prepared HTTP/1.1 request and the status it must get."""

    kind: str
    raw: bytes
    expected: int
    # The server answers before reading the body: send the head alone on a connection of its own.
    one_off: bool = False


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
) -> bytes:
    """The request's bytes; `content_length` declares another length than the body's."""
    lines = [f"{method} {path} HTTP/1.1", "Host: soak"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if method == "POST":
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_post(path: str, content: Any) -> bytes:
    return http_request("POST", path, orjson.dumps(content), {"Content-Type": "application/json"})


@dataclass(frozen=True)
class SoakModel:
    """A shipped model and how to make example rows for it."""

    name: str
    labels: tuple[str, ...] | None  # None: regression

    def rows(self, rng: np.random.Generator, count: int) -> list[Any]:
        """`count` rows as `/predict` takes them (waves: ragged lists of steps)."""
        if self.name == "digits":
            return list(rng.integers(0, 17, size=(count, 64)).astype(float).tolist())
        if self.name == "wine":
            return list((rng.normal(size=(count, 13)) + 5).round(3).tolist())
        if self.name == "diabetes":
            return list((rng.normal(size=(count, 10)) * 10 + 50).round(2).tolist())
        return [rng.normal(size=int(rng.integers(5, 60))).round(3).tolist() for _ in range(count)]

    def v2_tensors(self, rows: list[Any]) -> list[tuple[str, np.ndarray]]:
        """The same rows as V2 input tensors (waves: right-padded `sequence` and its `mask`)."""
        if self.name == "digits":
            return [("image", np.asarray(rows, np.float32).reshape(-1, 1, 8, 8))]
        if self.name != "waves":
            return [("features", np.asarray(rows, np.float32))]
        steps = max(len(row) for row in rows)
        sequence = np.zeros((len(rows), steps, 1), np.float32)
        mask = np.zeros((len(rows), steps), bool)
        for i, row in enumerate(rows):
            sequence[i, : len(row), 0] = row
            mask[i, : len(row)] = True
        return [("sequence", sequence), ("mask", mask)]

    def targets(self, rng: np.random.Generator, count: int) -> list[Any]:
        if self.labels is None:
            return list(rng.normal(150, 50, size=count).round(1).tolist())
        return [self.labels[i] for i in rng.integers(0, len(self.labels), size=count)]


MODELS = (
    SoakModel("digits", tuple(str(i) for i in range(10))),
    SoakModel("wine", ("class_0", "class_1", "class_2")),
    SoakModel("diabetes", None),
    SoakModel("waves", ("sine", "square", "sawtooth", "triangle")),
)
V2_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL"}


def v2_json(model: SoakModel, rows: list[Any]) -> bytes:
    tensors = model.v2_tensors(rows)
    inputs = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": V2_DATATYPES[array.dtype],
            "data": array.ravel(),
        }
        for name, array in tensors
    ]
    body = orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    return http_request("POST", f"/v2/models/{model.name}/infer", body, {"Content-Type": "application/json"})


def v2_binary(model_name: str, tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """Triton's binary tensor extension, body built by `tritonclient` as `bench.compare` does."""
    inputs = []
    for name, array in tensors:
        tensor = triton.InferInput(name, list(array.shape), V2_DATATYPES[array.dtype])
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    return http_request("POST", f"/v2/models/{model_name}/infer", body, headers)


def request_pool(rng: np.random.Generator) -> list[tuple[float, list[Request]]]:
    """The mix: (share of all requests, variants drawn from evenly); shares add up to 1."""
    good: dict[str, list[Request]] = {
        "predict 1 row": [],
        "predict 8-64 rows": [],
        "V2 JSON": [],
        "V2 binary": [],
        "evaluate": [],
    }
    for model in MODELS:
        for _ in range(4):
            one = model.rows(rng, 1)
            good["predict 1 row"].append(
                Request("predict 1 row", json_post("/predict", {"model": model.name, "inputs": one}), 200)
            )
            many = model.rows(rng, int(rng.integers(8, 65)))
            good["predict 8-64 rows"].append(
                Request(
                    "predict 8-64 rows", json_post("/predict", {"model": model.name, "inputs": many}), 200
                )
            )
            for rows in (one, many):
                good["V2 JSON"].append(Request("V2 JSON", v2_json(model, rows), 200))
                good["V2 binary"].append(
                    Request("V2 binary", v2_binary(model.name, model.v2_tensors(rows)), 200)
                )
            count = int(rng.integers(2, 17))
            evaluate = {
                "model": model.name,
                "inputs": model.rows(rng, count),
                "labels": model.targets(rng, count),
            }
            good["evaluate"].append(Request("evaluate", json_post("/evaluate", evaluate), 200))

    wine_row = MODELS[1].rows(rng, 1)[0]
    nan_rows = np.asarray([wine_row, wine_row], np.float32)
    nan_rows[1, 3] = np.nan
    bad = [
        Request(
            "bad: malformed JSON",
            http_request("POST", "/predict", b'{"model": "wine", "inputs": [[1, 2', {}),
            400,
        ),
        Request("bad: wrong shape", json_post("/predict", {"model": "wine", "inputs": [wine_row[:7]]}), 400),
        Request(
            "bad: NaN", json_post("/predict", {"model": "wine", "inputs": [["NaN", *wine_row[1:]]]}), 400
        ),
        Request("bad: NaN", v2_binary("wine", [("features", nan_rows)]), 400),
        Request("bad: unknown model", json_post("/predict", {"model": "nope", "inputs": [wine_row]}), 404),
        Request("bad: unknown model", v2_binary("nope", [("features", nan_rows[:1])]), 404),
        Request(
            "bad: oversized body",
            http_request("POST", "/predict", b"", {"Content-Type": "application/json"}, OVERSIZED_BYTES),
            413,
            one_off=True,
        ),
    ]
    return [
        (0.30, good["predict 1 row"]),
        (0.20, good["predict 8-64 rows"]),
        (0.15, good["V2 JSON"]),
        (0.20, good["V2 binary"]),
        (0.05, good["evaluate"]),
        (0.025, [Request("GET /models", http_request("GET", "/models"), 200)]),
        (0.025, [Request("GET /metrics", http_request("GET", "/metrics"), 200)]),
        (0.05, bad),
    ]


def draw(pool: list[tuple[float, list[Request]]], count: int, rng: np.random.Generator) -> list[Request]:
    """`count` requests drawn from the mix."""
    shares = np.asarray([share for share, _ in pool])
    groups = rng.choice(len(pool), size=count, p=shares / shares.sum())
    return [pool[g][1][int(rng.integers(0, len(pool[g][1])))] for g in groups]


# --------------------------------------------------------------------------------------------- client
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        body = b"".join(chunks)
    else:
        raise SoakError(f"response without a length: {status_line}")
    return Response(int(status_line.split()[1]), headers, body)


async def send_one_off(port: int, raw: bytes) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


@dataclass
class Tally:
    """What the soak saw: statuses per kind, mismatches, requests done."""

    done: int = 0
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    mismatches: Counter[str] = field(default_factory=Counter)
    mismatch_examples: list[str] = field(default_factory=list)

    def record(self, request: Request, response: Response | None, error: str = "") -> None:
        self.done += 1
        status = response.status if response is not None else 0
        self.statuses.setdefault(request.kind, Counter())[status] += 1
        if status != request.expected or status >= 500:
            key = f"{request.kind}: expected {request.expected}, got {status or error}"
            self.mismatches[key] += 1
            if len(self.mismatch_examples) < 10 and response is not None:
                self.mismatch_examples.append(f"{key}: {response.body[:200]!r}")


async def run_mix(port: int, requests: list[Request], connections: int, tally: Tally) -> float:
    """Closed-loop clients on keep-alive connections until every request is answered; returns seconds."""
    queue = iter(requests)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in queue:
                if request.one_off:
                    tally.record(request, await send_one_off(port, request.raw))
                    continue
                try:
                    writer.write(request.raw)
                    response = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError) as error:
                    tally.record(request, None, type(error).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                tally.record(request, response)
                if response.headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ memory
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SoakError(f"no VmRSS for pid {pid}")


async def sample_rss(
    pid: int, tally: Tally, samples: list[tuple[float, int, float]], stop: asyncio.Event
) -> None:
    """(seconds since start, requests done, RSS MB) every `SAMPLE_SECONDS` until `stop` is set."""
    started = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - started, tally.done, rss_mb(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
    samples.append((time.perf_counter() - started, tally.done, rss_mb(pid)))


def memory_summary(samples: list[tuple[float, int, float]], requests: int) -> dict[str, Any]:
    """Start, max and end RSS; the least-squares slope over the second half (MB per 10k requests); RSS
    at every 10% of the requests (the first sample at or past it)."""
    done = np.asarray([s[1] for s in samples], float)
    rss = np.asarray([s[2] for s in samples])
    second_half = done >= requests / 2
    slope = (
        float(np.polyfit(done[second_half], rss[second_half], 1)[0]) * 10_000
        if second_half.sum() > 1
        else None
    )
    table = []
    for tenth in range(11):
        target = requests * tenth / 10
        index = int(np.argmax(done >= target))
        table.append(
            {"percent": tenth * 10, "requests_done": int(done[index]), "rss_mb": round(float(rss[index]), 1)}
        )
    return {
        "start_mb": round(float(rss[0]), 1),
        "max_mb": round(float(rss.max()), 1),
        "end_mb": round(float(rss[-1]), 1),
        "second_half_slope_mb_per_10k_requests": None if slope is None else round(slope, 3),
        "by_requests": table,
        "samples": [[round(t, 2), d, round(r, 2)] for t, d, r in samples],
    }


# ---------------------------------------------------------------------------------------------- overload
async def overload(port: int, count: int, rows: int, rng: np.random.Generator) -> dict[str, Any]:
    """`count` requests of `rows` digits rows, every connection opened first, then all sent at once."""
    body = {"model": "digits", "inputs": MODELS[0].rows(rng, rows)}
    raw = json_post("/predict", body)
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Response | str:
        try:
            writer.write(raw)
            return await read_response(reader)
        except (OSError, asyncio.IncompleteReadError) as error:
            return type(error).__name__
        finally:
            writer.close()

    started = time.perf_counter()
    answers = await asyncio.gather(*(send(r, w) for r, w in streams))
    seconds = time.perf_counter() - started
    statuses: Counter[str] = Counter(str(a.status) if isinstance(a, Response) else a for a in answers)
    refused = [a for a in answers if isinstance(a, Response) and a.status == 503]
    without_retry_after = sum("retry-after" not in a.headers for a in refused)
    return {
        "requests": count,
        "rows_per_request": rows,
        "seconds": round(seconds, 2),
        "statuses": dict(sorted(statuses.items())),
        "retry_after_values": sorted({a.headers.get("retry-after", "") for a in refused}),
        "503_without_retry_after": without_retry_after,
        "ok": set(statuses) <= {"200", "503"} and without_retry_after == 0,
    }


# -------------------------------------------------------------------------------------------------- main
async def soak(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    pool = request_pool(rng)
    warmup_tally = Tally()
    await run_mix(port, draw(pool, args.warmup, rng), args.connections, warmup_tally)

    tally = Tally()
    samples: list[tuple[float, int, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, tally, samples, stop))
    seconds = await run_mix(port, draw(pool, args.requests, rng), args.connections, tally)
    stop.set()
    await sampler

    results: dict[str, Any] = {
        "warmup": {"requests": args.warmup, "mismatches": dict(warmup_tally.mismatches)},
        "soak": {
            "requests": args.requests,
            "connections": args.connections,
            "seconds": round(seconds, 1),
            "requests_per_second": round(args.requests / seconds, 1),
            "statuses": {
                kind: {str(s): n for s, n in sorted(c.items())} for kind, c in sorted(tally.statuses.items())
            },
            "mismatches": dict(tally.mismatches),
            "mismatch_examples": tally.mismatch_examples,
        },
        "memory": memory_summary(samples, args.requests),
    }
    if args.overload_requests:
        results["overload"] = await overload(port, args.overload_requests, args.overload_rows, rng)
        results["rss_after_overload_mb"] = round(rss_mb(pid), 1)
    return results


def print_report(results: dict[str, Any]) -> None:
    soak_part, memory = results["soak"], results["memory"]
    print(
        f"\n{soak_part['requests']:,} requests in {soak_part['seconds']} s "
        f"({soak_part['requests_per_second']:,.0f} req/s, {soak_part['connections']} connections)\n"
    )
    print("| kind | statuses |\n|---|---|")
    for kind, counts in soak_part["statuses"].items():
        print(f"| {kind} | {', '.join(f'{s}: {n:,}' for s, n in counts.items())} |")
    print(
        f"\nRSS: start {memory['start_mb']} MB (after warm-up), max {memory['max_mb']} MB, "
        f"end {memory['end_mb']} MB; "
        f"slope over the second half {memory['second_half_slope_mb_per_10k_requests']} MB per 10k requests\n"
    )
    print("| requests done | RSS MB |\n|---:|---:|")
    for row in memory["by_requests"]:
        print(f"| {row['requests_done']:,} ({row['percent']}%) | {row['rss_mb']} |")
    mismatches = {**results["warmup"]["mismatches"], **soak_part["mismatches"]}
    print(f"\nmismatches (warm-up included): {sum(mismatches.values())}")
    for key, count in mismatches.items():
        print(f"  {count:,} × {key}")
    for example in soak_part["mismatch_examples"]:
        print(f"  e.g. {example}")
    if "overload" in results:
        over = results["overload"]
        print(
            f"\noverload: {over['requests']} concurrent {over['rows_per_request']}-row /predict "
            f"in {over['seconds']} s: {over['statuses']}, Retry-After {over['retry_after_values']}, "
            f"503 without Retry-After: {over['503_without_retry_after']} "
            f"({'ok' if over['ok'] else 'NOT ok'}); "
            f"RSS after it {results['rss_after_overload_mb']} MB"
        )


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the soak")
    parser.add_argument("--warmup", type=int, default=2_000, help="requests of the same mix before it")
    parser.add_argument("--connections", type=int, default=24, help="concurrent keep-alive clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overload-requests",
        type=int,
        default=600,
        help="concurrent requests of the overload test (0: skip it)",
    )
    parser.add_argument("--overload-rows", type=int, default=256, help="rows per overload request")
    args = parser.parse_args(argv)

    import uvloop

    started = datetime.now(UTC)
    with serve_subprocess(MODELS_FOLDER, {"MODELSERVE_WORKERS": "1"}) as (port, pid):
        results = uvloop.run(soak(port, pid, args))
    results |= {
        "date": started.isoformat(timespec="seconds"),
        "commit": commit(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg(),
    }
    print_report(results)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"soak-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    failed = results["soak"]["mismatches"] or results["warmup"]["mismatches"]
    return 1 if failed or not results.get("overload", {"ok": True})["ok"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
