"""The dataset registry: ``DATASETS``, ``OOD_TEST``, ``get_dataset``, ``dataset_info``, ``default_augment``."""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch.utils.data import Dataset

from data import builtin, dirty_mnist, noise, path_sets, real
from data.base import (DatasetNotFoundError, TensorImageDataset, holdout_indices, make_generator, take,
                       with_transform)
from data.transforms import build_augment

SPLITS = ("train", "test", "val")
DEFAULT_NOISE_SIZE = 10000  # CCU: 100 x test batch 100; ODIN: 10 000


@dataclass(frozen=True)
class LoadContext:
    """Arguments a loader may need besides the split."""

    root: str
    download: bool
    shape: tuple[int, ...]
    like: Optional[str]
    n: Optional[int]
    seed: int


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry. ``shape`` is None when the set takes its shape from ``like``.

    kind: "torchvision" (real, downloadable), "imagefolder" (real, user-provided files), "builtin" (offline,
    fixed) or "generated" (offline, seeded: noise and natural patches). ``num_classes`` is 0 for unlabeled
    sets, whose labels are -1. ``has_val``: has its own val split (otherwise "val" needs val_fraction > 0).
    """

    num_classes: int
    shape: Optional[tuple[int, ...]]
    kind: str
    load: Callable[[str, LoadContext], Dataset]
    default_augment: Optional[str] = None
    has_val: bool = False


def _torchvision(name: str) -> Callable[[str, LoadContext], Dataset]:
    return lambda split, ctx: real.load_torchvision(name, split, ctx.root, ctx.download)


def _folder(name: str) -> Callable[[str, LoadContext], Dataset]:
    return lambda split, ctx: real.load_image_folder(name, split, ctx.root, ctx.download)


def _source_images(kind: str, split: str, ctx: LoadContext) -> Optional[torch.Tensor]:
    """Clean images the ccu/acet noise starts from: ``like``'s training set (CCU), or its same split (ACET
    evaluates on noise made from test images). None, with a warning, when those images are unavailable."""
    source_split = "train" if kind == "ccu_noise" or split != "test" else "test"
    try:
        source = get_dataset(ctx.like, source_split, root=ctx.root, download=ctx.download)
    except DatasetNotFoundError as error:
        source = error
    if isinstance(source, TensorImageDataset):
        return source.tensors()[0]
    warnings.warn(f"{kind}: no in-memory images of {ctx.like} ({source}); starting from uniform noise instead")
    return None


def _noise(kind: str) -> Callable[[str, LoadContext], Dataset]:
    def load(split: str, ctx: LoadContext) -> Dataset:
        n = DEFAULT_NOISE_SIZE if ctx.n is None else ctx.n
        generator = make_generator(kind, split, ctx.like, n, ctx.seed)
        source = _source_images(kind, split, ctx) if kind in noise.NEEDS_SOURCE else None
        images = noise.make_noise(kind, ctx.shape, n, generator, source)
        return TensorImageDataset(images, torch.full((n,), -1, dtype=torch.int64), scale=1.0)
    return load


def _natural_patches(split: str, ctx: LoadContext) -> Dataset:
    n = DEFAULT_NOISE_SIZE if ctx.n is None else ctx.n
    generator = make_generator("natural_patches", split, ctx.like, n, ctx.seed)
    images = builtin.natural_patches(split, ctx.shape, n, generator)
    return TensorImageDataset(images, torch.full((n,), -1, dtype=torch.int64), scale=1.0)


_MNIST_SHAPE, _RGB_SHAPE = (1, 28, 28), (3, 32, 32)
DATASETS: dict[str, DatasetSpec] = {
    "MNIST": DatasetSpec(10, _MNIST_SHAPE, "torchvision", _torchvision("MNIST"), "ccu"),
    "FMNIST": DatasetSpec(10, _MNIST_SHAPE, "torchvision", _torchvision("FMNIST"), "ccu"),
    "EMNIST": DatasetSpec(26, _MNIST_SHAPE, "torchvision", _torchvision("EMNIST"), "ccu"),
    "KMNIST": DatasetSpec(10, _MNIST_SHAPE, "torchvision", _torchvision("KMNIST"), "ccu"),
    # DDU's Dirty-MNIST: MNIST + Ambiguous-MNIST (data/dirty_mnist.py), no augmentation in DDU
    "DirtyMNIST": DatasetSpec(10, _MNIST_SHAPE, "torchvision",
                              lambda split, ctx: dirty_mnist.dirty_mnist(split, ctx.root, ctx.download), None),
    "SVHN": DatasetSpec(10, _RGB_SHAPE, "torchvision", _torchvision("SVHN"), "ccu"),
    "CIFAR10": DatasetSpec(10, _RGB_SHAPE, "torchvision", _torchvision("CIFAR10"), "ccu"),
    "CIFAR100": DatasetSpec(100, _RGB_SHAPE, "torchvision", _torchvision("CIFAR100"), "ccu"),
    "GrayCIFAR10": DatasetSpec(10, _MNIST_SHAPE, "torchvision",
                               lambda split, ctx: real.load_gray_cifar10(split, ctx.root, ctx.download)),
    **{name: DatasetSpec(0, _RGB_SHAPE, "imagefolder", _folder(name)) for name in real.FOLDERS},
    "moons": DatasetSpec(2, (2,), "builtin", lambda split, ctx: builtin.load_moons(split), has_val=True),
    "digits": DatasetSpec(10, (1, 8, 8), "builtin", lambda split, ctx: builtin.load_digits_set(split)),
    "natural_patches": DatasetSpec(0, None, "generated", _natural_patches, has_val=True),
    **{kind: DatasetSpec(0, None, "generated", _noise(kind), has_val=True) for kind in noise.NOISE_BATCH},
}

OOD_TEST: dict[str, list[str]] = {
    "DirtyMNIST": ["FMNIST"],
    "MNIST": ["FMNIST", "EMNIST", "GrayCIFAR10", "ccu_noise", "uniform"],
    "FMNIST": ["MNIST", "EMNIST", "GrayCIFAR10", "ccu_noise", "uniform"],
    "SVHN": ["CIFAR10", "CIFAR100", "LSUN_CR", "ImageNet-", "ccu_noise", "uniform"],
    "CIFAR10": ["SVHN", "CIFAR100", "LSUN_CR", "ImageNet-", "ccu_noise", "uniform"],
    "CIFAR100": ["SVHN", "CIFAR10", "LSUN_CR", "ImageNet-", "ccu_noise", "uniform"],
    "digits": ["uniform", "gaussian", "ccu_noise", "acet_noise", "natural_patches"],
    "moons": ["uniform"],
}


def _path_set(key: str) -> DatasetSpec:
    """A user's ``NAME=PATH`` set (data/path_sets.py): unlabeled, at the shape of ``like``, every split the same."""
    name, _ = path_sets.split_key(key)
    if name in DATASETS:
        raise path_sets.PathSetError(f"{key!r}: {name!r} is already a dataset key; give the set another NAME")
    return DatasetSpec(0, None, "path", lambda split, ctx: path_sets.load_path_set(key, ctx.shape), has_val=True)


