"""OOD sets a user brings as files: ``NAME=PATH`` wherever a dataset key is accepted.

PATH is either an image folder (searched at any depth; every file must be an image PIL can read; hidden files
are ignored) or a ``.npz`` file whose array ``x`` holds uint8 images of shape (N, H, W) or (N, H, W, C), C in
{1, 3, 4}. NAME is what result rows and tables show.

Every image is brought to the in-distribution's shape (C, H, W) by one rule: PIL converts it to grey ("L",
ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B) or RGB (grey replicated, alpha dropped) to match C, then
``Image.resize((W, H), BILINEAR)`` scales the whole image (no crop, aspect ratio not kept); PIL's bilinear
filter widens with the scale factor when shrinking, i.e. it is antialiased. Images already at H x W are
unchanged. All files are read (and checked) at once, so one error names every unreadable file before any
result or run folder is written; the set is then held in memory as uint8. Every split is the whole set, in
sorted file order (``n`` keeps the first n).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.base import DatasetNotFoundError, TensorImageDataset

MAX_LISTED = 10  # unreadable files named in the error message
# names the evaluation uses for sets of its own ("in": the in-distribution test set); a user's set may not take them
RESERVED_NAMES = ("in",)


class PathSetError(ValueError):
    """A ``NAME=PATH`` set that cannot be used (bad form, unreadable files, wrong array); the message says why."""


def is_path_set(key: str) -> bool:
    """True for ``NAME=PATH`` keys (registry keys never contain "=")."""
    return "=" in key


def split_key(key: str) -> tuple[str, str]:
    """(NAME, PATH) of a ``NAME=PATH`` key, with NAME checked (non-empty, no "," "/" or whitespace)."""
    name, _, path = key.partition("=")
    name = name.strip()
    if not name or not path or any(c in name for c in ",/\\") or any(c.isspace() for c in name):
        raise PathSetError(f"{key!r}: expected NAME=PATH with a short NAME (no spaces, ',' or '/') and a PATH to an "
                           "image folder or a .npz file")
    if name in RESERVED_NAMES:
        raise PathSetError(f"{key!r}: the NAME {name!r} is reserved (the in-distribution test set); give the set "
                           "another NAME")
    return name, os.path.expanduser(path)


def set_name(key: str) -> str:
    """The name rows and tables show for a dataset key: NAME for ``NAME=PATH``, the key itself otherwise."""
    return split_key(key)[0] if is_path_set(key) else key


def unique_sets(keys: list[str]) -> list[str]:
    """``keys`` with exact repeats dropped (first kept); two different sets under one NAME (``a=x.npz,a=y.npz``)
    raise PathSetError, since rows and tables would show only one of them under that name. Every script that
    takes a list of sets passes it through here."""
    kept: dict[str, str] = {}
    for key in keys:
        name = set_name(key)
        if name in kept and kept[name] != key:
            raise PathSetError(f"two OOD sets are named {name!r} ({kept[name]!r} and {key!r}); rows and tables "
                               "keep one set per NAME, so give each its own NAME")
        kept.setdefault(name, key)
    return list(kept.values())


def _to_shape(image: Image.Image, shape: tuple[int, ...]) -> np.ndarray:
    """One PIL image -> uint8 (H, W, C) at ``shape`` = (C, H, W), by the rule of the module docstring."""
    channels, height, width = shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not files:
        raise PathSetError(f"{folder}: the folder holds no files; put the OOD images there (any depth)")
    return files


def _read_folder(folder: Path, shape: tuple[int, ...]) -> np.ndarray:
    images, bad = [], []
    for path in _image_files(folder):
        try:
            with Image.open(path) as image:
                images.append(_to_shape(image, shape))
        except Exception as error:  # noqa: BLE001 (PIL raises many kinds; all mean "not a readable image")
            bad.append(f"{path.relative_to(folder)} ({type(error).__name__}: {error})")
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise PathSetError(f"{folder}: {len(bad)} of {len(bad) + len(images)} files are not readable images: "
                           f"{listed}. Remove or convert them (any format PIL opens works)")
    return np.stack(images)


def _read_npz(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise PathSetError(f"{path}: no array 'x' (found: {', '.join(archive.files) or 'none'}); save the "
                                   "images with np.savez(path, x=images)")
            x = archive["x"]
    except PathSetError:
        raise
    except Exception as error:  # noqa: BLE001 (zip/pickle/format errors: the file is unreadable)
        raise PathSetError(f"{path}: not a readable .npz file ({_npz_reason(error)}); save the images with "
                           "np.savez(path, x=images)") from None
    if not isinstance(x, np.ndarray):  # numpy hands back the raw bytes of a member that is not a .npy file
        raise PathSetError(f"{path}: its member x.npy is not a .npy array file; save the images with "
                           "np.savez(path, x=images)")
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3, 4)) or not len(x):
        raise PathSetError(f"{path}: 'x' must be uint8 images of shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; "
                           f"got {x.dtype} {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[:, :, :, 0]  # PIL reads (H, W) arrays as grey
    return np.stack([_to_shape(Image.fromarray(image), shape) for image in x])


def _npz_reason(error: Exception) -> str:
    """Why numpy could not read the file, in our words: numpy's own message for a file that is neither a zip
    archive nor a .npy array advises loading it with pickle, which this project never does."""
    text = str(error)
    if "pickle" in text:
        return "it is neither a zip archive of .npy arrays nor a .npy array"
    first = text.splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


@functools.lru_cache(maxsize=4)
def _load(path: str, shape: tuple[int, ...], stamp: int) -> torch.Tensor:
    """uint8 (N, C, H, W) of the set at ``path``, converted to ``shape``; cached (a check reads it once) while
    ``stamp`` (the path's modification time) is unchanged."""
    if len(shape) != 3:
        raise PathSetError(f"image sets need an image in-distribution (C, H, W), not shape {shape}")
    file = Path(path)
    if not file.exists():
        raise DatasetNotFoundError(f"{file} does not exist; NAME=PATH needs an image folder or a .npz file")
    images = _read_npz(file, shape) if file.is_file() else _read_folder(file, shape)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def load_path_set(key: str, shape: tuple[int, ...]) -> TensorImageDataset:
    """The ``NAME=PATH`` set as unlabeled (y = -1) images in [0, 1] of ``shape``; raises PathSetError naming
    every unreadable file."""
    _, path = split_key(key)
    path = os.path.abspath(path)
    images = _load(path, tuple(shape), os.stat(path).st_mtime_ns if os.path.exists(path) else 0)
    return TensorImageDataset(images, torch.full((len(images),), -1, dtype=torch.int64), scale=255.0)
