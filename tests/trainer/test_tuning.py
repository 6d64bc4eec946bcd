"""`modeltrain tune`: space → sampler translation, each strategy end to end, pruning, and bad spaces.

Trials train a tiny MLP on the wine set for 3 epochs (tens of milliseconds each); the export of the
retrained best model is the slow part (a few seconds per strategy).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from app.model_card import CARD_FILENAME, ONNX_FILENAME, ModelCard
from trainer.cli import main
from trainer.config import FloatParam, TrainConfig
from trainer.errors import ConfigError
from trainer.search_space import float_grid, grid_values, resolve_search, suggest_overrides
from trainer.tuning import TRIALS_FILENAME, check_trials, make_objective, make_sampler, run_search

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3

BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "wine", "split": {"train": 0.6, "validation": 0.2, "test": 0.2}},
    "model": {"architecture": "mlp", "mlp": {"hidden_sizes": [16], "dropout": 0.0}},
    "optim": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.01, "early_stopping_patience": None},
}
# Four points: two learning rates, one of them far too small to learn anything in 3 epochs.
GRID_SPACE: dict[str, Any] = {
    "optim.lr": {"type": "categorical", "choices": [0.05, 1e-5]},
    "model.mlp.hidden_sizes": {"type": "categorical", "choices": [[8], [16, 8]]},
}
CONTINUOUS_SPACE: dict[str, Any] = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
    "optim.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
}


def make_config(space: dict[str, Any] | None, **search: Any) -> dict[str, Any]:
    """The tiny wine config as plain data, with a search section over `space` (none when None)."""
    config = dict(BASE)
    if space is not None:
        config["search"] = {"metric": "accuracy", "space": space, **search}
    copied: dict[str, Any] = json.loads(json.dumps(config))  # a deep copy: tests edit it freely
    return copied


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "tune.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def parse_cell(cell: str) -> Any:
    """A trials.csv parameter cell back to a value (numbers and lists are JSON, strings are bare)."""
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def read_trials(version_dir: Path) -> list[dict[str, str]]:
    with (version_dir / TRIALS_FILENAME).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------- space → sampler


def test_grid_values_enumerate_ints_and_choices() -> None:
    config = TrainConfig.model_validate(
        make_config(
            {
                "optim.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
                "optim.optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                "model.mlp.hidden_sizes": {"type": "categorical", "choices": [[8], [16, 8]]},
            }
        )
    )
    grid = grid_values(resolve_search(config).space)
    assert grid == {
        "optim.batch_size": [8, 16, 24, 32],
        "optim.optimizer": ["sgd", "adam"],
        # Lists are not optuna categorical types: they travel as JSON text and are decoded again.
        "model.mlp.hidden_sizes": ["[8]", "[16, 8]"],
    }
    assert isinstance(make_sampler("grid", resolve_search(config).space, 0, 4), optuna.samplers.GridSampler)


def test_grid_spreads_a_float_range_over_its_grid_points() -> None:
    space = resolve_search(TrainConfig.model_validate(make_config(CONTINUOUS_SPACE))).space
    grid = grid_values(space)
    # log scale, 3 points by default: low, the geometric mean, high
    assert grid["optim.lr"] == pytest.approx([1e-4, math.sqrt(1e-4 * 0.1), 0.1])
    assert grid["optim.batch_size"] == [8, 16, 24, 32]
    linear = FloatParam(type="float", low=0.0, high=0.4, grid_points=5)
    assert float_grid(linear) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert isinstance(make_sampler("grid", space, 0, 4), optuna.samplers.GridSampler)
    # The same space is sampled whole by the other strategies.
    assert isinstance(make_sampler("random", space, 0, 4), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("bayes", space, 0, 4), optuna.samplers.TPESampler)


def test_grid_refuses_an_enormous_grid() -> None:
    space = {
        "optim.batch_size": {"type": "int", "low": 1, "high": 10**12},
        "optim.epochs": {"type": "int", "low": 1, "high": 1000},
    }
    with pytest.raises(ConfigError, match="points"):
        grid_values(resolve_search(TrainConfig.model_validate(make_config(space))).space)


def test_suggested_overrides_are_config_values() -> None:
    space = resolve_search(
        TrainConfig.model_validate(
            make_config(CONTINUOUS_SPACE | {"model.mlp.hidden_sizes": GRID_SPACE["model.mlp.hidden_sizes"]})
        )
    ).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        overrides = suggest_overrides(study.ask(), space)
        assert 1e-4 <= overrides["optim.lr"] <= 0.1
        assert overrides["optim.batch_size"] in {8, 16, 24, 32}
        assert overrides["model.mlp.hidden_sizes"] in ([8], [16, 8])  # a list again, not its JSON text


def test_an_int_range_off_its_step_grid_keeps_to_the_grid() -> None:
    space = resolve_search(
        TrainConfig.model_validate(
            make_config({"optim.batch_size": {"type": "int", "low": 8, "high": 30, "step": 8}})
        )
    ).space
    assert grid_values(space) == {"optim.batch_size": [8, 16, 24]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    # No optuna warning about the range (filterwarnings = error would fail the test).
    assert {suggest_overrides(study.ask(), space)["optim.batch_size"] for _ in range(30)} == {8, 16, 24}


def test_search_defaults_follow_the_config() -> None:
    config = TrainConfig.model_validate(make_config(GRID_SPACE))
    assert resolve_search(config).metric == "accuracy"
    assert resolve_search(config).direction == "maximize"
    data = make_config(GRID_SPACE)
    data["search"].pop("metric")
    data["optim"]["selection_metric"] = "loss"
    search = resolve_search(TrainConfig.model_validate(data))
    assert (search.metric, search.direction) == ("loss", "minimize")


def test_no_search_section_and_no_trials_are_refused() -> None:
    with pytest.raises(ConfigError, match="no 'search:' section"):
        resolve_search(TrainConfig.model_validate(make_config(None)))
    with pytest.raises(ConfigError, match="--trials must be at least 1"):
        check_trials(0)


# ------------------------------------------------------------------------------------ pruning


def test_a_hopeless_trial_is_pruned() -> None:
    """A real study: a good trial first, then one whose learning rate cannot learn; the median pruner
    stops the second after its first epoch, through the epoch callback."""
    config = TrainConfig.model_validate(
        make_config({"optim.lr": {"type": "categorical", "choices": [0.05, 1e-6]}})
    )
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    study.enqueue_trial({"optim.lr": 0.05})
    study.enqueue_trial({"optim.lr": 1e-6})
    study.optimize(make_objective(config, resolve_search(config)), n_trials=2)

    good, hopeless = study.trials
    assert good.state == TrialState.COMPLETE
    assert sorted(good.intermediate_values) == list(range(1, EPOCHS + 1))  # one report per epoch, 1-based
    assert hopeless.state == TrialState.PRUNED
    assert hopeless.last_step == 1
    assert hopeless.intermediate_values[1] < good.intermediate_values[1]


# Each value passes the config on its own, but d_model 12 is not a multiple of nhead 8 (the transformer
# section is validated even for an MLP, which these values do not otherwise change).
CLASHING_SPACE: dict[str, Any] = {
    "model.transformer.d_model": {"type": "categorical", "choices": [32, 12]},
    "model.transformer.nhead": {"type": "categorical", "choices": [4, 8]},
}


def test_a_combination_the_config_rejects_fails_that_trial_only() -> None:
    config = TrainConfig.model_validate(make_config(CLASHING_SPACE))
    outcome = run_search(config, strategy="grid", n_trials=4)

    failed = [trial for trial in outcome.study.trials if trial.state == TrialState.FAIL]
    assert len(outcome.study.trials) == 4
    assert [trial.params for trial in failed] == [
        {"model.transformer.d_model": 12, "model.transformer.nhead": 8}
    ]
    assert "multiple of nhead" in failed[0].user_attrs["error"]
    assert outcome.summary()["n_failed"] == 1
    rows = list(csv.DictReader(outcome.trials_csv().decode().splitlines()))
    assert [row["state"] for row in rows].count("FAIL") == 1
    assert all(("multiple of nhead" in row["error"]) == (row["state"] == "FAIL") for row in rows)


def test_a_search_where_no_trial_completes_is_an_error() -> None:
    space = {
        path: {"type": "categorical", "choices": spec["choices"][1:]} for path, spec in CLASHING_SPACE.items()
    }
    config = TrainConfig.model_validate(make_config(space))
    with pytest.raises(ConfigError, match=r"no trial completed \(1 run\); first error: .*multiple of nhead"):
        run_search(config, strategy="grid", n_trials=3)


def test_same_seed_same_search_and_the_seed_matters() -> None:
    config = TrainConfig.model_validate(make_config(CONTINUOUS_SPACE))

    def trials(seed: int) -> list[tuple[dict[str, Any], float | None]]:
        outcome = run_search(config.with_overrides({"seed": seed}), strategy="random", n_trials=3)
        return [(trial.params, trial.value) for trial in outcome.study.trials]

    assert trials(0) == trials(0)
    assert [params for params, _ in trials(0)] != [params for params, _ in trials(1)]


def test_the_search_never_scores_the_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spies on the real functions: every split a trial scores is a validation split, never a test one."""
    import trainer.fit as fit

    real_prepare, real_score = fit.prepare_data, fit.score_split
    test_splits: list[Any] = []
    scored: list[Any] = []

    def prepare(config: TrainConfig) -> Any:
        dataset, splits = real_prepare(config)
        test_splits.append(splits.test)
        return dataset, splits

    def score(model: Any, split: Any, n_classes: int) -> Any:
        scored.append(split)
        return real_score(model, split, n_classes)

    monkeypatch.setattr(fit, "prepare_data", prepare)
    monkeypatch.setattr(fit, "score_split", score)
    config = TrainConfig.model_validate(make_config(CONTINUOUS_SPACE))
    run_search(config, strategy="random", n_trials=2, pruner=optuna.pruners.NopPruner())

    assert len(test_splits) == 2
    assert len(scored) == 2 * EPOCHS
    assert not any(split is test for split in scored for test in test_splits)


