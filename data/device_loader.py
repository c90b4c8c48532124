"""The device-side data path: an in-memory integer image set held whole on the training device, batches gathered
there by index, and the papers' augmentations applied to the whole batch at once.

It replaces the per-sample path (a DataLoader calling `TensorImageDataset.__getitem__` and a torchvision
transform per image) for the in-memory sets (MNIST family, SVHN, CIFAR, GrayCIFAR10, digits, generated sets)
and draws from the same distribution (tests/test_device_data.py checks crop offsets, flip rate and augmented
share against the torchvision transforms of data/transforms.py):

  * RandomCrop(size, padding p, mode): pad by p on every side, then a crop offset (i, j) uniform on
    {0, ..., 2p}^2, independently per image;
  * RandomHorizontalFlip: each image mirrored with probability 1/2;
  * CCU's RandomChoice([augmented, identity]): each image augmented with probability 1/2.

Flip-then-crop and crop-then-flip give the same distribution (the padding is symmetric and the offsets are
uniform on a symmetric range), so one order serves every recipe. The random draws come from a generator seeded
by (seed, epoch, rank), so an epoch's batches are a function of those alone and `--resume` stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from data.base import TensorImageDataset, stable_seed
from data.transforms import AUGMENTATIONS, _pad, family

# torchvision's padding_mode -> torch.nn.functional.pad's mode
PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@dataclass(frozen=True)
class BatchAugment:
    """One recipe as batched operations: crop padding and mode, horizontal flips, the share of images augmented."""

    padding: int
    padding_mode: str = "constant"   # a key of PAD_MODES (torchvision's names)
    flip: bool = False
    share: float = 1.0               # CCU: 0.5 (RandomChoice between the augmented and the plain image)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float batch (N, C, H, W) on its device; the draws come from `generator` (on that device)."""
        n, _, height, width = x.shape
        p, kw = self.padding, dict(device=x.device, generator=generator)
        padded = F.pad(x, (p, p, p, p), mode=PAD_MODES[self.padding_mode])
        top = torch.randint(0, 2 * p + 1, (n,), **kw)
        left = torch.randint(0, 2 * p + 1, (n,), **kw)
        rows = (top[:, None] + torch.arange(height, device=x.device))[:, :, None]      # (N, H, 1)
        cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, :]      # (N, 1, W)
        if self.flip:
            flipped = torch.rand(n, **kw) < 0.5
            cols = torch.where(flipped[:, None, None], cols.flip(2), cols)
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)        # (N, H, W, C) -> NCHW
        if self.share < 1.0:
            chosen = torch.rand(n, **kw) < self.share
            out = torch.where(chosen[:, None, None, None], out, x)
        return out.contiguous()


def batch_augment(augment: str, name: str, shape: tuple[int, ...]) -> BatchAugment:
    """The batched form of `data.AUGMENTATIONS[augment]` for dataset `name` of image shape (C, H, W)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    kind = family(name, shape)
    if augment == "ccu":
        if kind == "mnist":
            return BatchAugment(_pad(2, shape), share=0.5)
        if kind == "svhn":
            return BatchAugment(_pad(4, shape), "edge", share=0.5)
        return BatchAugment(_pad(4, shape), "reflect", flip=True, share=0.5)
    if augment == "acet":
        return BatchAugment(_pad(4, shape), flip=kind == "cifar")
    return BatchAugment(_pad(4, shape), flip=True)  # ddu


def resolve_augment(augment: bool | str | None, default: Optional[str]) -> Optional[str]:
    """`augment` as data.get_dataset reads it (False/None/"none": None; True: the dataset's default)."""
    if augment is None or augment is False or augment == "none":
        return None
    return default if augment is True else augment


class DeviceDataset:
    """A `TensorImageDataset` held whole on `device` in its integer storage, with an optional batched augmentation.

    `batches(order, generator)` turns batches of indices into (x float32 in [0, 1], y int64) on the device.
    """

    def __init__(self, dataset: TensorImageDataset, device: torch.device | str,
                 augment: Optional[BatchAugment] = None) -> None:
        if dataset.transform is not None:
            raise ValueError("DeviceDataset applies its own batched augmentation: pass the set without a transform")
        if augment is not None and dataset.data.dim() != 4:
            raise ValueError(f"augmentation needs images (N, C, H, W), got data of shape {tuple(dataset.data.shape)}")
        self.device = torch.device(device)
        self.data = dataset.data.to(self.device)
        self.targets = dataset.targets.to(self.device)
        self.scale = dataset.scale
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def gather(self, index: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `index` as a float batch in [0, 1], augmented when the set has an augmentation."""
        index = index.to(self.device, non_blocking=True)
        x = self.data[index].to(torch.float32)
        if self.scale != 1.0:
            x = x.div_(self.scale)
        if self.augment is not None:
            x = self.augment(x, generator)
        return x, self.targets[index]

    def batches(self, order: Iterable[torch.Tensor], generator: Optional[torch.Generator]) -> Iterator:
        for index in order:
            yield self.gather(index, generator)

    def in_order(self, batch_size: int) -> "EpochBatches":
        """Every item once, in storage order (evaluation)."""
        order = list(torch.arange(len(self)).split(batch_size))
        return EpochBatches(self, order, None)

    def augment_generator(self, *seed_parts: object) -> Optional[torch.Generator]:
        """The generator of an epoch's augmentation draws, seeded from `seed_parts` only (None: no augmentation)."""
        if self.augment is None:
            return None
        return torch.Generator(device=self.device).manual_seed(stable_seed("augment", *seed_parts))


class EpochBatches:
    """One epoch of a DeviceDataset: iterable like a DataLoader (with len), batches already on the device."""

    def __init__(self, dataset: DeviceDataset, order, generator: Optional[torch.Generator]) -> None:
        self.dataset, self.order, self.generator = dataset, order, generator

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.dataset.batches(self.order, self.generator)


def load_train_set(name: str, root: str, augment: bool | str | None, device: torch.device | str,
                   on_device: Optional[bool] = None, **kwargs) -> "DeviceDataset | torch.utils.data.Dataset":
    """The training set of `name` on the device path when it is held in memory (on_device None: wherever it
    applies; True: required), else the per-sample dataset with its torchvision augmentation for a DataLoader.
    `kwargs` go to data.get_dataset (download, val_fraction, seed)."""
    from data.base import with_transform
    from data.registry import dataset_info, default_augment, get_dataset  # the registry imports this package
    from data.transforms import build_augment

    plain = get_dataset(name, "train", root=root, augment=False, **kwargs)
    if on_device is not False and isinstance(plain, TensorImageDataset):
        recipe = resolve_augment(augment, default_augment(name))
        shape = dataset_info(name)[1]
        return DeviceDataset(plain, device, batch_augment(recipe, name, shape) if recipe else None)
    if on_device:
        raise ValueError(f"--device-data needs a set held in memory; {name} is read from files: "
                         "pass --no-device-data")
    return with_transform(plain, build_augment(augment, name, dataset_info(name)[1], default_augment(name)))
