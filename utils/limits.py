"""Confidence of ReLU networks far away from the data: exact limits along rays and far-away curves.

Theorem 3.1 of Hein, Andriushchenko & Bitterwolf (CVPR 2019, arXiv 1812.05720; SPEC 2.1): a network that is
affine, f(x) = V^l x + a^l, on each of finitely many polytopes Q_l has, along almost every ray alpha * d, a
class k with lim_{alpha -> inf} softmax_k(f(alpha d)) = 1. Ulmer & Cina (UAI 2021, arXiv 2012.05329; SPEC 5.1)
draw the consequence for every uncertainty score built on the probabilities: it converges, and its input
gradient vanishes.

`limit_analysis` computes the limit exactly. For alpha beyond the last region boundary on the ray the logits
are f(alpha d) = alpha s + b with slope s = V d and intercept b, so

    lim softmax(f(alpha d)) = softmax(b restricted to T),  T = argmax_k s_k  (the tied top slopes)

which is a one-hot vector (limit confidence 1) when the top slope is unique. One forward-mode pass at the
point alpha d with tangent d gives f (primal) and s = J(alpha d) d (tangent) for a whole batch of directions,
and `RegionRecorder` sees, at every ReLU / leaky ReLU / max-pool, the pre-activation z and its slope a along
the ray. Inside the current region each z is affine in alpha, z(alpha') = z + (alpha' - alpha) a, so the ray
never leaves the region iff no unit is heading for a sign change: (z > 0 and a >= 0) or (z <= 0 and a <= 0)
for every ReLU, and for every max-pool window the winner's slope is >= the slopes of the others. Layer by
layer this certifies that the activation pattern is the same for ALL alpha' >= alpha (in particular at
2 alpha, 4 alpha, ...), not only at the points looked at. Directions that are not certified yet are looked at
again at 2 alpha (doubling, from `alpha0`), up to `max_doublings` times; the rest are reported uncertified with
the estimate at the last alpha.

Which networks are piecewise affine is decided while they run: the recorder flags smooth non-linearities
(exp, softmax, sigmoid, tanh, normalisation by input statistics, powers, ...) and products of two
input-dependent tensors applied to input-dependent tensors (a CCU model's Gaussian mixtures, for example);
such a model raises `NotPiecewiseAffineError`, or, with on_non_pa="numeric"/"nan", falls back to the measured
confidence at alpha = 1e6 (`numeric_confidence`) or NaN.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

RELU_LIKE = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
MAX_POOL = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices"}
SMOOTH = {"exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log10", "log1p", "sigmoid", "sigmoid_", "tanh",
          "tanh_", "softmax", "log_softmax", "softmin", "logsumexp", "gelu", "silu", "elu", "selu", "celu",
          "softplus", "mish", "pow", "pow_", "__pow__", "__rpow__", "square", "sqrt", "rsqrt", "reciprocal",
          "norm", "vector_norm", "cdist", "erf", "sin", "cos", "atan", "logit", "layer_norm", "group_norm",
          "instance_norm", "local_response_norm", "normalize", "glu", "var", "std"}
UNTRACKED_PA = {"max", "min", "amax", "amin", "maximum", "minimum", "clamp", "clamp_", "clip", "hardtanh",
                "relu6", "abs", "where", "sort", "topk", "max_pool1d", "max_pool3d", "adaptive_max_pool1d",
                "adaptive_max_pool2d", "hardswish", "hardsigmoid", "prelu", "rrelu"}
BILINEAR = {"mul", "mul_", "__mul__", "__rmul__", "matmul", "__matmul__", "mm", "bmm", "einsum", "bilinear"}
DIVISION = {"div", "div_", "__truediv__", "true_divide"}


class NotPiecewiseAffineError(ValueError):
    """The model applies a non-piecewise-affine operation to its input (Theorem 3.1 does not apply)."""


def _tangent(value: object) -> Optional[torch.Tensor]:
    return fwAD.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None


class RegionRecorder(TorchFunctionMode):
    """Records, during one forward pass, the activation pattern and (under forward-mode AD) whether the ray
    stays in the current linear region; flags operations that are not piecewise affine.

    `patterns`: one (N, units) bool tensor per ReLU-like call (z > 0) and one (N, outputs) argmax-index tensor
    per max-pool; `unstable`: (N,) bool, some unit heads for a sign change along the ray; `violation`: the first
    offending op name or None.
    """

    def __init__(self, batch_size: int, dual: bool = True) -> None:
        super().__init__()
        self.batch_size, self.dual = batch_size, dual
        self.patterns: list[torch.Tensor] = []
        self.unstable = torch.zeros(batch_size, dtype=torch.bool)
        self.violation: Optional[str] = None

    def _flag(self, name: str, why: str) -> None:
        self.violation = self.violation or f"{name} ({why})"

    def _tracks(self, z: torch.Tensor) -> bool:
        """Only units that depend on the input define the region (under forward AD: those with a tangent)."""
        return _tangent(z) is not None if self.dual else z.dim() > 0 and z.shape[0] == self.batch_size

    def _relu(self, z: torch.Tensor) -> None:
        if not self._tracks(z):
            return
        z_flat = z.detach().reshape(self.batch_size, -1)
        self.patterns.append(z_flat > 0)
        slope = _tangent(z)
        if slope is not None:
            a = slope.detach().reshape(self.batch_size, -1)
            heading = ((z_flat > 0) & (a < 0)) | ((z_flat <= 0) & (a > 0))
            self.unstable |= heading.any(1).to(self.unstable.device)

    def _max_pool(self, args: tuple, kwargs: dict) -> None:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
        opts = dict(zip(names, args), **kwargs)
        z, kernel = opts["input"], opts["kernel_size"]
        if not self._tracks(z):
            return
        stride = opts.get("stride") or kernel
        padding, dilation = opts.get("padding", 0), opts.get("dilation", 1)
        if opts.get("ceil_mode", False):
            self._flag("max_pool2d", "ceil_mode windows are not tracked")
            return
        primal = z.detach()
        n, c = primal.shape[:2]
        unfold = dict(kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)
        windows = F.unfold(primal.reshape(n * c, 1, *primal.shape[2:]), **unfold)  # (N*C, k*k, L)
        valid = F.unfold(torch.ones_like(primal[:1, :1]), **unfold).bool()       # padded entries are False
        windows = windows.masked_fill(~valid, float("-inf"))
        winner = windows.argmax(1, keepdim=True)                                  # (N*C, 1, L)
        self.patterns.append(winner.reshape(n, -1))
        slope = _tangent(z)
        if slope is not None:
            a = F.unfold(slope.detach().reshape(n * c, 1, *primal.shape[2:]), **unfold)
            a_win = a.gather(1, winner)
            heading = ((a > a_win) & valid).reshape(n, -1).any(1)  # a loser climbs faster than the winner
            self.unstable |= heading.to(self.unstable.device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        dependent = [_tangent(t) is not None for t in tensors]
        if name in RELU_LIKE:
            self._relu(args[0])
        elif name in MAX_POOL:
            self._max_pool(args, kwargs)
        elif any(dependent):
            if name in SMOOTH:
                self._flag(name, "smooth non-linearity")
            elif name in UNTRACKED_PA:
                self._flag(name, "piecewise affine but not tracked; express it with relu / max_pool2d")
            elif name in BILINEAR and sum(dependent) > 1:
                self._flag(name, "product of two input-dependent tensors")
            elif name in DIVISION and len(args) > 1 and _tangent(args[1]) is not None:
                self._flag(name, "division by an input-dependent tensor")
            elif name == "batch_norm" and (kwargs.get("training") or (len(args) > 5 and args[5])):
                self._flag(name, "batch statistics in training mode")
            elif name == "dropout" and (kwargs.get("training") or (len(args) > 2 and args[2])):
                self._flag(name, "random dropout in training mode")
        return func(*args, **kwargs)
