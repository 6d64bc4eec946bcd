"""Train one config: `train_and_evaluate`, which `modeltrain fit` and every `modeltrain tune` trial run.

It trains on the training split and scores the validation split after every epoch; it never touches
the test split (`trainer.export.export_model` scores that once, when it exports the trained run).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from trainer.config import TrainConfig, metric_direction
from trainer.data import Dataset, Split, Splits, load_dataset, split_dataset
from trainer.distributed import SINGLE_PROCESS, DistContext, all_reduce_sum
from trainer.errors import TrainerError
from trainer.metrics import classification_scores, regression_scores
from trainer.models import Pipeline, build_network, resolve_architecture
from trainer.preprocessing import augment_images, fit_preprocessing

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(TrainerError):
    """The training loss became NaN or infinite (usually a learning rate that is too high)."""


@dataclass
class TrainResult:
    """What one training run produced.

    Attributes:
        model: the best-epoch `Pipeline` (preprocessing folded in), in eval mode.
        history: one dict per epoch: `epoch`, `train_loss`, `lr`, `seconds` and `val_<metric>` for each
            validation metric.
        best_epoch: the epoch (1-based) whose weights `model` holds.
        epochs_run: epochs trained before the end or early stopping.
        validation_metrics: validation scores of the best epoch (accuracy, precision_macro,
            recall_macro, f1_macro, loss; or mse, rmse, mae, r2, loss).
        selection_metric: name of the metric that picked the best epoch.
        selection_value: that metric at the best epoch, signed so that HIGHER IS ALWAYS BETTER
            (loss, mse, rmse and mae are negated); the raw value is `validation_metrics[selection_metric]`.
        selection_direction: `maximize` or `minimize` for the raw metric.
        dataset: the loaded data (labels, source, sizes).
        splits: the train/validation/test parts export uses.
        architecture: the network built (mlp, cnn, gru, lstm, transformer).
        preprocessing: one `{"kind", "params"}` per step folded into the model.
        train_seconds: wall time of the training loop.
        distributed: for a run of several processes, what the card's `training` records about it
            (`world_size`, `backend`, `device`, `batch_size_per_process`); empty for one process.
    """

    model: Pipeline
    history: list[dict[str, float]]
    best_epoch: int
    epochs_run: int
    validation_metrics: dict[str, float]
    selection_metric: str
    selection_value: float
    selection_direction: str
    dataset: Dataset
    splits: Splits
    architecture: str
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    distributed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Tensors:
    """One split as torch tensors; `y` is the loss target (standardized for regression)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows `index`, with sequences trimmed to the longest real length among them."""
        x, y = self.x[index], self.y[index]
        if self.mask is None:
            return x, y, None
        mask = self.mask[index]
        steps = max(1, int(mask.sum(dim=1).max()))
        return x[:, :steps], y, mask[:, :steps]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch and make torch pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)  # third-party code may use the global generator
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def prepare_data(config: TrainConfig) -> tuple[Dataset, Splits]:
    """Load and split the data a config names (seeded by `config.seed`)."""
    dataset = load_dataset(config.data, seed=config.seed)
    return dataset, split_dataset(dataset, config.data.split, seed=config.seed)


def _to_tensors(split: Split, target_mean: float, target_std: float, regression: bool) -> _Tensors:
    mask = split.mask()
    if regression:
        y = torch.from_numpy((split.y.astype(np.float32) - target_mean) / target_std).unsqueeze(1)
    else:
        y = torch.from_numpy(split.y)
    return _Tensors(torch.from_numpy(split.x), y, None if mask is None else torch.from_numpy(mask))


def _to_device(
    device: torch.device, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if device.type == "cpu":
        return x, y, mask
    return x.to(device), y.to(device), None if mask is None else mask.to(device)


@torch.no_grad()
def predict_raw(model: Pipeline, data: _Tensors) -> torch.Tensor:
    """Network outputs (logits, or standardized values) for every row, in eval mode, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        x, _, mask = _to_device(device, *data.rows(slice(start, start + EVAL_BATCH_SIZE)))
        chunks.append(model(x, mask).cpu())
    return torch.cat(chunks)


def score_split(model: Pipeline, split: Split, n_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """Scores of `model` on one split, plus its predictions (class indices or values in target units)."""
    regression = model.task == "regression"
    mean, std = float(model.target_mean), float(model.target_std)
    data = _to_tensors(split, mean, std, regression)
    raw = predict_raw(model, data)
    if not torch.isfinite(raw).all():
        raise TrainingDiverged("the model produced NaN or infinite outputs; lower optim.lr")
    if regression:
        loss = float(nn.functional.mse_loss(raw, data.y))
        predictions = (raw[:, 0] * std + mean).numpy()
        scores = regression_scores(split.y, predictions)
    else:
        loss = float(nn.functional.cross_entropy(raw, data.y))
        predictions = raw.argmax(dim=1).numpy()
        scores = classification_scores(split.y, predictions, n_classes)
    return {**scores, "loss": loss}, predictions


def _optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    optim = config.optim
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    optimizer_class = torch.optim.Adam if optim.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    optim = config.optim
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.epochs)
    if optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    return None


