"""Full precision for the computations whose soundness depends on rounding (densities, bounds), and eval mode
that restores every submodule's own training flag.

It lives with the models because the models use it on their own outputs (CCU's mixtures and output formula);
`utils.amp` re-exports it for the scripts and the training loop.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def full_precision(fn: Callable) -> Callable:
    """Decorator: run `fn` with autocast disabled and its floating-point tensor arguments in at least float32
    (float64 stays float64), for computations whose soundness depends on rounding (densities, bounds)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if _is_low_precision(a) else a for a in args]
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _is_low_precision(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode and restore each submodule's own training flag (not just the root's)."""
    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode
