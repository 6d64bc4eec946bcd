"""Servers in subprocesses for the benchmarks: `modelserve serve` (`bench.run`, `bench.evaluate_stream`,
`bench.compare`) and any other command that listens on a port (`bench.servers`)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def run_server(
    command: Sequence[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    cpus: str | None = None,
    ready_path: str = "/v2/health/ready",
    ready_timeout_seconds: float = 120,
) -> Iterator[int]:
    """Run `command` (a server listening on `port`); yield its pid once `GET ready_path` answers 200.

    Args:
        cpus: pin the server to these CPUs (`taskset -c`), e.g. "0".
    """
    pinned = ["taskset", "-c", cpus] if cpus is not None else []
    process = subprocess.Popen(
        [*pinned, *command], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + ready_timeout_seconds
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                connection.request("GET", ready_path)
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"server did not become ready: {' '.join(command)}")
            time.sleep(0.1)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serve_subprocess(
    repository: Path,
    settings: dict[str, str],
    *,
    source: Path | None = None,
    cpus: str | None = None,
    ready_timeout_seconds: float = 120,
) -> Iterator[tuple[int, int]]:
    """Start `modelserve serve` on a free port with `MODELSERVE_*` `settings`; yield (port, pid) once ready.

    Args:
        repository: the model repository to serve.
        settings: extra environment variables (e.g. `MODELSERVE_BATCHING`).
        source: run the server from another source tree (for side-by-side comparisons).
        cpus: pin the server to these CPUs (`taskset -c`).
        ready_timeout_seconds: longest wait for `/v2/health/ready` to answer 200.
    """
    port = free_port()
    env = {
        **os.environ,
        "MODELSERVE_MODEL_REPOSITORY": str(repository),
        "MODELSERVE_PORT": str(port),
        "MODELSERVE_LOG_LEVEL": "warning",
        **settings,
    }
    if source is not None:
        env["PYTHONPATH"] = str(source)
    command = [sys.executable, "-m", "app.cli", "serve"]
    with run_server(
        command, port, env=env, cwd=source, cpus=cpus, ready_timeout_seconds=ready_timeout_seconds
    ) as pid:
        yield port, pid