def _spec(name: str) -> DatasetSpec:
    if path_sets.is_path_set(name):
        return _path_set(name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, or NAME=PATH for an image "
                         "folder or a .npz of uint8 images")
    return DATASETS[name]


def check_dataset(key: str, like: Optional[str] = None, root: str = "./datasets") -> None:
    """Fail now, with one clear error, if ``key`` cannot be used: an unknown name, or a ``NAME=PATH`` set that is
    missing or holds unreadable files (read in full here and cached, so the later load is free). Scripts call it
    before they write anything."""
    _spec(key)
    if path_sets.is_path_set(key):
        get_dataset(key, "test", root=root, like=like)


def dataset_arg(key: str) -> str:
    """argparse ``type=`` for dataset keys: a registry key or ``NAME=PATH`` (checked for form here, for its files
    by ``check_dataset`` once the in-distribution shape is known)."""
    try:
        _spec(key)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return key


SET_LIST_FORMS = ("several sets: comma-separated (a,b), space-separated (a b) or the flag repeated (--ood a --ood b); "
                  "a PATH cannot contain ','")


def dataset_list(values: Iterable[str]) -> list[str]:
    """The dataset keys of a list flag such as ``--ood``, in order: every value is a registry key, ``NAME=PATH``, or
    several of them separated by commas. This is the one parser of such lists (evaluate.py, reproduce.py, the
    studies, the plots), so every script accepts the same forms (SET_LIST_FORMS) and refuses the same mistakes,
    before any work. Commas always separate sets, so a PATH holding one is refused here by name: it would otherwise
    be read as two sets, or pass a check that joins the list again and fail only when the list is split later."""
    keys: list[str] = []
    for value in values:
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue  # "a,,b" or a trailing comma: nothing between the commas
            if keys and path_sets.is_path_set(keys[-1]) and not path_sets.is_path_set(item) and item not in DATASETS:
                raise path_sets.PathSetError(
                    f"{keys[-1]},{item}: ',' separates sets, so a PATH cannot contain one; rename the file or folder, "
                    "or pass a link to it without ','")
            _spec(item)  # unknown names list the valid ones
            keys.append(item)
    return path_sets.unique_sets(keys)  # one NAME, one set: refused here for every script alike


