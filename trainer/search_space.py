"""The search space of a config's `search:` section: its parameters, their grid, one trial's values.

Each parameter is a dotted config path with a float, int or categorical range; a trial's values become
config overrides (`TrainConfig.with_overrides`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna

from trainer.config import (
    CategoricalParam,
    FloatParam,
    IntParam,
    SearchConfig,
    TrainConfig,
    metric_direction,
)
from trainer.errors import ConfigError

Param = FloatParam | IntParam | CategoricalParam

# A grid is materialised in memory by optuna's GridSampler; refuse sizes no one would run to the end.
MAX_GRID_POINTS = 100_000
# optuna stores categorical choices as these types; anything else (lists such as hidden sizes) is
# passed to optuna as its JSON text and decoded again, which keeps optuna from warning about storage.
_PLAIN_CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class ResolvedSearch:
    """A config's search section with the defaults filled in.

    Attributes:
        space: dotted config path → parameter range, in the config's order.
        metric: validation metric every trial is scored by.
        direction: `maximize` or `minimize` for that metric.
    """

    space: dict[str, Param]
    metric: str
    direction: Literal["maximize", "minimize"]


def resolve_search(config: TrainConfig) -> ResolvedSearch:
    """The search section of `config`, defaults applied (metric: the config's selection metric).

    Raises:
        ConfigError: the config has no `search:` section.
    """
    search: SearchConfig | None = config.search
    if search is None:
        raise ConfigError(
            "the config has no 'search:' section; add one with a 'space' of dotted config paths to tune"
        )
    metric = search.metric or config.selection_metric
    direction = search.direction or metric_direction(metric)
    return ResolvedSearch(space=dict(search.space), metric=metric, direction=direction)


def float_grid(spec: FloatParam) -> list[float]:
    """`grid_points` values from low to high inclusive: evenly spaced, or evenly in log space when `log`."""
    steps = spec.grid_points - 1
    if spec.log:
        ratio = math.log(spec.high / spec.low)
        return [spec.low * math.exp(ratio * i / steps) for i in range(steps)] + [spec.high]
    return [spec.low + (spec.high - spec.low) * i / steps for i in range(steps)] + [spec.high]


def grid_values(space: dict[str, Param]) -> dict[str, list[Any]]:
    """Every value each parameter takes in a grid search (categorical choices encoded for optuna).

    Raises:
        ConfigError: the grid is too large.
    """
    grid: dict[str, Sequence[Any]] = {}
    for path, spec in space.items():
        if isinstance(spec, CategoricalParam):
            grid[path] = [_encode_choice(choice) for choice in spec.choices]
        elif isinstance(spec, IntParam):
            grid[path] = range(spec.low, spec.high + 1, spec.step)  # sized before it is listed
        else:
            grid[path] = float_grid(spec)
    size = math.prod(len(values) for values in grid.values())
    if size > MAX_GRID_POINTS:
        raise ConfigError(
            f"the search grid has {size:,} points (at most {MAX_GRID_POINTS:,}); coarsen its ranges"
        )
    return {path: list(values) for path, values in grid.items()}


def _encode_choice(choice: Any) -> Any:
    return choice if isinstance(choice, _PLAIN_CHOICE_TYPES) else json.dumps(choice)


def suggest_overrides(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Ask `trial` for one value of every parameter; returns config overrides (dotted path → value)."""
    overrides: dict[str, Any] = {}
    for path, spec in space.items():
        if isinstance(spec, FloatParam):
            overrides[path] = trial.suggest_float(path, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntParam):
            # The last value on the step grid: optuna warns (and does the same) when high is off the grid.
            high = spec.high - (spec.high - spec.low) % spec.step
            overrides[path] = trial.suggest_int(path, spec.low, high, step=spec.step)
        else:
            encoded = [_encode_choice(choice) for choice in spec.choices]
            picked = trial.suggest_categorical(path, encoded)
            overrides[path] = spec.choices[encoded.index(picked)]
    return overrides


def decode_params(params: dict[str, Any], space: dict[str, Param]) -> dict[str, Any]:
    """A finished trial's optuna params as config values (JSON-encoded categorical choices decoded)."""
    decoded: dict[str, Any] = {}
    for path, value in params.items():
        spec = space.get(path)
        if isinstance(spec, CategoricalParam):
            encoded = [_encode_choice(choice) for choice in spec.choices]
            value = spec.choices[encoded.index(value)]
        decoded[path] = value
    return decoded
