"""Training configs: pydantic models loaded from YAML or JSON.

Every model forbids unknown keys, so a typo fails with a message that names the key. A config is plain
data: `TrainConfig.with_overrides({"optim.lr": 0.01})` returns a re-validated copy, which is how the
tuner applies a trial's parameters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.model_card import MODEL_NAME_PATTERN, Modality, Task
from trainer.errors import ConfigError

BUILTIN_SOURCES: dict[str, tuple[Task, Modality]] = {
    "digits": ("classification", "image"),
    "iris": ("classification", "tabular"),
    "wine": ("classification", "tabular"),
    "breast_cancer": ("classification", "tabular"),
    "diabetes": ("regression", "tabular"),
    "waves": ("classification", "sequence"),
}
USER_SOURCES = ("csv", "npz")

CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "loss")
REGRESSION_METRICS = ("mse", "rmse", "mae", "r2", "loss")
# Metrics where a smaller value is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae"})


def metric_direction(metric: str) -> Literal["maximize", "minimize"]:
    """Whether a validation metric is better when larger (`maximize`) or smaller (`minimize`)."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------- data


class SplitConfig(_Strict):
    """Fractions of the rows in each split; they must add up to 1."""

    train: float = Field(0.7, gt=0, lt=1)
    validation: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {total:g}")
        return self


class WavesConfig(_Strict):
    """The generated waveform task: classify sine/square/sawtooth/triangle sequences of random length."""

    n_samples: int = Field(2000, ge=8, description="sequences to generate")
    min_length: int = Field(20, ge=4)
    max_length: int = Field(80, ge=4)
    min_cycles: float = Field(1.5, gt=0, description="fewest periods in one sequence")
    max_cycles: float = Field(4.0, gt=0)
    min_steps_per_cycle: float = Field(
        8.0, gt=0, description="caps the cycles of short sequences so every period has this many samples"
    )
    min_amplitude: float = Field(0.5, gt=0)
    max_amplitude: float = Field(2.0, gt=0)
    noise_std: float = Field(0.15, ge=0, description="gaussian noise, in units of the amplitude")

    @model_validator(mode="after")
    def _ranges(self) -> WavesConfig:
        for low, high in (("min_length", "max_length"), ("min_cycles", "max_cycles")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")
        if self.min_amplitude > self.max_amplitude:
            raise ValueError("min_amplitude must not exceed max_amplitude")
        return self


class DataConfig(_Strict):
    """Where the rows come from and how they are split.

    `source` is a built-in set (digits, iris, wine, breast_cancer, diabetes), the generated `waves`
    sequences, or a user file: `csv` (needs `path` and `label`) or `npz` (arrays `features_key` and
    `label`; a 4-D feature array [N, C, H, W] is treated as images).
    """

    source: Literal["digits", "iris", "wine", "breast_cancer", "diabetes", "waves", "csv", "npz"]
    path: Path | None = Field(None, description="the user's CSV or NPZ file")
    label: str | None = Field(None, description="label column (CSV) or label array name (NPZ)")
    features_key: str = Field("X", description="feature array name in an NPZ file")
    task: Task | None = Field(None, description="for user data; built-in sets fix their own task")
    class_names: list[str] | None = Field(None, description="names of the class indices 0..C-1 (user data)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    waves: WavesConfig = Field(default_factory=WavesConfig)

    @model_validator(mode="after")
    def _user_source_fields(self) -> DataConfig:
        if self.source in USER_SOURCES:
            if self.path is None:
                raise ValueError(f"data.source '{self.source}' needs data.path")
            if self.source == "csv" and not self.label:
                raise ValueError("data.source 'csv' needs data.label, the name of the label column")
        else:
            if self.path is not None:
                raise ValueError(f"data.path is only for csv/npz sources, not '{self.source}'")
            builtin_task = BUILTIN_SOURCES[self.source][0]
            if self.task is not None and self.task != builtin_task:
                raise ValueError(f"data.source '{self.source}' is a {builtin_task} task, not {self.task}")
        return self

    @property
    def resolved_task(self) -> Task:
        """The task: fixed by a built-in source, else `task` (classification when unset)."""
        if self.source in BUILTIN_SOURCES:
            return BUILTIN_SOURCES[self.source][0]
        return self.task or "classification"


# ------------------------------------------------------------------------------------ preprocessing


class ImagePreprocessing(_Strict):
    """Image steps folded into the graph, applied in this order: grayscale, denoise, binarize."""

    grayscale: bool = Field(False, description="convert 3-channel colour input to one luminance channel")
    denoise: Literal["none", "mean", "gaussian"] = Field("none", description="smoothing filter")
    denoise_kernel: int = Field(3, ge=3, le=9, description="odd kernel size of the smoothing filter")
    binarize_threshold: float | None = Field(None, description="pixels above become 1, others 0 (raw units)")

    @field_validator("denoise_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("denoise_kernel must be odd")
        return value


class AugmentationConfig(_Strict):
    """Random image transforms applied to training batches only (never to validation, test or export)."""

    rotation_degrees: float = Field(0.0, ge=0, le=180, description="rotate by up to ± this angle")
    scale_range: tuple[float, float] = Field((1.0, 1.0), description="zoom factor drawn from [low, high]")
    horizontal_flip: bool = False
    vertical_flip: bool = False
    noise_std: float = Field(0.0, ge=0, description="gaussian pixel noise, in raw pixel units")

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("scale_range must be (low, high) with 0 < low <= high")
        return value

    @property
    def enabled(self) -> bool:
        """True when any transform is switched on."""
        return bool(
            self.rotation_degrees
            or self.scale_range != (1.0, 1.0)
            or self.horizontal_flip
            or self.vertical_flip
            or self.noise_std
        )


class PreprocessingConfig(_Strict):
    """Feature scaling (fitted on the training split) and image steps; all of it ends up in the graph."""

    scaler: Literal["standardize", "minmax", "none"] = "standardize"
    image: ImagePreprocessing = Field(default_factory=ImagePreprocessing)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)


# -------------------------------------------------------------------------------------------- model


class MLPConfig(_Strict):
    """Fully connected network for tabular rows."""

    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 64])
    dropout: float = Field(0.1, ge=0, lt=1)