class DatasetListAction(argparse.Action):
    """argparse action of a list of dataset keys (use with nargs="+"): ``--ood a,b``, ``--ood a b`` and
    ``--ood a --ood b`` all give ["a", "b"]. The default must be None or []."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: Optional[str] = None) -> None:
        so_far = getattr(namespace, self.dest, None) or []
        values = [values] if isinstance(values, str) else list(values)
        try:  # the whole list so far, so a check across its items sees every one of them
            keys = dataset_list([*so_far, *values])
        except ValueError as error:
            parser.error(f"argument {option_string}: {error}")
        if not any(part.strip() for value in values for part in value.split(",")):  # "--ood ,": never meant
            parser.error(f"argument {option_string}: {' '.join(values)!r} names no set; give data keys or NAME=PATH")
        setattr(namespace, self.dest, keys)


def dataset_info(name: str, like: Optional[str] = None) -> tuple[int, tuple[int, ...]]:
    """(num_classes, shape) of a dataset; sets that take their shape from ``like`` need ``like``."""
    spec = _spec(name)
    if spec.shape is not None:
        return spec.num_classes, spec.shape
    if like is None:
        raise ValueError(f"{name} takes its shape from an in-distribution set: pass like=<dataset name>")
    like_spec = _spec(like)
    if like_spec.shape is None:
        raise ValueError(f"like={like!r} has no shape of its own; use an in-distribution dataset")
    return spec.num_classes, like_spec.shape


def default_augment(name: str) -> Optional[str]:
    """The augmentation ``augment=True`` means for ``name`` (a key of AUGMENTATIONS), or None."""
    return _spec(name).default_augment


def get_dataset(name: str, split: str = "train", root: str = "./datasets", augment: bool | str | None = False,
                download: bool = False, like: Optional[str] = None, n: Optional[int] = None, seed: int = 0,
                val_fraction: float = 0.0) -> Dataset:
    """A dataset of (x float32 in [0,1] of shape (C,H,W) or (D,), y int64; -1 for unlabeled sets).

    split: "train", "test" or "val". With ``val_fraction`` > 0 a seeded fraction (DDU: 10%, np seed = run
    seed) of the training set is held out as "val" and "train" is the rest. ``n`` keeps the first n items
    (for generated sets: generates n, default 10 000). ``augment``: False/None, True (the dataset's default)
    or a key of ``data.AUGMENTATIONS``. ``like`` gives generated sets their shape (and ccu/acet noise their
    source images). ``seed`` seeds generated sets and the val split; the same arguments give the same data.
    Real sets raise ``DatasetNotFoundError`` when missing, and download only with ``download=True``.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    holdout = val_fraction > 0 and split in ("train", "val")
    if split == "val" and not holdout and not spec.has_val:
        raise ValueError(f"{name} has no val split of its own: pass val_fraction > 0 to hold one out of train")
    _, shape = dataset_info(name, like)
    ctx = LoadContext(root=root, download=download, shape=shape, like=like, n=n, seed=seed)
    dataset = spec.load("train" if holdout else split, ctx)
    if holdout:
        train_indices, val_indices = holdout_indices(len(dataset), val_fraction, seed)
        dataset = take(dataset, train_indices if split == "train" else val_indices)
    if n is not None and len(dataset) > n:
        dataset = take(dataset, range(n))
    return with_transform(dataset, build_augment(augment, name, shape, spec.default_augment))
