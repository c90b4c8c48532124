"""The device-side data path draws what the per-sample path draws: identical batches without augmentation, and
augmentations with the same crop offsets, flip rate and augmented share as the torchvision transforms."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import data
import train
from data.base import TensorImageDataset
from data.device_loader import DeviceDataset, batch_augment, load_train_set
from data.transforms import AUGMENTATIONS, _pad
from utils import training

N_DRAWS = 3000
# one dataset per recipe family of data/transforms.py: mnist (and 8x8 digits), svhn, cifar
FAMILIES = [("MNIST", (1, 28, 28)), ("digits", (1, 8, 8)), ("SVHN", (3, 32, 32)), ("CIFAR10", (3, 32, 32))]


def batches_of(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_unaugmented_batches_equal_the_per_sample_loader(val_fraction):
    per_sample = data.get_dataset("digits", "train", val_fraction=val_fraction, seed=3)
    on_device = load_train_set("digits", "unused", "none", "cpu", val_fraction=val_fraction, seed=3)
    assert isinstance(on_device, DeviceDataset)
    for epoch in (0, 1):
        expected = batches_of(training.train_loader(per_sample, 64, 3, epoch, 0))
        got = batches_of(training.epoch_batches(on_device, 64, 3, epoch, None))
        assert len(got) == len(expected) == len(per_sample) // 64
        for (x, y), (x_ref, y_ref) in zip(got, expected):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def _probe_image(shape) -> torch.Tensor:
    """Distinct positive pixel values, so every (crop offset, flip) gives a different image."""
    size = int(np.prod(shape))
    return ((torch.arange(size, dtype=torch.float32) + 1) / (size + 1)).view(shape)


def _outcomes(images: torch.Tensor, probe: torch.Tensor, padding: int, mode: str) -> torch.Tensor:
    """(N, 3) rows (top, left, flipped) identifying each augmented image among all crops of the padded probe."""
    pad_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    padded = torch.nn.functional.pad(probe[None], (padding,) * 4, mode=pad_mode)[0]
    height, width = probe.shape[1:]
    labels, candidates = [], []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top:top + height, left:left + width]
            for flipped in (0, 1):
                candidates.append(crop.flip(2) if flipped else crop)
                labels.append((top, left, flipped))
    candidates = torch.stack(candidates).flatten(1).double()
    direction = torch.rand(candidates.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys, image_keys = candidates @ direction, images.flatten(1).double() @ direction
    match = (image_keys[:, None] - keys[None]).abs().argmin(dim=1)
    assert torch.equal(candidates[match], images.flatten(1).double()), "an output is no crop of the probe"
    return torch.tensor(labels)[match]


def _expected_marginals(padding: int, share: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """P(top = t) (= P(left = t)) and P(flipped) of recipe outcomes; un-augmented images read as (p, p, 0)."""
    offsets = np.full(2 * padding + 1, share / (2 * padding + 1))
    offsets[padding] += 1.0 - share
    p_flip = share * 0.5 if flip else 0.0
    return offsets, np.array([1.0 - p_flip, p_flip])


def _check(outcomes: torch.Tensor, padding: int, share: float, flip: bool, what: str) -> None:
    offsets, flips = _expected_marginals(padding, share, flip)
    for column in (0, 1):
        counts = np.bincount(outcomes[:, column].numpy(), minlength=len(offsets))
        assert len(counts) == len(offsets), f"{what}: offsets outside 0..{2 * padding}"
        assert chisquare(counts, offsets * len(outcomes)).pvalue > 1e-4, (what, counts)
    flipped = int(outcomes[:, 2].sum())
    if not flip:
        assert flipped == 0, what
    else:
        assert chisquare([len(outcomes) - flipped, flipped], flips * len(outcomes)).pvalue > 1e-4, (what, flipped)
    untouched = int(((outcomes[:, 0] == padding) & (outcomes[:, 1] == padding) & (outcomes[:, 2] == 0)).sum())
    p_untouched = (1 - share) + share / ((2 * padding + 1) ** 2 * (2 if flip else 1))
    assert chisquare([untouched, len(outcomes) - untouched],
                     [p_untouched * len(outcomes), (1 - p_untouched) * len(outcomes)]).pvalue > 1e-4, what


# every recipe on every family; the 8x8 digits (mnist family, 1-pixel padding) with CCU's recipe only
CASES = [(recipe, name, shape) for recipe in sorted(AUGMENTATIONS) for name, shape in FAMILIES
         if name != "digits" or recipe == "ccu"]


@pytest.mark.parametrize("recipe, name, shape", CASES)
def test_batched_augmentation_draws_from_the_per_sample_distribution(recipe, name, shape):
    augment = batch_augment(recipe, name, shape)
    probe = _probe_image(shape)
    torch.manual_seed(1)
    random.seed(1)  # torchvision's RandomChoice draws from Python's random module
    transform = AUGMENTATIONS[recipe](name, shape)
    per_sample = torch.stack([transform(probe.clone()) for _ in range(N_DRAWS)])
    device_set = DeviceDataset(TensorImageDataset(probe.expand(N_DRAWS, *shape).clone(),
                                                  torch.zeros(N_DRAWS), scale=1.0), "cpu", augment)
    batched, _ = device_set.gather(torch.arange(N_DRAWS), device_set.augment_generator(1))
    for what, images in (("per-sample", per_sample), ("batched", batched)):
        _check(_outcomes(images, probe, augment.padding, augment.padding_mode), augment.padding, augment.share,
               augment.flip, f"{recipe}/{name}/{what}")
    # the batched recipe reads its numbers from the same place as the transforms
    assert augment.padding == _pad(2 if (recipe, name) in (("ccu", "MNIST"), ("ccu", "digits")) else 4, shape)


def test_augmented_batches_are_a_function_of_seed_and_epoch():
    train_set = data.get_dataset("digits", "train")
    device_set = DeviceDataset(train_set, "cpu", batch_augment("ccu", "digits", (1, 8, 8)))
    first = batches_of(training.epoch_batches(device_set, 64, 0, 1, None))
    torch.manual_seed(123)  # the global random state does not matter
    again = batches_of(training.epoch_batches(device_set, 64, 0, 1, None))
    other = batches_of(training.epoch_batches(device_set, 64, 0, 2, None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    plain = batches_of(training.train_loader(train_set, 64, 0, 1, 0))
    changed = np.mean([float((a[0] != b[0]).flatten(1).any(1).float().mean()) for a, b in zip(first, plain)])
    assert 0.4 < changed < 0.6  # CCU: about half the images augmented


def test_train_py_gives_identical_weights_on_both_data_paths(tmp_path):
    common = ["--dataset", "digits", "--epochs", "1", "--max-batches", "4", "--runs-root", str(tmp_path),
              "--no-progress", "--method", "ceda", "--out-data", "uniform"]
    weights = []
    for name, flag in (("device", "--device-data"), ("loader", "--no-device-data")):
        run_dir = train.main(train.get_args_parser().parse_args([*common, "--name", name, flag]))
        weights.append(torch.load(run_dir / "model.pt", weights_only=True)["model"])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_device_data_on_a_file_based_set_is_a_clear_error(monkeypatch):
    import data.registry as registry

    monkeypatch.setattr(registry, "get_dataset", lambda *a, **k: torch.utils.data.TensorDataset(torch.zeros(2)))
    with pytest.raises(ValueError, match="--device-data needs a set held in memory.*--no-device-data"):
        load_train_set("digits", "unused", "none", "cpu", on_device=True)