# ------------------------------------------------------------------------- each strategy, end to end


@pytest.mark.parametrize(
    ("strategy", "space", "n_trials"),
    [("grid", GRID_SPACE, 10), ("random", CONTINUOUS_SPACE, 3), ("bayes", CONTINUOUS_SPACE, 4)],
)
def test_tune_exports_the_best_validation_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str, space: dict[str, Any], n_trials: int
) -> None:
    config_path = write_config(tmp_path, make_config(space))
    output = tmp_path / "repo"
    argv = ["tune", str(config_path), "--strategy", strategy, "--trials", str(n_trials)]
    assert main([*argv, "--output", str(output), "--no-progress"]) == 0

    version_dir = output / "tiny" / "1"
    assert capsys.readouterr().out.strip() == str(version_dir)
    assert (version_dir / ONNX_FILENAME).is_file()
    card = ModelCard.read(version_dir / CARD_FILENAME)
    tuning = card.training["tuning"]
    rows = read_trials(version_dir)

    # The card's summary agrees with the table.
    assert tuning["strategy"] == strategy
    assert (tuning["metric"], tuning["direction"]) == ("accuracy", "maximize")
    assert tuning["trials"] == len(rows)
    assert tuning["n_complete"] == sum(row["state"] == "COMPLETE" for row in rows)
    assert tuning["n_pruned"] == sum(row["state"] == "PRUNED" for row in rows)
    assert tuning["n_complete"] + tuning["n_pruned"] + tuning["n_failed"] == len(rows)
    assert [int(row["number"]) for row in rows] == list(range(len(rows)))
    assert all(float(row["duration_seconds"]) >= 0 for row in rows)

    # The chosen trial is the completed one with the best validation score, and it is what was exported.
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    best_value = max(float(row["value"]) for row in complete)
    (chosen,) = [row for row in rows if row["best"] == "true"]
    assert chosen["state"] == "COMPLETE"
    assert float(chosen["value"]) == best_value == tuning["best_value"]
    assert int(chosen["number"]) == tuning["best_trial"]
    assert tuning["best_params"] == {path: parse_cell(chosen[path]) for path in space}
    exported_config = TrainConfig.model_validate(card.training["config"])
    for path, value in tuning["best_params"].items():
        section, *rest = path.split(".")
        node: Any = getattr(exported_config, section)
        for key in rest:
            node = getattr(node, key)
        assert node == value
    # Retraining the best config from scratch with the same seed reproduces its validation score.
    assert tuning["retrained_value"] == pytest.approx(best_value, abs=1e-12)
    assert card.metrics.validation["accuracy"] == pytest.approx(best_value, abs=1e-6)

    if strategy == "grid":
        # Exactly the grid, each point once, although --trials allowed more.
        seen = sorted(
            (parse_cell(row["optim.lr"]), parse_cell(row["model.mlp.hidden_sizes"])) for row in rows
        )
        grid = list(itertools.product(*(spec["choices"] for spec in space.values())))
        assert seen == sorted(grid)
        assert tuning["trials_requested"] == n_trials
        assert tuning["best_params"]["optim.lr"] == 0.05  # 1e-5 learns nothing in 3 epochs
    else:
        assert len(rows) == n_trials


