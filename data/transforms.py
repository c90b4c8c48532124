"""Training augmentations of the seed papers, as torchvision transforms on float tensors in [0, 1].

* ``ccu`` (CCU, docs/methods.md#augmentation): RandomChoice([augmented, plain]), so half the samples are augmented;
  MNIST-like: RandomCrop(pad 2); SVHN: RandomCrop(pad 4, edge); CIFAR-like: HFlip + RandomCrop(pad 4, reflect).
* ``acet`` (ACET/CEDA): RandomCrop(pad 4), plus HFlip for CIFAR-like sets.
* ``ddu`` (DDU): RandomCrop(pad 4) + HFlip.

Paddings are given for 28/32-pixel images and scaled to other sizes (at least 1 pixel). Flips are only used
where the papers use them (never on digits or letters, whose mirror images are other symbols).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn
from torchvision import transforms

# SVHN is its own family: CCU pads it with edge values, and nobody flips house numbers.
FAMILY = {"MNIST": "mnist", "FMNIST": "mnist", "EMNIST": "mnist", "KMNIST": "mnist", "DirtyMNIST": "mnist",
          "digits": "mnist", "SVHN": "svhn"}


def family(name: str, shape: tuple[int, ...]) -> str:
    """"mnist", "svhn" or "cifar": which paper recipe a dataset follows (unknown RGB sets -> "cifar")."""
    return FAMILY.get(name, "cifar" if shape[0] == 3 else "mnist")


def _pad(pixels: int, shape: tuple[int, ...]) -> int:
    reference = 28 if shape[-1] <= 28 else 32
    return max(1, round(pixels * shape[-1] / reference))


def _crop(shape: tuple[int, ...], pixels: int, mode: str = "constant") -> transforms.RandomCrop:
    return transforms.RandomCrop(tuple(shape[-2:]), padding=_pad(pixels, shape), padding_mode=mode)


def ccu_augment(name: str, shape: tuple[int, ...]) -> Callable:
    kind = family(name, shape)
    if kind == "mnist":
        augmented = _crop(shape, 2)
    elif kind == "svhn":
        augmented = _crop(shape, 4, "edge")
    else:
        augmented = transforms.Compose([transforms.RandomHorizontalFlip(), _crop(shape, 4, "reflect")])
    # nn.Identity rather than a lambda keeps the transform picklable for DataLoader workers
    return transforms.RandomChoice([augmented, nn.Identity()])


def acet_augment(name: str, shape: tuple[int, ...]) -> Callable:
    if family(name, shape) == "cifar":
        return transforms.Compose([transforms.RandomHorizontalFlip(), _crop(shape, 4)])
    return _crop(shape, 4)


def ddu_augment(name: str, shape: tuple[int, ...]) -> Callable:
    return transforms.Compose([_crop(shape, 4), transforms.RandomHorizontalFlip()])


AUGMENTATIONS: dict[str, Callable[[str, tuple[int, ...]], Callable]] = {
    "ccu": ccu_augment,
    "acet": acet_augment,
    "ddu": ddu_augment,
}


def build_augment(augment: bool | str | None, name: str, shape: tuple[int, ...],
                  default: Optional[str]) -> Optional[Callable]:
    """The transform for ``augment`` (False/None/"none": none; True: ``default``; else a key of AUGMENTATIONS)."""
    if augment is None or augment is False or augment == "none":
        return None
    if augment is True:
        if default is None:
            return None
        augment = default
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    if len(shape) != 3:
        raise ValueError(f"augmentation {augment!r} needs images (C, H, W); {name} has shape {shape}")
    return AUGMENTATIONS[augment](name, shape)
