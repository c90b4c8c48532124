"""Shared pieces of the data package: the in-memory dataset, the missing-data error, seeding, splitting.

Every dataset in this package yields ``(x, y)`` with ``x`` a float32 tensor in [0, 1] of shape (C, H, W)
(or (D,) for vector data such as two moons) and ``y`` an int64 label, -1 for unlabeled OOD and noise sets.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset is not on disk; the message names the path expected and how to get it."""


class TensorImageDataset(Dataset):
    """Images held as one integer (or float) tensor in memory, converted to float [0, 1] per item.

    ``data`` has shape (N, C, H, W) or (N, D); ``x = data[i] / scale``. Keeping uint8 storage makes
    MNIST/CIFAR-sized sets cheap in memory and avoids a PIL round trip per item; ``transform`` (if any)
    runs on the float tensor.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, scale: float = 255.0,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if len(data) != len(targets):
            raise ValueError(f"data has {len(data)} items but targets has {len(targets)}")
        self.data = data
        self.targets = targets.to(torch.int64)
        self.scale = float(scale)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[index].to(torch.float32)
        if self.scale != 1.0:
            x = x.div_(self.scale)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "TensorImageDataset":
        """A new dataset holding only ``indices`` (copied, so the parent can be freed)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(self.data[index], self.targets[index], self.scale, self.transform)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items at once as (x float32 in [0,1], y int64), without the per-item transform."""
        x = self.data.to(torch.float32)
        return (x / self.scale if self.scale != 1.0 else x), self.targets


class TransformedDataset(Dataset):
    """Applies ``transform`` to x of a dataset that cannot hold one itself (e.g. a Subset)."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset[index]
        return self.transform(x), y


def stable_seed(*parts: object) -> int:
    """A seed that depends only on ``parts`` (unlike ``hash()``, identical across Python processes)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def make_generator(*parts: object) -> torch.Generator:
    """A CPU torch generator seeded from ``parts``."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def holdout_indices(n_items: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices): a seeded shuffle, the first ``floor(val_fraction * n)`` go to val.

    Same rule as DDU's ``train_valid_split`` (np seed = run seed, val = head of the shuffled indices).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    indices = np.arange(n_items)
    np.random.RandomState(seed).shuffle(indices)
    n_val = int(np.floor(val_fraction * n_items))
    return indices[n_val:], indices[:n_val]


def take(dataset: Dataset, indices: Sequence[int] | np.ndarray) -> Dataset:
    """Restrict ``dataset`` to ``indices``: a compact copy for in-memory sets, a Subset otherwise."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(torch.as_tensor(np.asarray(indices), dtype=torch.long))
    return Subset(dataset, [int(i) for i in indices])


def with_transform(dataset: Dataset, transform: Optional[Callable]) -> Dataset:
    """Attach a per-item transform on x (in place for in-memory sets)."""
    if transform is None:
        return dataset
    if isinstance(dataset, TensorImageDataset) and dataset.transform is None:
        dataset.transform = transform
        return dataset
    return TransformedDataset(dataset, transform)
