"""Hyperparameter search on the validation split, then the best configuration retrained and exported.

The config's `search:` section declares the space (`trainer.search_space`), the validation metric and
its direction. Each trial applies its parameters to the config with `TrainConfig.with_overrides`, trains
with `train_and_evaluate` (which never sees the test split) and is scored on the validation split only.
A median pruner stops trials whose per-epoch validation score falls behind the median of earlier trials
at the same epoch. The best configuration is then trained again from scratch with the same seed and
exported with `export_model`; the trials table rides along as `trials.csv` and the card's
`training.tuning` section records the search.

One seed (the config's, or `--seed`) drives the sampler and every training run, so the same command gives
the same trials and the same exported model.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.export import export_model
from trainer.fit import TrainingDiverged, train_and_evaluate
from trainer.search_space import (
    Param,
    ResolvedSearch,
    decode_params,
    grid_values,
    resolve_search,
    suggest_overrides,
)

log = logging.getLogger(__name__)

Strategy = Literal["grid", "random", "bayes"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

TRIALS_FILENAME = "trials.csv"


# ------------------------------------------------------------------------------------ sampling


def make_sampler(
    strategy: Strategy, space: dict[str, Param], seed: int, n_trials: int
) -> optuna.samplers.BaseSampler:
    """The optuna sampler for a strategy, seeded.

    Args:
        strategy: `grid` (every point of a finite space), `random`, or `bayes` (TPE).
        space: the search space (grid needs it to enumerate the points).
        seed: sampler seed.
        n_trials: trial budget; TPE's random start-up phase is sized from it.

    Raises:
        ConfigError: unknown strategy, or a grid too large to enumerate.
    """
    if strategy == "grid":
        return optuna.samplers.GridSampler(grid_values(space), seed=seed)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy == "bayes":
        # TPE samples at random for its first n_startup_trials (default 10); with a small budget that
        # would be all of it, so model the results after a third of the trials (at least 2).
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, n_trials // 3)))
    raise ConfigError(f"unknown search strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def make_pruner(n_trials: int) -> optuna.pruners.BasePruner:
    """The default pruner: median pruning on the per-epoch validation score.

    A trial is abandoned when its best validation score so far is worse than the median of the completed
    trials' scores at the same epoch. Decisions wait for a few completed trials (a quarter of the budget,
    1 to 5) and skip the first epoch, whose scores say little about where a run ends up.
    """
    # Epochs are reported 1-based and pruning starts once a step reaches n_warmup_steps: 2 skips epoch 1.
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, n_trials // 4)), n_warmup_steps=2)


# ---------------------------------------------------------------------------------------- search


@dataclass
class SearchOutcome:
    """A finished search.

    Attributes:
        study: the optuna study (every trial, its params, value, state and intermediate scores).
        strategy: grid, random or bayes.
        search: the resolved space, metric and direction.
        n_trials_requested: the `--trials` budget (a grid stops early once every point ran).
        seconds: wall time of the search.
    """

    study: optuna.Study
    strategy: Strategy
    search: ResolvedSearch
    n_trials_requested: int
    seconds: float

    @property
    def best_trial(self) -> FrozenTrial:
        """The completed trial with the best validation score."""
        return self.study.best_trial

    @property
    def best_overrides(self) -> dict[str, Any]:
        """Config overrides of the best trial."""
        return decode_params(self.best_trial.params, self.search.space)

    def count(self, state: TrialState) -> int:
        """Number of trials that ended in `state`."""
        return sum(trial.state == state for trial in self.study.trials)

    def summary(self) -> dict[str, Any]:
        """The tuning summary recorded in the model card (`training.tuning`)."""
        best = self.best_trial
        return {
            "strategy": self.strategy,
            "sampler": type(self.study.sampler).__name__,
            "pruner": type(self.study.pruner).__name__,
            "trials": len(self.study.trials),
            "trials_requested": self.n_trials_requested,
            "n_complete": self.count(TrialState.COMPLETE),
            "n_pruned": self.count(TrialState.PRUNED),
            "n_failed": self.count(TrialState.FAIL),
            "metric": self.search.metric,
            "direction": self.search.direction,
            "split": "validation",
            "best_trial": best.number,
            "best_params": self.best_overrides,
            "best_value": best.value,
            "search_seconds": round(self.seconds, 2),
        }

    def trials_csv(self) -> bytes:
        """The trials table: one row per trial with its state, validation score, duration and params."""
        return trials_table(self.study.trials, self.search.space, best=self.best_trial.number)


def trials_table(trials: Sequence[FrozenTrial], space: dict[str, Param], *, best: int | None = None) -> bytes:
    """The trials table as CSV bytes, one row per trial.

    Columns: `number, state, value, duration_seconds, last_epoch, best, error`, then one per searched
    parameter (its dotted path; lists as JSON). `value` is the validation score a completed trial ended
    with, or the last reported epoch's score of a pruned one; `best` marks the selected trial.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", "value", "duration_seconds", "last_epoch", "best", "error", *space])
    for trial in trials:
        params = decode_params(trial.params, space)
        writer.writerow(
            [
                trial.number,
                trial.state.name,
                "" if trial.value is None else repr(trial.value),
                "" if trial.duration is None else f"{trial.duration.total_seconds():.3f}",
                trial.last_step if trial.last_step is not None else "",
                "true" if trial.number == best else "false",
                trial.user_attrs.get("error", ""),
                *(_csv_cell(params[path]) if path in params else "" for path in space),
            ]
        )
    return buffer.getvalue().encode("utf-8")


