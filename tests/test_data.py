"""Tests of the data package: registry, built-in and generated sets, noise generators, splits, augmentations."""
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torchvision.transforms import functional as TF

import data
from data import (AUGMENTATIONS, DATASETS, OOD_TEST, DatasetNotFoundError, acet_noise_batch, dataset_info,
                  default_augment, get_dataset, uniform_batch)
from data import noise, real
from data.base import holdout_indices

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")
OFFLINE = [name for name, spec in DATASETS.items() if spec.kind in ("builtin", "generated")]
GENERATED = [name for name, spec in DATASETS.items() if spec.kind == "generated"]
REQUIRED = ["MNIST", "FMNIST", "EMNIST", "KMNIST", "SVHN", "CIFAR10", "CIFAR100", "GrayCIFAR10", "LSUN_CR",
            "ImageNet-", "TinyImageNet_crop", "TinyImageNet_resize", "LSUN_crop", "LSUN_resize", "iSUN", "moons",
            "digits", "natural_patches", "uniform", "gaussian", "ccu_noise", "acet_noise"]


def _all_items(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


def _get(name, **kwargs):
    """Offline sets; generated ones shaped like digits, with few samples to keep the test fast."""
    if DATASETS[name].kind == "generated":
        kwargs.setdefault("like", "digits")
        kwargs.setdefault("n", 48)
    return get_dataset(name, **kwargs)


def test_registry_keys_and_ood_lists():
    assert set(REQUIRED) <= set(DATASETS)
    for in_name, ood_names in OOD_TEST.items():
        assert in_name in DATASETS and set(ood_names) <= set(DATASETS)
    assert OOD_TEST["MNIST"] == ["FMNIST", "EMNIST", "GrayCIFAR10", "ccu_noise", "uniform"]
    assert dataset_info("CIFAR100") == (100, (3, 32, 32))
    assert dataset_info("EMNIST") == (26, (1, 28, 28))
    assert dataset_info("GrayCIFAR10") == (10, (1, 28, 28))
    assert dataset_info("moons") == (2, (2,))
    assert dataset_info("ccu_noise", like="SVHN") == (0, (3, 32, 32))
    with pytest.raises(ValueError, match="like="):
        dataset_info("uniform")
    assert default_augment("CIFAR10") in AUGMENTATIONS and default_augment("moons") is None


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_sets_shape_dtype_range_determinism(name):
    first, again = _all_items(_get(name, split="test")), _all_items(_get(name, split="test"))
    other_seed = _all_items(_get(name, split="test", seed=1))
    x, y = first
    expected_shape = dataset_info(name, like="digits")[1]
    assert x.shape[1:] == expected_shape and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    num_classes = DATASETS[name].num_classes
    if DATASETS[name].kind == "generated":
        assert (y == -1).all() and len(x) == 48
        assert not torch.equal(x, other_seed[0])  # generated sets follow the seed
        assert not torch.equal(x, _all_items(_get(name, split="train"))[0])  # and the split
    else:
        assert y.min() == 0 and y.max() == num_classes - 1
        assert torch.equal(x, other_seed[0])  # fixed data: a test set never depends on the run seed


def test_builtin_sizes_and_values():
    assert [len(get_dataset("moons", split)) for split in ("train", "val", "test")] == [1000, 500, 1000]
    moons, _ = get_dataset("moons").tensors()
    assert 0.09 < float(moons.min()) and float(moons.max()) < 0.91  # scaled into [0.1, 0.9]^2
    digits_train, digits_test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(digits_train), len(digits_test)) == (1437, 360)
    counts = torch.bincount(digits_test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    x, _ = digits_train.tensors()
    assert float(x.max()) == 1.0 and torch.allclose(x * 16, (x * 16).round())  # grey levels / 16


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("like", ["digits", "CIFAR10"])
def test_generated_sets_match_like_shape(name, like, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CIFAR10 is missing under tmp_path: ccu/acet fall back to uniform
        dataset = get_dataset(name, "test", root=str(tmp_path), like=like, n=8)
    x, y = _all_items(dataset)
    assert x.shape == (8, *dataset_info(like)[1]) and (y == -1).all()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_noise_fallback_warns_and_image_noise_rejects_vectors(tmp_path):
    with pytest.warns(UserWarning, match="uniform"):
        get_dataset("ccu_noise", "test", root=str(tmp_path), like="MNIST", n=4)
    assert get_dataset("uniform", "test", like="moons", n=5)[0][0].shape == (2,)
    with pytest.raises(ValueError, match="images"):
        get_dataset("ccu_noise", "test", like="moons", n=4)


def test_gaussian_filter_batch_equals_scipy():
    torch.manual_seed(0)
    for shape in [(4, 3, 32, 32), (3, 1, 8, 8), (2, 3, 5, 7)]:
        x, sigma = torch.rand(shape), 1 + 1.5 * torch.rand(shape[0])
        expected = np.stack([gaussian_filter(x[i].numpy(), float(sigma[i])) for i in range(shape[0])])
        assert np.abs(noise.gaussian_filter_batch(x, sigma).numpy() - expected).max() < 1e-5


def test_reflect_indices_match_numpy_symmetric_padding():
    assert noise.reflect_indices(5, 3).tolist() == np.pad(np.arange(5), 3, mode="symmetric").tolist()
    assert noise.reflect_indices(1, 4).tolist() == [0] * 9


def test_permute_pixels_keeps_channel_vectors():
    x = torch.rand(3, 3, 6, 6)
    permuted = noise.permute_pixels(x, torch.Generator().manual_seed(0))
    before, after = x.flatten(2).transpose(1, 2), permuted.flatten(2).transpose(1, 2)  # (N, HW, C)
    for i in range(3):  # the same pixel vectors, in another order
        assert torch.equal(torch.sort(before[i], dim=0).values, torch.sort(after[i], dim=0).values)
        assert not torch.equal(before[i], after[i])
    assert torch.equal(after[0].sum(1).sort().values, before[0].sum(1).sort().values)


def test_ccu_noise_contrast_on_constant_images():
    # a constant image stays constant through permutation and blur; contrast gives sigmoid(gamma * 0.1)
    out = noise.ccu_noise_batch(torch.full((64, 3, 8, 8), 0.6), torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-6)
    gamma = torch.logit(per_image[:, 0].double()) / 0.1
    assert 5.0 - 1e-3 <= float(gamma.min()) and float(gamma.max()) <= 30.0 + 1e-3
    assert float(gamma.max() - gamma.min()) > 10.0  # drawn per image


def test_acet_noise_batch_properties():
    x = torch.rand(10, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    z = acet_noise_batch(x, generator)
    assert z.shape == x.shape and z.dtype == x.dtype
    flat = z.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(10)) and torch.allclose(flat.max(1).values, torch.ones(10))
    assert torch.equal(z, acet_noise_batch(x, torch.Generator().manual_seed(0)))
    # low-passed: neighbouring pixels are far closer than in the min-max-rescaled uniform noise
    smooth = (z[..., 1:] - z[..., :-1]).abs().mean()
    rough = (x[..., 1:] - x[..., :-1]).abs().mean()
    assert float(smooth) < 0.3 * float(rough)
    # first half from the (constant) clean images: constant after blur, rescaled to 0; second half uniform
    z = acet_noise_batch(torch.full((10, 1, 8, 8), 0.3), generator)
    assert float(z[:5].abs().max()) == 0.0 and torch.allclose(z[5:].flatten(1).max(1).values, torch.ones(5))
    u = uniform_batch(x, generator)
    assert u.shape == x.shape and 0.0 <= float(u.min()) and float(u.max()) <= 1.0


def test_missing_real_dataset_names_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--download") as error:
        get_dataset("MNIST", "train", root=str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)
    assert str(tmp_path / "MNIST" / "raw") in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        get_dataset("GrayCIFAR10", "test", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="iSUN"):
        get_dataset("iSUN", "test", root=str(tmp_path))


def test_image_folder_set(tmp_path):
    from PIL import Image

    folder = tmp_path / "iSUN" / "test"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((36, 40, 3), 80 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    dataset = get_dataset("iSUN", "test", root=str(tmp_path))
    x, y = _all_items(dataset)
    assert x.shape == (3, 3, 32, 32) and (y == -1).all()
    assert sorted(x.mean((1, 2, 3)).tolist()) == pytest.approx([0.0, 80 / 255, 160 / 255], abs=1e-6)
    with pytest.raises(ValueError, match="test split only"):
        get_dataset("iSUN", "train", root=str(tmp_path))


def test_torchvision_tensor_conversion_and_gray_cifar(monkeypatch, tmp_path):
    letters = SimpleNamespace(data=torch.arange(2 * 28 * 28, dtype=torch.uint8).reshape(2, 28, 28), targets=[1, 26])
    images, labels = real._to_tensors("EMNIST", letters)
    assert images.shape == (2, 1, 28, 28) and labels.tolist() == [0, 25]
    assert torch.equal(images[0, 0], letters.data[0].T)
    colour = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    monkeypatch.setattr(real, "_cached_tensors", lambda name, root, split: (colour, torch.arange(4)))
    real._cached_gray.cache_clear()
    try:
        x, _ = real.load_gray_cifar10("test", str(tmp_path), False).tensors()
    finally:
        real._cached_gray.cache_clear()
    expected = TF.resize(colour, [28, 28], antialias=True).float().mean(1, keepdim=True) / 255
    assert x.shape == (4, 1, 28, 28) and torch.allclose(x, expected, atol=1e-6)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "MNIST")), reason="no offline MNIST copy")
