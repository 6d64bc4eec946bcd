"""The parts of `bench.compare` that need neither wrk nor servers: its request bodies and its reading of
wrk's output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.compare import MODELS, BenchError, BenchModel, parse_wrk_output, write_bodies, wrk_figures

# What `bench/wrk_post.lua` printed for a 1-second run against the HTTP floor (wrk 4.1.0).
WRK_STDOUT = """Running 1s test @ http://127.0.0.1:18777/
  1 threads and 4 connections
  12474 requests in 1.10s, 2.11MB read
Requests/sec:  11359.27
wrk-json {"requests": 12474, "duration_us": 1098134, "bytes": 2207898, "status_errors": 0, \
"connect_errors": 0, "read_errors": 0, "write_errors": 0, "timeouts": 0, "p50_us": 336.0, \
"p90_us": 414.0, "p99_us": 1012.0, "max_us": 4705.0}
"""


def test_wrk_report_is_read_into_rates_and_milliseconds() -> None:
    figures = wrk_figures(parse_wrk_output(WRK_STDOUT), rows=64)
    assert figures["requests_per_second"] == pytest.approx(11359.27, rel=1e-5)
    assert figures["rows_per_second"] == pytest.approx(64 * 11359.27, rel=1e-5)
    assert (figures["p50_ms"], figures["p99_ms"]) == (0.336, 1.012)
    assert figures["socket_errors"] == 0


def test_error_statuses_and_a_missing_report_stop_the_benchmark() -> None:
    report = parse_wrk_output(WRK_STDOUT) | {"status_errors": 3}
    with pytest.raises(BenchError, match="3 answers with status >= 400"):
        wrk_figures(report, rows=1)
    with pytest.raises(BenchError, match="no 'wrk-json ' line"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_every_body_carries_the_same_rows(model: BenchModel, tmp_path: Path) -> None:
    rows = model.rows(3)
    bodies = write_bodies(tmp_path, model, rows)
    expected = rows.astype(np.float32)

    predict = json.loads(bodies["predict"].path.read_bytes())
    assert predict["model"] == model.name
    assert np.array_equal(np.array(predict["inputs"], np.float32), expected.reshape(3, -1))

    (v2_input,) = json.loads(bodies["v2_json"].path.read_bytes())["inputs"]
    assert v2_input["shape"] == [3, *model.row_shape]
    assert v2_input["name"] == model.input_name
    assert np.array_equal(np.array(v2_input["data"], np.float32), expected.ravel())

    binary = bodies["v2_binary"]
    header = json.loads(binary.content[: binary.header_length])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == expected.nbytes
    tensor = np.frombuffer(binary.content[binary.header_length :], "<f4").reshape(expected.shape)
    assert np.array_equal(tensor, expected)
    assert binary.headers()["Inference-Header-Content-Length"] == str(binary.header_length)