def _csv_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _TrialFailed(Exception):
    """A trial that cannot finish (a combination the config rejects, a diverging run); the search goes on."""


@contextmanager
def _quiet_trials() -> Iterator[None]:
    """Keep the search log to one line per trial.

    optuna logs every trial at INFO and a failed one with a traceback; `_log_trial` says the same in one
    line, so optuna is held to errors. Each trial's per-epoch lines from `trainer.fit` are held to warnings
    unless debug logging is on (`modeltrain -v`).
    """
    fit_logger = logging.getLogger("trainer.fit")
    previous_fit_level = fit_logger.level
    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not fit_logger.isEnabledFor(logging.DEBUG):
        fit_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous_verbosity)
        fit_logger.setLevel(previous_fit_level)


def make_objective(
    config: TrainConfig, search: ResolvedSearch, *, progress: bool = False
) -> Callable[[optuna.Trial], float]:
    """The objective a study optimises: train `config` with the trial's params, return the validation score.

    The score is the search metric of the epoch `train_and_evaluate` keeps (the model an export would
    ship). Each epoch's validation score is reported to the trial; when the pruner says so, the trial ends
    with `optuna.TrialPruned`. A combination the config rejects or a diverging run fails the trial (its
    reason kept as the `error` user attribute) without ending the search.
    """

    def objective(trial: optuna.Trial) -> float:
        overrides = suggest_overrides(trial, search.space)
        try:
            # check_search=False: the space was checked once already; a trial config needs no search.
            trial_config = config.with_overrides(overrides, check_search=False)
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            raise _TrialFailed(str(err)) from err

        def report(epoch: int, validation_metrics: dict[str, float]) -> None:
            trial.report(validation_metrics[search.metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"validation {search.metric} fell behind the median at epoch {epoch}"
                )

        try:
            result = train_and_evaluate(trial_config, epoch_callback=report, progress=progress)
        except TrainingDiverged as err:
            trial.set_user_attr("error", str(err))
            raise _TrialFailed(str(err)) from err
        return result.validation_metrics[search.metric]

    return objective


def _log_trial(n_trials: int, search: ResolvedSearch) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A study callback that logs one line per finished trial."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        params = ", ".join(
            f"{path}={value!r}" for path, value in decode_params(trial.params, search.space).items()
        )
        if trial.state == TrialState.COMPLETE:
            outcome = f"validation {search.metric} {trial.value:.4f} (best {study.best_value:.4f})"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned after epoch {trial.last_step}"
        else:
            reason = trial.user_attrs.get("error", trial.state.name.lower())
            log.warning(
                "trial %d (%d/%d): %s — failed: %s", trial.number, trial.number + 1, n_trials, params, reason
            )
            return
        log.info("trial %d (%d/%d): %s — %s", trial.number, trial.number + 1, n_trials, params, outcome)

    return callback


def check_trials(n_trials: int) -> None:
    """Refuse a trial budget below 1.

    Raises:
        ConfigError: `n_trials` < 1.
    """
    if n_trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {n_trials}")