def test_mnist_loads_from_shared_folder():
    train, test = get_dataset("MNIST", "train", root=SHARED), get_dataset("MNIST", "test", root=SHARED)
    assert (len(train), len(test)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 5
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert torch.bincount(test.targets).tolist()[:2] == [980, 1135]


def test_val_split_disjoint_and_sized():
    train = get_dataset("moons", "train", val_fraction=0.1, seed=3)
    val = get_dataset("moons", "val", val_fraction=0.1, seed=3)
    assert (len(train), len(val)) == (900, 100)

    def rows(dataset):
        return {tuple(row.tolist()) for row in dataset.tensors()[0]}

    assert not rows(train) & rows(val)
    assert rows(train) | rows(val) == rows(get_dataset("moons", "train"))
    assert rows(get_dataset("moons", "val", val_fraction=0.1, seed=4)) != rows(val)
    train_idx, val_idx = holdout_indices(1437, 0.1, seed=0)
    assert len(val_idx) == 143 and sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(1437))
    assert len(get_dataset("digits", "val", val_fraction=0.1)) == 143
    assert len(get_dataset("digits", "train", n=100)) == 100
    with pytest.raises(ValueError, match="val_fraction"):
        get_dataset("digits", "val")


@pytest.mark.parametrize("augment", list(AUGMENTATIONS))
@pytest.mark.parametrize("name,like", [("digits", None), ("natural_patches", "CIFAR10")])
def test_augmentations_keep_shape_and_range(augment, name, like):
    torch.manual_seed(0)
    plain = get_dataset(name, "test", like=like, n=64)
    augmented = get_dataset(name, "test", like=like, n=64, augment=augment)
    x_plain, _ = _all_items(plain)
    x_aug, _ = _all_items(augmented)
    assert x_aug.shape == x_plain.shape and 0.0 <= float(x_aug.min()) and float(x_aug.max()) <= 1.0
    unchanged = (x_aug == x_plain).flatten(1).all(1).float().mean()
    if augment == "ccu":  # RandomChoice([augmented, plain]): about half pass through untouched
        assert 0.3 < float(unchanged) < 0.8
    else:
        assert float(unchanged) < 0.4


def test_unknown_names_raise_one_line_listing_valid():
    with pytest.raises(ValueError, match="valid: MNIST, FMNIST"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="valid: ccu, acet, ddu"):
        get_dataset("digits", augment="flip")
    with pytest.raises(ValueError, match="valid: train, test, val"):
        get_dataset("digits", "validation")
    with pytest.raises(ValueError, match="needs images"):
        get_dataset("moons", augment="ccu")
    assert get_dataset("moons", augment=True).transform is None  # moons has no default augmentation
    assert get_dataset("digits", augment="none").transform is None
    assert data.get_dataset is get_dataset
