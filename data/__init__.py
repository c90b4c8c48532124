"""Datasets: torchvision-backed real sets, ImageFolder OOD sets, built-in offline sets and noise families.

Every dataset yields (x, y): x float32 in [0, 1] of shape (C, H, W) (or (D,) for two moons), y int64
(-1 for unlabeled OOD and noise sets). See ``get_dataset`` for the arguments. Wherever a key is accepted,
``NAME=PATH`` names a user's image folder or .npz file (data/path_sets.py).
"""
from data.base import DatasetNotFoundError, TensorImageDataset
from data.noise import acet_noise_batch, ccu_noise_batch, gaussian_batch, uniform_batch
from data.path_sets import PathSetError, set_name, unique_sets
from data.registry import (DATASETS, OOD_TEST, SET_LIST_FORMS, DatasetListAction, DatasetSpec, check_dataset,
                           dataset_arg, dataset_info, dataset_list, default_augment, get_dataset)
from data.transforms import AUGMENTATIONS

__all__ = [
    "AUGMENTATIONS", "DATASETS", "OOD_TEST", "SET_LIST_FORMS", "DatasetListAction", "DatasetNotFoundError",
    "DatasetSpec", "PathSetError", "TensorImageDataset", "acet_noise_batch", "ccu_noise_batch", "check_dataset",
    "dataset_arg", "dataset_info", "dataset_list", "default_augment", "gaussian_batch", "get_dataset", "set_name",
    "uniform_batch", "unique_sets",
]
