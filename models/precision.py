"""Full precision for the computations whose soundness depends on rounding (densities, bounds).

It lives with the models because the models use it on their own outputs (CCU's mixtures and output formula);
`utils.amp` re-exports it for the scripts and the training loop.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


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
