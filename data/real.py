"""Real image datasets: torchvision sets held as uint8 tensors in memory, and ImageFolder OOD sets.

Nothing downloads unless ``download=True``; a missing set raises ``DatasetNotFoundError`` naming the path.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

from data.base import DatasetNotFoundError, TensorImageDataset, make_generator

TRAIN_TEST = ("train", "test")


def _missing(name: str, path: str, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"{name} not found at {os.path.abspath(path)}; {how}")


DOWNLOAD_HINT = "pass --download (download=True) to fetch it"


@dataclass(frozen=True)
class TorchvisionSource:
    """How to build one torchvision dataset and where it keeps its files under ``root``."""

    cls: Callable
    folder: str  # path under root that torchvision checks, for the error message
    kwargs: tuple = ()
    sub_root: str = ""  # SVHN keeps its .mat files directly in root, so give it a folder of its own

    def build(self, root: str, split: str, download: bool):
        kwargs = dict(self.kwargs)
        root = os.path.join(root, self.sub_root) if self.sub_root else root
        if self.cls is datasets.SVHN:
            return self.cls(root, split=split, download=download, **kwargs)
        return self.cls(root, train=(split == "train"), download=download, **kwargs)


SOURCES = {
    "MNIST": TorchvisionSource(datasets.MNIST, os.path.join("MNIST", "raw")),
    "FMNIST": TorchvisionSource(datasets.FashionMNIST, os.path.join("FashionMNIST", "raw")),
    "KMNIST": TorchvisionSource(datasets.KMNIST, os.path.join("KMNIST", "raw")),
    "EMNIST": TorchvisionSource(datasets.EMNIST, os.path.join("EMNIST", "raw"), (("split", "letters"),)),
    "SVHN": TorchvisionSource(datasets.SVHN, "SVHN", sub_root="SVHN"),
    "CIFAR10": TorchvisionSource(datasets.CIFAR10, "cifar-10-batches-py"),
    "CIFAR100": TorchvisionSource(datasets.CIFAR100, "cifar-100-python"),
}


def _to_tensors(name: str, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, H, W), int64 labels) from a torchvision dataset object."""
    if name == "SVHN":  # already (N, 3, 32, 32); torchvision maps label 10 to 0
        return torch.from_numpy(dataset.data), torch.as_tensor(dataset.labels, dtype=torch.int64)
    if name.startswith("CIFAR"):  # numpy (N, 32, 32, 3)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)
    images, labels = dataset.data, torch.as_tensor(dataset.targets, dtype=torch.int64)
    if name == "EMNIST":
        # the EMNIST files store letters transposed (docs/methods.md#ood-test-sets); letters labels are 1..26
        images, labels = images.transpose(1, 2).contiguous(), labels - 1
    return images.unsqueeze(1), labels


@functools.lru_cache(maxsize=6)
def _cached_tensors(name: str, root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    source = SOURCES[name]
    try:
        dataset = source.build(root, split, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found (or corrupted)"
        raise _missing(name, os.path.join(root, source.folder), DOWNLOAD_HINT) from error
    return _to_tensors(name, dataset)


def load_torchvision(name: str, split: str, root: str, download: bool) -> TensorImageDataset:
    """MNIST, FMNIST, KMNIST, EMNIST (letters, 0..25), SVHN, CIFAR10, CIFAR100 as in-memory uint8 sets."""
    if split not in TRAIN_TEST:
        raise ValueError(f"{name} has splits train/test; for val pass val_fraction > 0")
    root = os.path.abspath(root)
    if download:
        SOURCES[name].build(root, split, download=True)
    images, labels = _cached_tensors(name, root, split)
    return TensorImageDataset(images, labels, scale=255.0)


def load_gray_cifar10(split: str, root: str, download: bool) -> TensorImageDataset:
    """CIFAR-10 resized to 28x28 and averaged over RGB (CCU's GrayCIFAR10), 1x28x28."""
    try:
        colour = load_torchvision("CIFAR10", split, root, download)  # downloads first when asked
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(f"GrayCIFAR10 is made from CIFAR10: {error}") from None
    return TensorImageDataset(_cached_gray(os.path.abspath(root), split), colour.targets, scale=3 * 255.0)


@functools.lru_cache(maxsize=2)
def _cached_gray(root: str, split: str) -> torch.Tensor:
    """Channel sums of the resized uint8 images, as int16: divided by 3*255 they are exactly the RGB mean."""
    colour, _ = _cached_tensors("CIFAR10", root, split)
    resized = TF.resize(colour, [28, 28], antialias=True)  # uint8 in, uint8 out, like PIL
    return resized.to(torch.int16).sum(dim=1, keepdim=True, dtype=torch.int16)


@dataclass(frozen=True)
class FolderSource:
    """An ImageFolder OOD set: where its images go under ``root`` and where to get them."""

    folder: str
    how: str
    subset: tuple[int, int] | None = None  # (first k images, random n of them), e.g. CCU's Imagenet-


FOLDERS = {
    "LSUN_CR": FolderSource("LSUN_classroom", "export the LSUN classroom images (e.g. classroom_val) as "
                            "JPEG files into a sub-folder of it"),
    "ImageNet-": FolderSource(os.path.join("imagenet", "val"), "put the ILSVRC-2012 validation images there, "
                              "one sub-folder per class", subset=(30000, 10000)),
    "TinyImageNet_crop": FolderSource("Imagenet", "extract ODIN's Imagenet.tar.gz there"),
    "TinyImageNet_resize": FolderSource("Imagenet_resize", "extract ODIN's Imagenet_resize.tar.gz there"),
    "LSUN_crop": FolderSource("LSUN", "extract ODIN's LSUN.tar.gz there"),
    "LSUN_resize": FolderSource("LSUN_resize", "extract ODIN's LSUN_resize.tar.gz there"),
    "iSUN": FolderSource("iSUN", "extract ODIN's iSUN.tar.gz there"),
}


def unlabeled(_: int) -> int:
    """Target transform for OOD folders: their folder index is not a class (module-level: picklable)."""
    return -1


def load_image_folder(name: str, split: str, root: str, download: bool) -> Dataset:
    """An OOD ImageFolder set resized to 32x32 RGB, labels -1. These sets have a test split only."""
    source = FOLDERS[name]
    path = os.path.join(root, source.folder)
    if split != "test":
        raise ValueError(f"{name} is an OOD test set with a test split only, got split={split!r}")
    how = (f"{source.how} (torchvision ImageFolder layout: images inside sub-folders of that folder); "
           "this set is not downloaded automatically")
    if not os.path.isdir(path):
        raise _missing(name, path, how)
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    try:
        dataset = datasets.ImageFolder(path, transform=transform, target_transform=unlabeled)
    except FileNotFoundError as error:  # no class folders or no images
        raise _missing(name, path, how) from error
    if source.subset is None:
        return dataset
    first, size = source.subset
    # CCU draws these unseeded; a fixed draw keeps the set identical across evaluations
    order = torch.randperm(min(first, len(dataset)), generator=make_generator(name))
    return Subset(dataset, order[:size].tolist())
