"""`modelserve serve` (flags mirror settings; several workers share metrics) and the JSON log format."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.cli import build_parser
from app.observability import JsonFormatter, request_id_var
from app.settings import Settings
from tests.factories import free_socket


def test_every_setting_is_a_flag() -> None:
    parser, _ = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--max-batch-rows",
            "8",
            "--max-batch-delay-seconds",
            "0.001",
            "--no-batching",
            "--workers",
            "2",
        ]
    )
    assert (args.max_batch_rows, args.max_batch_delay_seconds, args.batching, args.workers) == (
        8,
        0.001,
        False,
        2,
    )
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        if name != "prometheus_multiproc_dir":
            assert "--" + name.replace("_", "-") in help_text, name


def test_json_log_lines_carry_the_request_id() -> None:
    token = request_id_var.set("req-42")
    try:
        record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        record.model = "clf"
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello you"
    assert line["request_id"] == "req-42"
    assert line["model"] == "clf"
    assert line["level"] == "info"
    assert line["time"].endswith("Z")


def _count(text: str, status: str) -> float:
    labels = f'endpoint="/predict",model="reg",status="{status}"'
    pattern = rf"^modelserve_request_duration_seconds_count{{{labels}}} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(90)
def test_several_workers_share_one_set_of_metrics(model_repository: Path, tmp_path: Path) -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSERVE_", "PROMETHEUS_"))}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    command = [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port)]
    command += ["--model-repository", str(model_repository), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = 0
        while ready < 5:  # both workers up: several consecutive ready answers on fresh connections
            assert time.monotonic() < deadline, "workers did not start"
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                ready = ready + 1 if httpx.get(f"{base}/v2/health/ready").status_code == 200 else 0
            except httpx.TransportError:
                ready = 0
            time.sleep(0.1)
        sent = 40
        for _ in range(sent):  # a fresh connection each time, so both workers get requests
            with httpx.Client(base_url=base) as client:
                assert (
                    client.post("/predict", json={"model": "reg", "inputs": [[1, 2, 3]]}).status_code == 200
                )
        for _ in range(4):  # any worker's /metrics shows the total of all workers
            text = httpx.get(f"{base}/metrics").text
            assert _count(text, "200") == sent
        # Both workers keep their values in the shared folder (one file per process and metric kind); the
        # second may still be loading models on a busy machine, so wait for it (upper bound only).
        while len({path.stem.rsplit("_", 1)[1] for path in tmp_path.glob("*.db")}) < 2:
            assert time.monotonic() < deadline + 30, sorted(p.name for p in tmp_path.glob("*.db"))
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        if process.stdout:
            process.stdout.close()
