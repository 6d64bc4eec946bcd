"""`modeltrain fit` under torchrun: two gloo processes train as well as one, and only rank 0 exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard, sha256_of
from trainer.cli import main
from trainer.distributed import (
    SINGLE_PROCESS,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    choose_backend,
    distributed_session,
    is_main_process,
    launched_by_torchrun,
    torchrun_env,
)
from trainer.errors import ConfigError

from .helpers import REPO_ROOT, session

TORCHRUN = Path(sys.executable).parent / "torchrun"

# Wine, a small MLP, a global batch of 16 (8 per process with 2 processes), early stopping on.
CONFIG = {
    "name": "wine-ddp",
    "seed": 0,
    "data": {"source": "wine"},
    "model": {"architecture": "mlp", "mlp": {"hidden_sizes": [32, 16], "dropout": 0.1}},
    "optim": {
        "optimizer": "adamw",
        "lr": 0.005,
        "batch_size": 16,
        "epochs": 30,
        "early_stopping_patience": 10,
        "selection_metric": "loss",
    },
}


def torchrun(nproc: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    launcher = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
    # One thread per process on shared cores (and torchrun does not warn that it chose it for us).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "--standalone", "--nproc-per-node", str(nproc), "-m", "trainer.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_two_processes_train_as_well_as_one_and_only_rank_0_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "wine-ddp.json"
    config.write_text(json.dumps(CONFIG), encoding="utf-8")

    single_repo, ddp_repo = tmp_path / "single", tmp_path / "ddp"
    assert main(["-q", "fit", str(config), "--output", str(single_repo), "--threads", "1"]) == 0
    capsys.readouterr()
    done = torchrun(2, "fit", config, "--output", ddp_repo, "--threads", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "Warning" not in done.stderr, done.stderr

    version_dir = ddp_repo / "wine-ddp" / "1"
    # Only rank 0 exported: one version, one line on stdout, nothing else in the repository.
    assert done.stdout.strip().splitlines() == [str(version_dir)], (done.stdout, done.stderr)
    assert sorted(p.relative_to(ddp_repo).as_posix() for p in ddp_repo.rglob("*") if p.is_dir()) == [
        "wine-ddp",
        "wine-ddp/1",
    ]
    assert not list(ddp_repo.rglob(".*"))  # no staging or retired folders left
    # Rank 0 tells the story; the other rank trains quietly.
    assert done.stderr.count("training wine-ddp") == 1, done.stderr

    ddp = ModelCard.read(version_dir / CARD_FILENAME)
    single = ModelCard.read(single_repo / "wine-ddp" / "1" / CARD_FILENAME)
    assert ddp.onnx.sha256 == sha256_of(version_dir / ONNX_FILENAME)
    assert ddp.training["world_size"] == 2
    assert ddp.training["backend"] == "gloo"
    assert ddp.training["device"] == "cpu"
    assert ddp.training["batch_size_per_process"] == 8
    assert single.training["world_size"] == 1
    assert "backend" not in single.training  # a single-process card is unchanged

    # Same quality: DDP averages the gradients of a global batch of 16, as one process takes 16 rows.
    single_accuracy = single.metrics.test["accuracy"]
    ddp_accuracy = ddp.metrics.test["accuracy"]
    assert single_accuracy >= 0.9
    assert ddp_accuracy >= max(0.9, single_accuracy - 0.05), (ddp_accuracy, single_accuracy)
    assert ddp.metrics.validation["loss"] <= single.metrics.validation["loss"] + 0.1

    # The exported graph is the unwrapped module: plain inputs, servable as any other model.
    rows = np.random.default_rng(0).uniform(0.0, 10.0, size=(5, 13)).astype(np.float32)
    probabilities, label_index = session(version_dir / ONNX_FILENAME).run(None, {"features": rows})
    assert probabilities.shape == (5, 3)
    assert label_index.shape == (5,)


def test_outside_torchrun_the_session_is_one_process_and_collectives_are_no_ops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_session() as context:
        assert context is SINGLE_PROCESS
        assert not context.enabled
        assert context.is_main
        assert is_main_process()
        assert all_reduce_sum(context, [1.5, 3]) == [1.5, 3.0]
        assert broadcast_flag(context, True) is True
        barrier(context)
    assert not launched_by_torchrun()


def test_torchrun_environment_is_read_and_checked() -> None:
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    parsed = torchrun_env(env)
    assert parsed is not None
    assert (parsed.rank, parsed.local_rank, parsed.world_size, parsed.local_world_size) == (1, 1, 2, 2)
    assert launched_by_torchrun(env)
    assert not launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1"})  # `torchrun --nproc-per-node 1`
    assert torchrun_env({}) is None
    with pytest.raises(ConfigError, match="inconsistent"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not numeric"):
        torchrun_env({"WORLD_SIZE": "two"})


def test_backend_choice() -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert choose_backend("gloo", 1, 2) == ("gloo", torch.device("cpu"))
    if gpus < 2:
        # Not a GPU for every local process: auto falls back to gloo on the CPU, nccl is refused.
        assert choose_backend("auto", 1, 2) == ("gloo", torch.device("cpu"))
        with pytest.raises(ConfigError, match="use --backend gloo"):
            choose_backend("nccl", 1, 2)
    else:
        assert choose_backend("auto", 1, 2) == ("nccl", torch.device("cuda", 1))
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend("mpi", 0, 1)


def test_tune_refuses_to_run_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    output = tmp_path / "repo"
    config = REPO_ROOT / "configs" / "wine.yaml"
    status = main(["tune", str(config), "--strategy", "random", "--trials", "2", "--output", str(output)])
    assert status == 2
    assert "under torchrun use modeltrain fit" in capsys.readouterr().err
    assert not output.exists()