class CNNConfig(_Strict):
    """Small CNN: one block of two 3×3 convs per entry of `channels`, each halving H and W."""

    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32], min_length=1)
    hidden_size: int = Field(64, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)


class RNNConfig(_Strict):
    """GRU or LSTM over a right-padded sequence; the state at the last real step feeds the head."""

    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(1, ge=1, le=4)
    dropout: float = Field(0.0, ge=0, lt=1, description="between stacked layers and before the head")


class TransformerConfig(_Strict):
    """Transformer encoder with sinusoidal positions and masked mean pooling."""

    d_model: int = Field(32, ge=4)
    nhead: int = Field(4, ge=1)
    num_layers: int = Field(2, ge=1, le=8)
    dim_feedforward: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerConfig:
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of nhead ({self.nhead})")
        return self


Architecture = Literal["mlp", "cnn", "gru", "lstm", "transformer"]
DEFAULT_ARCHITECTURE: dict[Modality, Architecture] = {"tabular": "mlp", "image": "cnn", "sequence": "gru"}
ALLOWED_ARCHITECTURES: dict[Modality, tuple[Architecture, ...]] = {
    "tabular": ("mlp",),
    "image": ("cnn", "mlp"),
    "sequence": ("gru", "lstm", "transformer"),
}


class ModelConfig(_Strict):
    """The architecture (`auto` picks one for the kind of data) and each architecture's parameters."""

    architecture: Literal["auto", "mlp", "cnn", "gru", "lstm", "transformer"] = "auto"
    mlp: MLPConfig = Field(default_factory=MLPConfig)
    cnn: CNNConfig = Field(default_factory=CNNConfig)
    rnn: RNNConfig = Field(default_factory=RNNConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)


# -------------------------------------------------------------------------------------------- optim


