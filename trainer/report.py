"""PNG report beside the card: training curves and the test confusion matrix (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np

DPI = 80


def plot_curves(history: list[dict[str, float]], metric: str, best_epoch: int, path: Path) -> None:
    """Training/validation loss and the validation selection metric per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    metric_ax.plot(epochs, [row[f"val_{metric}"] for row in history], color="tab:green")
    metric_ax.set(title=f"validation {metric}", xlabel="epoch")
    for ax in (loss_ax, metric_ax):
        ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_confusion(
    matrix: np.ndarray, labels: list[str], path: Path, title: str = "test confusion matrix"
) -> None:
    """Counts with true classes as rows and predictions as columns."""
    size = max(3.5, 0.45 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > threshold else "black"
        ax.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_predictions(y_true: np.ndarray, y_pred: np.ndarray, path: Path, **labels: Any) -> None:
    """Regression: predicted against true values on the test split."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(y_true, y_pred, s=8, alpha=0.6)
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle=":")
    ax.set(xlabel="true", ylabel="predicted", title=labels.get("title", "test predictions"))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
