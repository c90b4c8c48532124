"""Dirty-MNIST (Mukhoti et al., DDU, arXiv 2102.11582, docs/methods.md#dirty-mnist-and-active-learning): MNIST plus
Ambiguous-MNIST.

Ambiguous-MNIST ships as two tensors, `amnist_samples.pt` (N, 1, 28, 28) float images in [0, 1] and
`amnist_labels.pt` (N, L) with L sampled labels per image, from
https://github.com/BlackHC/ddu_dirty_mnist/releases (tag data-v1.0.0). Put both files in

    <root>/AmbiguousMNIST/amnist_samples.pt
    <root>/AmbiguousMNIST/amnist_labels.pt

(or pass `download=True`). Each image is repeated once per label (multi-label expansion: N * L items, item i
is image i // L with label labels[i // L, i % L]); the first 60 000 expanded items are the training split and
the rest the test split. Dirty-MNIST train = MNIST train (60 000) + AMNIST train, test = MNIST test + AMNIST
test. Images stay in [0, 1]; DDU's (x - 0.1307) / 0.3081 is the model's first layer (`normalize`).

Unlike the original, the expansion is an index map, not a copy (the copy costs ~380 MB of float32).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from data.base import DatasetNotFoundError
from data.real import load_torchvision

AMNIST_DIR = "AmbiguousMNIST"
AMNIST_URL = "https://github.com/BlackHC/ddu_dirty_mnist/releases/download/data-v1.0.0/"
AMNIST_FILES = {"amnist_samples.pt": "4f7865093b1d28e34019847fab917722",     # file -> md5
                "amnist_labels.pt": "3bfc055a9f91a76d8d493e8b898c3c95"}
AMNIST_TRAIN_SIZE = 60_000
MNIST_NORMALIZE = ((0.1307,), (0.3081,))


def amnist_paths(root: str | Path) -> list[Path]:
    return [Path(root) / AMNIST_DIR / name for name in AMNIST_FILES]


def _download(root: str | Path) -> None:
    from torchvision.datasets.utils import download_url
    for name, md5 in AMNIST_FILES.items():
        download_url(AMNIST_URL + name, str(Path(root) / AMNIST_DIR), filename=name, md5=md5)


class AmbiguousMNIST(Dataset):
    """Ambiguous-MNIST with multi-label expansion (see the module docstring); split "train" or "test"."""

    def __init__(self, root: str | Path, split: str = "train", download: bool = False) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"unknown Ambiguous-MNIST split {split!r}; valid: train, test")
        samples_path, labels_path = amnist_paths(root)
        if download and not (samples_path.exists() and labels_path.exists()):
            _download(root)
        if not (samples_path.exists() and labels_path.exists()):
            raise DatasetNotFoundError(f"Ambiguous-MNIST not found: expected {samples_path} and {labels_path} "
                                       f"(from {AMNIST_URL}, or pass --download)")
        samples = torch.load(samples_path, map_location="cpu", weights_only=True)
        labels = torch.load(labels_path, map_location="cpu", weights_only=True)
        self.images = self._as_images(samples)                       # (N, 1, 28, 28) float32 in [0, 1]
        labels = labels.reshape(len(self.images), -1).to(torch.int64)  # (N, L)
        self.labels_per_image = labels.shape[1]
        expanded = torch.arange(labels.numel())
        self.items = expanded[:AMNIST_TRAIN_SIZE] if split == "train" else expanded[AMNIST_TRAIN_SIZE:]
        self.targets = labels.reshape(-1)[self.items]

    @staticmethod
    def _as_images(samples: torch.Tensor) -> torch.Tensor:
        if samples.dtype == torch.uint8:
            samples = samples.float() / 255.0
        samples = samples.to(torch.float32).reshape(-1, 1, 28, 28)
        if samples.min() < 0 or samples.max() > 1:
            raise ValueError("amnist_samples.pt must hold images in [0, 1] (unnormalised); got range "
                             f"[{float(samples.min()):.3f}, {float(samples.max()):.3f}]")
        return samples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[int(self.items[index]) // self.labels_per_image], self.targets[index]


def dirty_mnist(split: str, root: str | Path, download: bool = False, **_: object) -> Dataset:
    """Dirty-MNIST split "train" (MNIST train + AMNIST train, 120 000 items) or "test" (MNIST test + AMNIST test).

    The registry's own MNIST loader (data.real) supplies the MNIST part, so the missing-data message for MNIST is
    its own; it is called directly, not through the registry, which imports this module.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown Dirty-MNIST split {split!r}; valid: train, test")
    ambiguous = AmbiguousMNIST(root, split, download=download)
    mnist = load_torchvision("MNIST", split, str(root), download)
    dataset = ConcatDataset([mnist, ambiguous])
    dataset.targets = torch.cat([torch.as_tensor(getattr(mnist, "targets")), ambiguous.targets])
    return dataset
