"""Preprocessing modules and image augmentation, one property each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import AugmentationConfig, ImagePreprocessing, PreprocessingConfig
from trainer.preprocessing import Binarize, Grayscale, Smooth, augment_images, fit_preprocessing


def test_sequence_statistics_ignore_padding() -> None:
    x = np.zeros((2, 4, 1), np.float32)
    x[0, :2, 0] = [1.0, 3.0]  # real steps of row 0; the rest is padding
    x[1, :4, 0] = [2.0, 2.0, 2.0, 2.0]
    mask = np.array([[True, True, False, False], [True, True, True, True]])
    module, steps = fit_preprocessing(PreprocessingConfig(scaler="standardize"), "sequence", x, mask)
    real = x[mask][:, 0]
    assert steps[0]["params"]["mean"] == pytest.approx([real.mean()])
    assert steps[0]["params"]["std"] == pytest.approx([real.std()])
    assert module(torch.from_numpy(x)).shape == x.shape


def test_constant_features_are_centred_not_divided_by_zero() -> None:
    x = np.array([[5.0, 1.0], [5.0, 3.0]], np.float32)
    for scaler in ("standardize", "minmax"):
        module, _ = fit_preprocessing(PreprocessingConfig(scaler=scaler), "tabular", x)
        out = module(torch.from_numpy(x))
        assert torch.isfinite(out).all()
        assert out[:, 0].tolist() == [0.0, 0.0]


def test_image_statistics_are_per_channel() -> None:
    x = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 9.0)])[None].repeat(3, axis=0).astype(np.float32)
    x[0] += 1.0
    _, steps = fit_preprocessing(PreprocessingConfig(), "image", x)
    assert steps[0]["params"]["mean"] == pytest.approx(x.mean(axis=(0, 2, 3)).tolist())
    assert steps[0]["params"]["std"] == pytest.approx(x.std(axis=(0, 2, 3)).tolist())


def test_grayscale_smooth_binarize() -> None:
    rgb = torch.ones(1, 3, 4, 4)
    assert torch.allclose(Grayscale()(rgb), torch.ones(1, 1, 4, 4))
    constant = torch.full((2, 3, 5, 5), 7.0)
    for kind in ("mean", "gaussian"):
        assert torch.allclose(Smooth(3, kind, 3)(constant), constant)  # replicate padding: no dark border
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 9.0
    assert float(Smooth(1, "mean", 3)(spike)[0, 0, 2, 2]) == pytest.approx(1.0)
    assert Binarize(0.5)(torch.tensor([0.2, 0.5, 0.7])).tolist() == [0.0, 0.0, 1.0]
    config = PreprocessingConfig(
        image=ImagePreprocessing(grayscale=True, denoise="mean", binarize_threshold=4)
    )
    _, steps = fit_preprocessing(config, "image", np.ones((2, 3, 4, 4), np.float32))
    assert [s["kind"] for s in steps] == ["grayscale", "denoise", "binarize", "standardize"]


def test_augmentation_is_seeded_and_transforms_only_when_asked() -> None:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    identity = augment_images(images, AugmentationConfig(), torch.Generator().manual_seed(1))
    assert torch.allclose(identity, images, atol=1e-5)
    flipped = augment_images(
        images, AugmentationConfig(horizontal_flip=True), torch.Generator().manual_seed(1)
    )
    for before, after in zip(images, flipped, strict=True):
        assert torch.allclose(after, before, atol=1e-5) or torch.allclose(after, before.flip(-1), atol=1e-5)
    config = AugmentationConfig(rotation_degrees=20, scale_range=(0.9, 1.1), noise_std=0.1)
    first = augment_images(images, config, torch.Generator().manual_seed(2))
    assert torch.equal(first, augment_images(images, config, torch.Generator().manual_seed(2)))
    assert not torch.allclose(first, images, atol=1e-3)
    assert first.shape == images.shape