# ---------------------------------------------------------------------------- bad spaces, CLI


def _drop_search(config: dict[str, Any]) -> None:
    config.pop("search")


def _one_grid_point(config: dict[str, Any]) -> None:
    config["search"]["space"]["optim.lr"] = {"type": "float", "low": 0.001, "high": 0.1, "grid_points": 1}


def _low_above_high(config: dict[str, Any]) -> None:
    config["search"]["space"]["optim.batch_size"] = {"type": "int", "low": 64, "high": 8}


def _empty_choices(config: dict[str, Any]) -> None:
    config["search"]["space"]["optim.optimizer"] = {"type": "categorical", "choices": []}


def _unknown_path(config: dict[str, Any]) -> None:
    config["search"]["space"]["optim.learning_rate"] = {"type": "float", "low": 0.001, "high": 0.1}


def _no_trials(config: dict[str, Any]) -> list[str]:
    return ["--trials", "0"]


@pytest.mark.parametrize(
    ("break_config", "message"),
    [
        (_drop_search, "no 'search:' section"),
        (_one_grid_point, "grid_points"),
        (_low_above_high, "low (64) must not exceed high (8)"),
        (_empty_choices, "choices"),
        (_unknown_path, "optim.learning_rate"),
        (_no_trials, "--trials must be at least 1"),
    ],
)
def test_bad_search_is_refused_before_anything_is_written(
    tmp_path: Path, break_config: Any, message: str
) -> None:
    config = make_config(GRID_SPACE)
    extra = break_config(config) or ["--trials", "2"]
    output = tmp_path / "repo"
    argv = [
        "tune",
        str(write_config(tmp_path, config)),
        "--strategy",
        "grid",
        *extra,
        "--output",
        str(output),
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("modeltrain: error:")
    assert message in lines[0]
    assert not output.exists()


def test_an_existing_version_is_refused_before_the_search(tmp_path: Path) -> None:
    existing = tmp_path / "repo" / "tiny" / "1"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine", encoding="utf-8")
    config_path = write_config(tmp_path, make_config(GRID_SPACE))
    argv = [
        "tune",
        str(config_path),
        "--strategy",
        "grid",
        "--trials",
        "2",
        "--output",
        str(tmp_path / "repo"),
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert "already exists; use --replace" in completed.stderr
    assert "trial 0" not in completed.stderr  # refused before the first trial
    assert sorted(path.name for path in existing.iterdir()) == ["keep.txt"]
