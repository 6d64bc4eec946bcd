"""The two reference servers `bench.compare` measures modelserve against.

* `naive`: the FastAPI + onnxruntime server one writes first: a pydantic request model, one `session.run`
  per request in a plain `def` endpoint (FastAPI runs it in its thread pool, as its documentation advises
  for blocking calls), the answer a dict that FastAPI encodes. Same answer shape as `/predict`.
* `floor`: a raw ASGI app that reads the request body and answers a constant JSON body: what HTTP alone
  costs on this stack, the ceiling any endpoint can reach.

Both run under uvicorn with the options `modelserve serve` gives it (`app/cli.py`).

    python -m bench.servers naive --port 8001 --repository DIR
    python -m bench.servers floor --port 8002
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.model_card import CARD_FILENAME, ONNX_FILENAME

# What `modelserve serve` passes to uvicorn besides host, port and its logging configuration.
UVICORN_OPTIONS: dict[str, Any] = {"access_log": False, "server_header": False, "log_level": "warning"}

FLOOR_BODY = orjson.dumps({"model": "floor", "version": 1, "predictions": [{"label": "0", "index": 0}]})


class PredictRequest(BaseModel):
    model: str
    inputs: list[list[float]]


class _NaiveModel:
    def __init__(self, folder: Path) -> None:
        card = json.loads((folder / CARD_FILENAME).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / ONNX_FILENAME), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.version = int(folder.name)
        self.labels: list[str] = card["labels"]
        self.input_name: str = card["inputs"][0]["name"]
        self.row_shape: list[int] = card["inputs"][0]["shape"][1:]


def naive_app(repository: Path) -> FastAPI:
    """The naive server over the highest version of each model in `repository`."""
    models: dict[str, _NaiveModel] = {}
    for graph in sorted(repository.glob(f"*/*/{ONNX_FILENAME}"), key=lambda path: int(path.parent.name)):
        models[graph.parent.parent.name] = _NaiveModel(graph.parent)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        model = models[request.model]
        features = np.asarray(request.inputs, dtype=np.float32).reshape(-1, *model.row_shape)
        probabilities = model.session.run(["probabilities"], {model.input_name: features})[0]
        best = probabilities.argmax(axis=1)
        predictions = [
            {"label": model.labels[i], "index": int(i), "score": float(row[i])}
            for row, i in zip(probabilities, best, strict=True)
        ]
        return {"model": request.model, "version": model.version, "predictions": predictions}

    return app


async def floor_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the request, answer `FLOOR_BODY`."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(FLOOR_BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("server", choices=["naive", "floor"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repository", type=Path, help="model repository (naive)")
    args = parser.parse_args(argv)
    app: Any = naive_app(args.repository) if args.server == "naive" else floor_app
    uvicorn.run(app, host="127.0.0.1", port=args.port, **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
