"""Preprocessing as torch modules, fitted on the training split and exported inside the graph.

Clients therefore send raw features, pixels or samples. Image augmentation is here too, but it only
ever touches training batches and is never part of the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.model_card import Modality
from trainer.config import AugmentationConfig, PreprocessingConfig

# A feature whose training spread is below this is constant: centre it but do not divide by ~0.
MIN_SCALE = 1e-6
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class Standardize(nn.Module):
    """(x - mean) / std with statistics from the training split."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", torch.where(std < MIN_SCALE, torch.ones_like(std), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MinMax(nn.Module):
    """(x - min) / (max - min), so training values land in [0, 1]."""

    low: torch.Tensor
    span: torch.Tensor

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        span = high - low
        self.register_buffer("low", low)
        self.register_buffer("span", torch.where(span < MIN_SCALE, torch.ones_like(span), span))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.low) / self.span


class Grayscale(nn.Module):
    """RGB [N, 3, H, W] → luminance [N, 1, H, W] (ITU-R BT.601 weights)."""

    weights: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(dim=1, keepdim=True)


class Smooth(nn.Module):
    """Noise removal: a per-channel mean or gaussian filter with edge-replicating padding."""

    kernel: torch.Tensor

    def __init__(self, channels: int, kind: str, kernel_size: int) -> None:
        super().__init__()
        self.channels = channels
        self.pad = kernel_size // 2
        self.register_buffer(
            "kernel", smoothing_kernel(kind, kernel_size).expand(channels, 1, -1, -1).clone()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (self.pad, self.pad, self.pad, self.pad), mode="replicate")
        return F.conv2d(padded, self.kernel, groups=self.channels)


def smoothing_kernel(kind: str, size: int) -> torch.Tensor:
    """A normalised [1, 1, size, size] mean or gaussian (sigma = size / 4) kernel."""
    if kind == "mean":
        kernel = torch.ones(size, size)
    else:
        offsets = torch.arange(size, dtype=torch.float32) - size // 2
        bell = torch.exp(-(offsets**2) / (2 * (size / 4) ** 2))
        kernel = bell[:, None] * bell[None, :]
    return (kernel / kernel.sum()).view(1, 1, size, size)


class Binarize(nn.Module):
    """Pixels above the threshold become 1, the rest 0."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


def fit_preprocessing(
    config: PreprocessingConfig,
    modality: Modality,
    train_x: np.ndarray,
    train_mask: np.ndarray | None = None,
) -> tuple[nn.Sequential, list[dict[str, Any]]]:
    """Build the preprocessing module for raw inputs, fitting the scaler on the training split only.

    Args:
        config: which steps to apply.
        modality: tabular, image or sequence (sets the axes the scaler works over).
        train_x: raw training inputs.
        train_mask: true on real sequence steps, so padding does not bias the statistics.

    Returns:
        The module and one `{"kind", "params"}` description per step, for the model card.
    """
    steps: list[nn.Module] = []
    described: list[dict[str, Any]] = []
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    if modality == "image":
        image = config.image
        if image.grayscale and x.shape[1] == 3:
            steps.append(Grayscale())
            described.append({"kind": "grayscale", "params": {"weights": list(LUMA_WEIGHTS)}})
        if image.denoise != "none":
            channels = 1 if steps else x.shape[1]
            steps.append(Smooth(channels, image.denoise, image.denoise_kernel))
            described.append(
                {"kind": "denoise", "params": {"filter": image.denoise, "kernel": image.denoise_kernel}}
            )
        if image.binarize_threshold is not None:
            steps.append(Binarize(image.binarize_threshold))
            described.append({"kind": "binarize", "params": {"threshold": image.binarize_threshold}})
        with torch.no_grad():
            for step in steps:
                x = step(x)
    if config.scaler != "none":
        values, shape = _scaler_view(x, modality, train_mask)
        axis = _scaler_axis(modality)
        if config.scaler == "standardize":
            mean, std = values.mean(dim=0), values.std(dim=0, correction=0)
            steps.append(Standardize(mean.view(shape), std.view(shape)))
            described.append(
                {"kind": "standardize", "params": {"axis": axis, "mean": _floats(mean), "std": _floats(std)}}
            )
        else:
            low, high = values.min(dim=0).values, values.max(dim=0).values
            steps.append(MinMax(low.view(shape), high.view(shape)))
            described.append(
                {"kind": "minmax", "params": {"axis": axis, "min": _floats(low), "max": _floats(high)}}
            )
    return nn.Sequential(*steps), described


def _scaler_view(
    x: torch.Tensor, modality: Modality, mask: np.ndarray | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Rows to take statistics over, and the broadcast shape of the fitted statistics."""
    if modality == "image":  # one statistic per channel
        channels = x.shape[1]
        return x.transpose(0, 1).reshape(channels, -1).T, (channels, 1, 1)
    if modality == "sequence":  # one statistic per step channel, over real steps only
        real = torch.from_numpy(mask) if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        return x[real], (x.shape[2],)
    return x, (x.shape[1],)


def _scaler_axis(modality: Modality) -> str:
    return {"image": "per channel", "sequence": "per step channel", "tabular": "per feature"}[modality]


def _floats(values: torch.Tensor) -> list[float]:
    return [round(float(v), 7) for v in values.flatten()]


def augment_images(
    images: torch.Tensor, config: AugmentationConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random rotation, scaling, flips and pixel noise for one training batch (raw pixel units)."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(config.rotation_degrees)
    low, high = config.scale_range
    zoom = low + torch.rand(n, generator=generator) * (high - low)
    flip_x = _random_signs(n, config.horizontal_flip, generator)
    flip_y = _random_signs(n, config.vertical_flip, generator)
    # affine_grid maps output to input coordinates: dividing by the zoom enlarges the content.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.noise_std:
        out = out + config.noise_std * torch.randn(out.shape, generator=generator)
    return out


def _random_signs(n: int, enabled: bool, generator: torch.Generator) -> torch.Tensor:
    if not enabled:
        return torch.ones(n)
    return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
