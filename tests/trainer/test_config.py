"""Config schema: strict keys and types with messages naming the key, overrides, the search space."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.config import FloatParam, TrainConfig, load_config, metric_direction
from trainer.errors import ConfigError

from .helpers import REPO_ROOT

MINIMAL: dict[str, Any] = {"name": "m", "data": {"source": "iris"}}


def write(tmp_path: Path, config: dict[str, Any], suffix: str = ".json") -> Path:
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_with_a_search_section(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem
    assert config.search is not None


def test_defaults_fill_a_minimal_config() -> None:
    config = TrainConfig.model_validate(MINIMAL)
    assert (config.version, config.task, config.selection_metric) == (1, "classification", "accuracy")
    assert TrainConfig.model_validate({"name": "d", "data": {"source": "diabetes"}}).selection_metric == "r2"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**MINIMAL, "epochs": 3}, r"epochs: unknown key"),
        ({**MINIMAL, "optim": {"lr": 0.1, "learning_rate": 0.1}}, r"optim\.learning_rate: unknown key"),
        ({**MINIMAL, "optim": {"batch_size": "many"}}, r"optim\.batch_size: Input should be a valid integer"),
        (
            {**MINIMAL, "optim": {"optimizer": "rmsprop"}},
            r"optim\.optimizer: Input should be 'sgd', 'adam' or",
        ),
        ({**MINIMAL, "model": {"mlp": {"hidden_sizes": [0]}}}, r"model\.mlp\.hidden_sizes\.0"),
        ({**MINIMAL, "version": 0}, r"version: Input should be greater than or equal to 1"),
        ({**MINIMAL, "name": "Bad Name"}, r"name: String should match pattern"),
        ({"name": "m", "data": {"source": "csv"}}, r"data: data\.source 'csv' needs data\.path"),
        ({"name": "m", "data": {"source": "csv", "path": "x.csv"}}, r"needs data\.label"),
        ({**MINIMAL, "data": {"source": "iris", "split": {"train": 0.5}}}, r"must add up to 1"),
        ({**MINIMAL, "optim": {"selection_metric": "r2"}}, r"'r2' is not a classification metric"),
        ({**MINIMAL, "model": {"transformer": {"d_model": 30, "nhead": 4}}}, r"multiple of nhead"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, config))


def test_yaml_and_syntax_errors(tmp_path: Path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text("name: m\ndata: {source: wine}\noptim: {lr: 0.01}\n", encoding="utf-8")
    assert load_config(good).optim.lr == 0.01
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: m\ndata: [source: wine\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_with_overrides_revalidates_and_copies() -> None:
    config = TrainConfig.model_validate(MINIMAL)
    changed = config.with_overrides({"optim.lr": 0.05, "model.mlp.hidden_sizes": [8, 4]})
    assert (changed.optim.lr, changed.model.mlp.hidden_sizes) == (0.05, [8, 4])
    assert config.optim.lr == 1e-3  # the original is untouched
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'"):
        config.with_overrides({"optim.lrr": 0.1})
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be greater than 0"):
        config.with_overrides({"optim.lr": -1})


def test_search_space_is_parsed_and_checked() -> None:
    space = {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "optim.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
        "model.mlp.hidden_sizes": {"type": "categorical", "choices": [[8], [16, 8]]},
    }
    config = TrainConfig.model_validate({**MINIMAL, "search": {"metric": "f1_macro", "space": space}})
    assert config.search is not None
    assert isinstance(config.search.space["optim.lr"], FloatParam)
    assert config.search.direction is None  # the tuner resolves it with metric_direction
    assert metric_direction("f1_macro") == "maximize"
    assert metric_direction("mse") == "minimize"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}, r"unknown config key 'optim\.lrr'"),
        ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, r"log-scale range needs low > 0"),
        ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, r"must be below high"),
        ({"optim.optimizer": {"type": "categorical", "choices": ["adam", "lion"]}}, r"value 'lion'"),
        ({"optim.batch_size": {"type": "int", "low": 0, "high": 8}}, r"optim\.batch_size' value 0"),
        ({"optim.lr": {"type": "uniform", "low": 0, "high": 1}}, r"does not match any of the expected tags"),
        ({"data.source": {"type": "categorical", "choices": ["iris"]}}, r"cannot be tuned"),
    ],
)
def test_unsampleable_search_space_is_rejected(tmp_path: Path, space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**MINIMAL, "search": {"space": space}}))
