"""Built-in offline datasets that need no files: two moons, scikit-learn's 8x8 digits, natural-image patches.

``moons`` and ``digits`` are fixed datasets: their samples and train/val/test splits never depend on the
``seed`` argument, so a test set stays disjoint from every seed's training set. ``natural_patches`` is a
generated set and follows ``seed``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images, make_moons
from sklearn.model_selection import train_test_split
from torchvision.ops import roi_align

from data.base import TensorImageDataset

DATA_SEED = 0  # the fixed seed of the moons / digits samples and splits
MOONS_SIZES = {"train": 1000, "val": 500, "test": 1000}
MOONS_NOISE = 0.1
MOONS_MARGIN = 0.1  # the moons fill [0.1, 0.9]^2 of the unit square, leaving room around them
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # ITU-R 709 luminance, as skimage.color.rgb2gray


@functools.lru_cache(maxsize=1)
def _moons() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    total = sum(MOONS_SIZES.values())
    points, labels = make_moons(n_samples=total, noise=MOONS_NOISE, random_state=DATA_SEED)
    low, high = points.min(axis=0), points.max(axis=0)
    points = MOONS_MARGIN + (1 - 2 * MOONS_MARGIN) * (points - low) / (high - low)
    # make_moons orders samples by class; shuffle (fixed) so any prefix holds both moons
    order = np.random.RandomState(DATA_SEED).permutation(total)
    points, labels = torch.as_tensor(points[order], dtype=torch.float32), torch.as_tensor(labels[order])
    splits, start = {}, 0
    for split, size in MOONS_SIZES.items():
        splits[split] = (points[start:start + size], labels[start:start + size])
        start += size
    return splits


def load_moons(split: str) -> TensorImageDataset:
    """Two moons (sklearn.make_moons, noise 0.1) scaled into [0,1]^2: x is a (2,) vector, 2 classes."""
    points, labels = _moons()[split]
    return TensorImageDataset(points, labels, scale=1.0)


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # integer grey levels 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=DATA_SEED)
    return {split: (torch.from_numpy(x).unsqueeze(1), torch.as_tensor(y, dtype=torch.int64))
            for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y))}


def load_digits_set(split: str) -> TensorImageDataset:
    """scikit-learn's 8x8 digits, 1x8x8 in [0,1] (grey level / 16), stratified 80/20 train/test split."""
    if split not in ("train", "test"):
        raise ValueError("digits has splits train/test; for val pass val_fraction > 0")
    images, labels = _digits()[split]
    return TensorImageDataset(images, labels, scale=16.0)


def _photo_arrays() -> list[np.ndarray]:
    """Photographs that ship inside scikit-learn and scikit-image (no download), as uint8 arrays."""
    from skimage import data as skdata  # imported here: only natural_patches needs scikit-image

    photos = list(load_sample_images().images)  # china, flower
    for name in ("astronaut", "camera", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "moon",
                 "coins", "clock"):
        photos.append(getattr(skdata, name)())
    photos.append(skdata.stereo_motorcycle()[0])
    return photos


@functools.lru_cache(maxsize=2)
def _photos(channels: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Every photo as a pyramid of float (channels, H/2^k, W/2^k) tensors in [0,1], k = 0, 1, ...

    Grey photos are repeated to RGB, colour photos reduced to luminance for 1 channel. The pyramid lets a
    large crop be resized from the level where it is within sqrt(2) of the target size, so one bilinear
    sample per output pixel does not alias (mip-mapping).
    """
    if channels not in (1, 3):
        raise ValueError(f"natural_patches needs 1 or 3 channels, got {channels}")
    result = []
    for array in _photo_arrays():
        image = torch.tensor(array, dtype=torch.float32).div_(255.0)
        image = image.permute(2, 0, 1) if image.dim() == 3 else image.unsqueeze(0)
        if channels == 1 and image.shape[0] == 3:
            image = torch.einsum("chw,c->hw", image, torch.tensor(GREY_WEIGHTS)).unsqueeze(0)
        elif channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        levels = [image.contiguous()]
        while min(levels[-1].shape[1:]) >= 16:
            levels.append(F.avg_pool2d(levels[-1].unsqueeze(0), 2).squeeze(0))
        result.append(tuple(levels))
    return tuple(result)


def _crop_boxes(photo_hw: tuple[int, int], shape: tuple[int, ...], count: int,
                generator: torch.Generator) -> torch.Tensor:
    """(count, 4) boxes x1, y1, x2, y2: heights log-uniform in [H, half the shorter side], aspect of shape."""
    _, height, width = shape
    photo_h, photo_w = photo_hw
    largest = max(float(height), min(photo_h, photo_w * height / width) / 2)
    crop_h = (torch.rand(count, generator=generator) * math.log(largest / height) + math.log(height)).exp()
    crop_w = crop_h * width / height
    top = torch.rand(count, generator=generator) * (photo_h - crop_h)
    left = torch.rand(count, generator=generator) * (photo_w - crop_w)
    return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)


def natural_patches(split: str, shape: tuple[int, ...], n: int, generator: torch.Generator) -> torch.Tensor:
    """n random crops of the bundled photos, resized to ``shape`` (C, H, W) with roi_align.

    The test split crops the odd-numbered photos and train/val the even-numbered ones, so a model trained on
    patches is never tested on crops of the same photographs. Crop heights are log-uniform between H and half
    the photo's shorter side, with the aspect ratio of ``shape``.
    """
    if len(shape) != 3:
        raise ValueError(f"natural_patches needs an image shape (C, H, W), got {shape}")
    channels, height, width = shape
    photos = _photos(channels)[1 if split == "test" else 0::2]
    which = torch.randint(len(photos), (n,), generator=generator)
    out = torch.empty((n, channels, height, width))
    for index, pyramid in enumerate(photos):  # loops over photos and pyramid levels, not over samples
        chosen = (which == index).nonzero().squeeze(1)
        boxes = _crop_boxes(tuple(pyramid[0].shape[1:]), shape, len(chosen), generator)
        ratio = (boxes[:, 3] - boxes[:, 1]) / height
        level = ratio.log2().round().clamp(0, len(pyramid) - 1).long()
        for k in level.unique().tolist():
            at_level = (level == k).nonzero().squeeze(1)
            scaled = boxes[at_level] / 2 ** k
            rois = torch.cat([torch.zeros(len(at_level), 1), scaled], dim=1)  # column 0: image index
            out[chosen[at_level]] = roi_align(pyramid[k].unsqueeze(0), rois, (height, width),
                                              sampling_ratio=1, aligned=True)
    return out.clamp_(0.0, 1.0)
