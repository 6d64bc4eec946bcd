"""Small configs and onnxruntime helpers shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from trainer.config import TrainConfig
from trainer.models import Pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]

# Per data source: a tiny, fast base (few epochs, small nets, no early stopping).
TINY: dict[str, dict[str, Any]] = {
    "wine": {"data": {"source": "wine"}, "model": {"mlp": {"hidden_sizes": [16]}}},
    "diabetes": {"data": {"source": "diabetes"}, "model": {"mlp": {"hidden_sizes": [16]}}},
    "digits": {"data": {"source": "digits"}, "model": {"cnn": {"channels": [4], "hidden_size": 16}}},
    "waves": {
        "data": {"source": "waves", "waves": {"n_samples": 120, "min_length": 5, "max_length": 30}},
        "model": {
            "rnn": {"hidden_size": 8},
            "transformer": {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16},
        },
    },
}


def tiny_config(source: str, epochs: int = 2, **sections: Any) -> TrainConfig:
    """A tiny config for `source`; keyword sections (`model={...}`) are merged one level deep."""
    data: dict[str, Any] = {
        "name": f"tiny-{source}",
        "seed": 0,
        "optim": {"epochs": epochs, "batch_size": 32, "lr": 0.01, "early_stopping_patience": None},
        **{key: dict(value) for key, value in TINY[source].items()},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(data)


def session(path: Path) -> ort.InferenceSession:
    """A one-thread CPU onnxruntime session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_outputs(model: Pipeline, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What the torch pipeline (preprocessing included) returns for the same raw feeds."""
    model.eval()
    return [t.numpy() for t in model.outputs(*(torch.from_numpy(v) for v in feeds.values()))]


def random_sequences(
    rng: np.random.Generator, batch: int, steps: int, channels: int = 1
) -> dict[str, np.ndarray]:
    """Right-padded random sequences with random lengths in 1..steps (one row always full length)."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    mask = np.arange(steps)[None, :] < lengths[:, None]
    sequence = (rng.standard_normal((batch, steps, channels)) * mask[:, :, None]).astype(np.float32)
    return {"sequence": sequence, "mask": mask}