class OptimConfig(_Strict):
    """Optimizer, schedule, epochs and early stopping."""

    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    schedule: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(10, ge=1, description="epochs between LR drops (step schedule)")
    gamma: float = Field(0.1, gt=0, le=1, description="LR multiplier at each drop (step schedule)")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the gradient norm (helps RNNs)")
    early_stopping_patience: int | None = Field(
        10, ge=1, description="stop after this many epochs without a better validation score; null: never"
    )
    selection_metric: str | None = Field(
        None, description="validation metric that picks the best epoch; default accuracy / r2"
    )


# ------------------------------------------------------------------------------------------- search


class FloatParam(_Strict):
    """A real number in [low, high], optionally sampled on a log scale.

    Random and Bayesian search sample the whole range; a grid search tries `grid_points` values spread
    evenly from low to high (geometrically when `log`).
    """

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    grid_points: int = Field(3, ge=2, le=50)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class IntParam(_Strict):
    """An integer in [low, high] on a grid of `step`."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class CategoricalParam(_Strict):
    """One of a list of values (numbers, strings, booleans or lists such as hidden sizes)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SearchConfig(_Strict):
    """The hyperparameter search space, consumed by `modeltrain tune`.

    Keys of `space` are dotted config paths (`optim.lr`, `model.mlp.hidden_sizes`); every value a
    parameter can take is checked against the config when the config loads.
    """

    metric: str | None = Field(None, description="validation metric to optimise; default optim's selection")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="default: minimize for loss/mse/rmse/mae, maximize otherwise"
    )
    space: dict[str, ParamSpec] = Field(min_length=1)


# -------------------------------------------------------------------------------------------- top


class TrainConfig(_Strict):
    """One training run: data, preprocessing, model, optimisation and (optionally) a search space."""

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="model name in the repository")
    version: int = Field(1, ge=1)
    description: str = ""
    seed: int = Field(0, ge=0)
    data: DataConfig
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        task = self.task
        known = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
        metrics = {"optim.selection_metric": self.optim.selection_metric}
        if self.search is not None:
            metrics["search.metric"] = self.search.metric
        for where, metric in metrics.items():
            if metric is not None and metric not in known:
                raise ValueError(f"{where} '{metric}' is not a {task} metric; use one of {', '.join(known)}")
        if self.search is not None:
            self._check_search_space(self.search)
        return self

    def _check_search_space(self, search: SearchConfig) -> None:
        # Try each extreme and each choice now, so a space that cannot be sampled fails at load time.
        for path, spec in search.space.items():
            if path.split(".")[0] in {"name", "version", "search", "data"}:
                raise ValueError(f"search.space key '{path}' cannot be tuned")
            candidates = list(spec.choices) if isinstance(spec, CategoricalParam) else [spec.low, spec.high]
            for value in candidates:
                try:
                    self.with_overrides({path: value}, check_search=False)
                except ConfigError as err:
                    raise ValueError(f"search.space '{path}' value {value!r}: {err}") from None

    @property
    def task(self) -> Task:
        """classification or regression."""
        return self.data.resolved_task

    @property
    def selection_metric(self) -> str:
        """The validation metric that picks the best epoch."""
        return self.optim.selection_metric or ("accuracy" if self.task == "classification" else "r2")

    def with_overrides(self, overrides: dict[str, Any], *, check_search: bool = True) -> TrainConfig:
        """Return a copy with dotted-path values replaced (`{"optim.lr": 0.01}`), validated again.

        Args:
            overrides: dotted config paths and their new values.
            check_search: also re-check the search space (off when checking the space itself).

        Raises:
            ConfigError: an unknown path, or a value the config rejects.
        """
        data = self.model_dump(mode="python")
        for path, value in overrides.items():
            _set_path(data, path, copy.deepcopy(value))
        if not check_search:
            data["search"] = None
        try:
            return TrainConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for the path 'a.b.c'; every key but the last must exist already."""
    keys = path.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"unknown config key '{where}' (in override '{path}')")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `dotted.key: message` (pydantic's own wording, without its URLs)."""
    lines = []
    for problem in err.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def load_config(path: Path) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or JSON (.json) config.

    Raises:
        ConfigError: unreadable file, bad syntax, or a value the schema rejects (naming the key).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err)}") from None