def run_search(
    config: TrainConfig,
    *,
    strategy: Strategy,
    n_trials: int,
    pruner: optuna.pruners.BasePruner | None = None,
    progress: bool = False,
) -> SearchOutcome:
    """Search the config's space on the validation split.

    Args:
        config: a config with a `search:` section; its seed seeds the sampler and every trial.
        strategy: grid, random or bayes (TPE).
        n_trials: trial budget; a grid search stops once every grid point has run.
        pruner: defaults to `make_pruner(n_trials)`.
        progress: per-epoch progress bars inside each trial.

    Raises:
        ConfigError: no search section, a space the strategy cannot sample, `n_trials` < 1, or no trial
            completed.
    """
    check_trials(n_trials)
    search = resolve_search(config)
    sampler = make_sampler(strategy, search.space, config.seed, n_trials)
    requested = n_trials
    if strategy == "grid":
        grid_size = math.prod(len(values) for values in grid_values(search.space).values())
        if n_trials < grid_size:
            log.warning(
                "grid has %d points; --trials %d runs only a seeded random subset", grid_size, n_trials
            )
        n_trials = min(n_trials, grid_size)
    started = time.perf_counter()
    with _quiet_trials():
        study = optuna.create_study(
            direction=search.direction, sampler=sampler, pruner=pruner or make_pruner(n_trials)
        )
        study.optimize(
            make_objective(config, search, progress=progress),
            n_trials=n_trials,
            catch=(_TrialFailed,),
            callbacks=[_log_trial(n_trials, search)],
        )
    if not any(trial.state == TrialState.COMPLETE for trial in study.trials):
        errors = sorted({t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs})
        raise ConfigError(
            f"no trial completed ({len(study.trials)} run)"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    return SearchOutcome(
        study=study,
        strategy=strategy,
        search=search,
        n_trials_requested=requested,
        seconds=time.perf_counter() - started,
    )


# -------------------------------------------------------------------------------- tune + export


@dataclass
class TuneResult:
    """What `tune_and_export` produced: the search, the retrained best run and where it was exported."""

    outcome: SearchOutcome
    config: TrainConfig
    version_dir: Path
    retrained_value: float


def tune_and_export(
    config: TrainConfig,
    output_dir: Path,
    *,
    strategy: Strategy,
    n_trials: int,
    replace: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
    progress: bool = True,
    quantize: str | None = None,
) -> TuneResult:
    """Search, retrain the best configuration from scratch (same seed) and export it.

    Nothing is written to `output_dir` unless the search succeeds; `export_model` writes atomically.

    Args:
        config: a config with a `search:` section.
        output_dir: the model repository.
        strategy: grid, random or bayes.
        n_trials: trial budget.
        replace: overwrite an existing version.
        pruner: defaults to `make_pruner(n_trials)`.
        progress: progress bar for the final training run.
        quantize: `int8` to also export the quantized sibling model (see `export_model`).

    Raises:
        ConfigError: see `run_search`.
        ExportError: see `trainer.export.export_model`.
    """
    outcome = run_search(config, strategy=strategy, n_trials=n_trials, pruner=pruner)
    best_config = config.with_overrides(outcome.best_overrides)
    result = train_and_evaluate(best_config, progress=progress)
    metric = outcome.search.metric
    retrained = result.validation_metrics[metric]
    best_value = outcome.best_trial.value
    if best_value is None or not math.isclose(retrained, best_value, rel_tol=1e-6, abs_tol=1e-9):
        # Training is seeded and deterministic, so this points at nondeterminism worth knowing about.
        log.warning(
            "retraining the best trial gave validation %s %.6f, the trial had %s",
            metric,
            retrained,
            best_value,
        )
    summary = outcome.summary() | {"retrained_value": retrained}
    version_dir = export_model(
        result,
        best_config,
        output_dir,
        extra_files={TRIALS_FILENAME: outcome.trials_csv()},
        training_info={"tuning": summary},
        replace=replace,
        quantize=quantize,
    )
    log.info(
        "best of %d trials (%d pruned): %s — validation %s %.4f",
        summary["trials"],
        summary["n_pruned"],
        summary["best_params"],
        metric,
        retrained,
    )
    return TuneResult(outcome=outcome, config=best_config, version_dir=version_dir, retrained_value=retrained)
