"""The training loop: reproducible, early stopping, best weights, the epoch callback, divergence."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer.fit import TrainingDiverged, train_and_evaluate

from .helpers import tiny_config


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


def test_same_config_and_seed_give_the_same_run() -> None:
    """Augmentation, dropout and shuffling are all seeded: two runs agree bit for bit."""
    config = tiny_config(
        "digits",
        epochs=2,
        preprocessing={"augmentation": {"rotation_degrees": 10, "scale_range": [0.9, 1.1], "noise_std": 0.5}},
    )
    first = train_and_evaluate(config, progress=False)
    second = train_and_evaluate(config, progress=False)
    assert without_timing(first.history) == without_timing(second.history)
    assert first.validation_metrics == second.validation_metrics
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    other = train_and_evaluate(config.with_overrides({"seed": 1}), progress=False)
    assert without_timing(other.history) != without_timing(first.history)


def test_history_callback_and_best_epoch() -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    config = tiny_config("wine", epochs=4, optim={"selection_metric": "f1_macro"})
    result = train_and_evaluate(config, epoch_callback=lambda e, m: calls.append((e, m)), progress=False)
    assert [epoch for epoch, _ in calls] == [1, 2, 3, 4]
    assert set(calls[0][1]) == {"accuracy", "precision_macro", "recall_macro", "f1_macro", "loss"}
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "val_f1_macro", "lr"} <= set(result.history[0])
    best = max(range(4), key=lambda i: (result.history[i]["val_f1_macro"], -i))
    assert result.best_epoch == best + 1
    assert result.selection_metric == "f1_macro"
    assert result.selection_value == result.validation_metrics["f1_macro"] == calls[best][1]["f1_macro"]


def test_lower_is_better_metrics_are_negated_in_selection_value() -> None:
    result = train_and_evaluate(
        tiny_config("diabetes", epochs=2, optim={"selection_metric": "mse"}), progress=False
    )
    assert result.selection_direction == "minimize"
    assert result.selection_value == -result.validation_metrics["mse"]
    assert result.validation_metrics["mse"] == min(row["val_mse"] for row in result.history)


def test_validation_loss_can_select_the_best_epoch() -> None:
    """`selection_metric: loss` once clashed with the progress bar's own `loss` field."""
    result = train_and_evaluate(
        tiny_config("wine", epochs=2, optim={"selection_metric": "loss"}), progress=True
    )
    assert result.selection_value == -result.validation_metrics["loss"]
    assert result.validation_metrics["loss"] == min(row["val_loss"] for row in result.history)


def test_early_stopping_keeps_the_best_weights() -> None:
    # A learning rate too small to change anything: no epoch beats the first.
    config = tiny_config("wine", epochs=20, optim={"lr": 1e-12, "early_stopping_patience": 2})
    result = train_and_evaluate(config, progress=False)
    assert result.epochs_run == 3
    assert result.best_epoch == 1


class Stop(Exception):
    pass


def test_callback_exception_stops_training() -> None:
    seen: list[int] = []

    def callback(epoch: int, metrics: dict[str, Any]) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(tiny_config("wine", epochs=5), epoch_callback=callback, progress=False)
    assert seen == [1, 2]


def test_divergence_is_reported() -> None:
    config = tiny_config("diabetes", epochs=3, optim={"optimizer": "sgd", "lr": 10.0, "momentum": 0.99})
    with pytest.raises(TrainingDiverged, match=r"lower optim\.lr"):
        train_and_evaluate(config, progress=False)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_schedules_lower_the_learning_rate(schedule: str) -> None:
    config = tiny_config("wine", epochs=3, optim={"schedule": schedule, "step_size": 1, "gamma": 0.5})
    lrs = [row["lr"] for row in train_and_evaluate(config, progress=False).history]
    assert lrs[0] == 0.01
    assert lrs[2] < lrs[1] < lrs[0]
