"""Against a real uvicorn on a free port.

Hundreds of concurrent requests of random sizes each get exactly their own rows' predictions (the oracle is a
direct onnxruntime call), and batching shows in the metrics.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.factories import reference_outputs

N_REQUESTS = 300


def batch_count(metrics_text: str, model: str) -> float:
    match = re.search(rf'^modelserve_batch_rows_count{{model="{model}"}} (\S+)$', metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def make_request(rng: np.random.Generator, i: int) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """A random request and the arrays a direct onnxruntime call would get for it."""
    n = int(rng.integers(1, 9))
    kind = ["clf", "reg", "multi", "seq"][i % 4]
    if kind == "clf":
        x = rng.normal(size=(n, 4)).astype(np.float32)
        return kind, {"model": "clf", "inputs": x.tolist(), "top_k": 2}, {"features": x}
    if kind == "reg":
        x = rng.normal(size=(n, 3)).astype(np.float32)
        return kind, {"model": "reg", "inputs": x.tolist()}, {"features": x}
    if kind == "multi":
        a, b = rng.normal(size=(n, 2)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32)
        return kind, {"model": "multi", "inputs": {"a": a.tolist(), "b": b.tolist()}}, {"a": a, "b": b}
    length = int(rng.integers(1, 6))  # one length per request; requests of different lengths share batches
    s = rng.normal(size=(n, length, 2)).astype(np.float32)
    return kind, {"model": "seq", "inputs": s.tolist()}, {"sequence": s, "mask": np.ones((n, length), bool)}


def check(kind: str, answer: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    predictions = answer["predictions"]
    if kind in ("reg", "multi"):
        values = [p["value"] for p in predictions]
        np.testing.assert_allclose(values, expected["value"], rtol=1e-5, atol=1e-6)
        return
    probabilities = expected["probabilities"]
    assert [p["index"] for p in predictions] == expected["label_index"].tolist()
    np.testing.assert_allclose(
        [p["score"] for p in predictions], probabilities.max(axis=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.timeout(120)
def test_concurrent_requests_each_get_their_own_rows(live_server: str, model_repository: Path) -> None:
    rng = np.random.default_rng(7)
    requests = [make_request(rng, i) for i in range(N_REQUESTS)]
    version = {"clf": 2, "reg": 1, "multi": 1, "seq": 1}

    async def run_all() -> tuple[list[httpx.Response], str, str]:
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
        async with httpx.AsyncClient(base_url=live_server, limits=limits, timeout=60) as client:
            before = (await client.get("/metrics")).text
            responses = await asyncio.gather(*(client.post("/predict", json=body) for _, body, _ in requests))
            after = (await client.get("/metrics")).text
            return list(responses), before, after

    responses, before, after = asyncio.run(run_all())
    for (kind, _, arrays), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        check(kind, response.json(), reference_outputs(model_repository, kind, version[kind], arrays))

    # Several requests shared one onnxruntime call: fewer batches than requests.
    for kind in ("clf", "reg", "multi", "seq"):
        sent = sum(1 for k, _, _ in requests if k == kind)
        batches = batch_count(after, kind) - batch_count(before, kind)
        assert 0 < batches < sent, (kind, batches, sent)