@dataclass(frozen=True)
class _Shard:
    """How one process of a distributed run walks the training split."""

    model: DistributedDataParallel
    sampler: DistributedSampler[int]
    batch_size: int


def _train_epoch(
    model: nn.Module,
    data: _Tensors,
    order: torch.Tensor,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    augment: bool,
    *,
    task: str,
    device: torch.device,
) -> tuple[float, int]:
    """One pass over the training rows `order`; returns the summed per-row loss and the row count."""
    model.train()
    loss_fn = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    total = 0.0
    for start in range(0, len(order), batch_size):
        x, y, mask = data.rows(order[start : start + batch_size])
        if augment:  # on the CPU, with this process's generator, before the batch moves to its device
            x = augment_images(x, config.preprocessing.augmentation, generator)
        x, y, mask = _to_device(device, x, y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x, mask), y)
        torch.autograd.backward(loss)  # under DDP this also averages the gradients over every process
        if config.optim.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
        optimizer.step()
        total += loss.item() * x.shape[0]
    return total, len(order)


def _shard(config: TrainConfig, model: Pipeline, train: _Tensors, context: DistContext) -> _Shard:
    """Wrap `model` in DDP and give this process its share of the training split.

    `optim.batch_size` stays the GLOBAL batch: each process takes `batch_size // world_size` rows per
    step and DDP averages the gradients, so one step sees as many rows as a single-process step and a
    config trains to the same quality whatever the process count. `DistributedSampler` reshuffles with
    `config.seed` + epoch (the same permutation on every rank) and pads the split so that every rank
    runs the same number of steps, as DDP requires.
    """
    per_process = max(1, config.optim.batch_size // context.world_size)
    if per_process * context.world_size != config.optim.batch_size and context.is_main:
        log.warning(
            "optim.batch_size %d is not a multiple of %d processes: each takes %d rows per step",
            config.optim.batch_size,
            context.world_size,
            per_process,
        )
    ddp = DistributedDataParallel(
        model, device_ids=[context.device] if context.device.type == "cuda" else None
    )
    sampler: DistributedSampler[int] = DistributedSampler(
        train,  # type: ignore[arg-type]  # only its length is used
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    return _Shard(ddp, sampler, per_process)


def build_pipeline(
    config: TrainConfig, dataset: Dataset, train: Split
) -> tuple[Pipeline, str, list[dict[str, Any]]]:
    """Fit preprocessing on the training split and put a freshly initialised network behind it."""
    architecture = resolve_architecture(config.model.architecture, dataset.modality)
    preprocess, steps = fit_preprocessing(config.preprocessing, dataset.modality, train.x, train.mask())
    with torch.no_grad():
        sample = preprocess(torch.from_numpy(train.x[:1]))
    n_out = len(dataset.labels or ()) if config.task == "classification" else 1
    network = build_network(architecture, config.model, tuple(sample.shape[1:]), n_out)
    target_mean, target_std = 0.0, 1.0
    if config.task == "regression":
        target_mean = float(train.y.mean())
        target_std = float(train.y.std()) or 1.0
        steps.append({"kind": "target_scale", "params": {"mean": target_mean, "std": target_std}})
    pipeline = Pipeline(
        preprocess,
        network,
        task=config.task,
        modality=dataset.modality,
        target_mean=target_mean,
        target_std=target_std,
    )
    return pipeline, architecture, steps


def train_and_evaluate(
    config: TrainConfig,
    *,
    epoch_callback: EpochCallback | None = None,
    progress: bool = True,
    distributed: DistContext = SINGLE_PROCESS,
) -> TrainResult:
    """Train on the training split, scoring the validation split after every epoch.

    Keeps the weights of the best epoch by `config.selection_metric` and stops early after
    `optim.early_stopping_patience` epochs without improvement. The test split is never used.

    Args:
        config: the run to train.
        epoch_callback: called as `epoch_callback(epoch, validation_metrics)` after each epoch (1-based);
            it may raise (e.g. `optuna.TrialPruned`) to abandon the run, and the exception propagates.
        progress: show a progress bar over epochs when stderr is a terminal (rank 0 only).
        distributed: this process's place in a torchrun job (`trainer.distributed.distributed_session`);
            every rank must call with the same config. The default trains in this process alone.

    Raises:
        DataError: the data cannot be loaded or split.
        ConfigError: the architecture does not fit the data.
        TrainingDiverged: the loss became NaN or infinite.
    """
    seed_everything(config.seed)
    dataset, splits = prepare_data(config)
    model, architecture, steps = build_pipeline(config, dataset, splits.train)
    regression = config.task == "regression"
    train = _to_tensors(splits.train, float(model.target_mean), float(model.target_std), regression)
    n_classes = len(dataset.labels or ())
    shard = None
    if distributed.enabled:
        # Same seed everywhere up to here: same split, preprocessing and initial weights on every rank
        # (DDP broadcasts rank 0's anyway). From here each rank draws its own dropout masks and
        # augmentations, seeded by seed + rank so the whole job is still reproducible.
        torch.manual_seed(config.seed + distributed.rank)
        model.to(distributed.device)
        shard = _shard(config, model, train, distributed)
    optimizer = _optimizer(config, model.parameters())
    scheduler = _scheduler(config, optimizer)
    generator = torch.Generator().manual_seed(config.seed + distributed.rank)
    augment = dataset.modality == "image" and config.preprocessing.augmentation.enabled
    metric = config.selection_metric
    sign = 1.0 if metric_direction(metric) == "maximize" else -1.0
    patience = config.optim.early_stopping_patience

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float]] | None = None
    started = time.perf_counter()
    show_bar = progress and distributed.is_main and sys.stderr.isatty()
    bar = tqdm(
        range(1, config.optim.epochs + 1), desc=config.name, unit="epoch", disable=not show_bar, leave=False
    )
    # The bar already shows each epoch; log lines would tear it, so they drop to DEBUG while it is up.
    epoch_log_level = logging.DEBUG if show_bar else logging.INFO
    log.info(
        "training %s: %s on %s (%d train / %d validation rows)",
        config.name,
        architecture,
        dataset.source,
        len(splits.train),
        len(splits.validation),
    )
    for epoch in bar:
        epoch_started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        net: nn.Module = model
        batch_size = config.optim.batch_size
        if shard is None:
            order = torch.randperm(len(train), generator=generator)
        else:
            shard.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same one on every rank
            net, order, batch_size = shard.model, torch.tensor(list(shard.sampler)), shard.batch_size
        total, rows = _train_epoch(
            net,
            train,
            order,
            batch_size,
            optimizer,
            config,
            generator,
            augment,
            task=config.task,
            device=distributed.device,
        )
        # Under DDP every rank gets the same mean loss, so a divergence stops all of them together.
        loss_sum, row_count = all_reduce_sum(distributed, [total, rows])
        train_loss = loss_sum / row_count
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} at epoch {epoch}; lower optim.lr")
        if scheduler is not None:
            scheduler.step()
        # Under DDP every rank scores the whole validation split (it is small) with the same weights:
        # DDP keeps the parameters identical on every rank and the network has no per-rank state
        # (no batch norm), so every rank gets the same metrics and takes the same best-epoch and
        # early-stopping decisions without exchanging them; a rank 0 that decided alone would need a
        # broadcast every epoch and one more way to fail (a divergence raised on rank 0 only).
        val_metrics, _ = score_split(model, splits.validation, n_classes)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                **{f"val_{name}": value for name, value in val_metrics.items()},
                "lr": lr,
                "seconds": time.perf_counter() - epoch_started,
            }
        )
        value = sign * val_metrics[metric]
        if best is None or value > best[0]:
            best = (value, epoch, copy.deepcopy(model.state_dict()), val_metrics)
        bar.set_postfix({"loss": f"{train_loss:.4f}", f"val_{metric}": f"{val_metrics[metric]:.4f}"})
        log.log(
            epoch_log_level,
            "epoch %d: train_loss %.4f val_%s %.4f",
            epoch,
            train_loss,
            metric,
            val_metrics[metric],
        )
        if epoch_callback is not None:
            epoch_callback(epoch, dict(val_metrics))
        if patience is not None and epoch - best[1] >= patience:
            log.info("early stop after epoch %d: no better val_%s since epoch %d", epoch, metric, best[1])
            break
    bar.close()
    assert best is not None  # epochs >= 1
    model.load_state_dict(best[2])
    model.to("cpu")  # export and scoring run on the CPU; a no-op unless the run trained on a GPU
    model.eval()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best[1],
        epochs_run=len(history),
        validation_metrics=best[3],
        selection_metric=metric,
        selection_value=best[0],
        selection_direction=metric_direction(metric),
        dataset=dataset,
        splits=splits,
        architecture=architecture,
        preprocessing=steps,
        train_seconds=time.perf_counter() - started,
        distributed=_distributed_info(distributed, shard),
    )


def _distributed_info(context: DistContext, shard: _Shard | None) -> dict[str, Any]:
    if shard is None:
        return {}
    return {
        "world_size": context.world_size,
        "backend": context.backend,
        "device": context.device.type,
        "batch_size_per_process": shard.batch_size,
    }
