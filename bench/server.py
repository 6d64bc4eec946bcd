"""`modelserve serve` in a subprocess for the benchmarks (`bench.run`, `bench.evaluate_stream`)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_subprocess(
    repository: Path,
    settings: dict[str, str],
    *,
    source: Path | None = None,
    ready_timeout_seconds: float = 120,
) -> Iterator[tuple[int, int]]:
    """Start a server on a free port with `MODELSERVE_*` `settings`; yield (port, pid) once it is ready.

    Args:
        repository: the model repository to serve.
        settings: extra environment variables (e.g. `MODELSERVE_BATCHING`).
        source: run the server from another source tree (for side-by-side comparisons).
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
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=source,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + ready_timeout_seconds
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(10)
