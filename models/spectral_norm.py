"""Soft spectral normalisation, as DDU uses it (Mukhoti et al., "Deep Deterministic Uncertainty", arXiv 2102.11582).

Every normalised layer's weight is re-parametrised as

    W_sn = W / max(1, sigma_hat / c)

so the layer's Lipschitz constant is at most the coefficient c (default 3.0 in DDU), while layers that are
already below c are left unchanged ("soft" normalisation, unlike Miyato et al.'s W / sigma).

sigma_hat estimates the operator norm of the layer:
  * convolutions with a kernel larger than 1x1: the norm of the convolution *as a linear map on its actual
    input size* (Gouk et al. / Behrmann et al.), estimated by power iteration with `conv2d` and its adjoint
    `conv_transpose2d` (stride, padding and dilation aware);
  * 1x1 convolutions and linear layers: the matrix spectral norm of the weight reshaped to (out, -1) (for a
    strided 1x1 conv this is an upper bound of the operator norm).

One power iteration runs per training-mode evaluation of `layer.weight`; in eval mode the stored u, v buffers
are reused, so an evaluated model is deterministic. sigma_hat = <u, W v> is differentiable in W (u, v are
constants), as in `torch.nn.utils.parametrizations.spectral_norm`.

Implemented with `torch.nn.utils.parametrize`, so `layer.weight` is the normalised weight wherever it is read.
Differences from DDU's code: DDU adds 1e-5 to the conv divisor; here the divisor is max(1, sigma_hat/c) for
every layer type (it is >= 1, so there is nothing to guard against).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# power iterations run once at registration so a fresh model starts from a sensible estimate; cheap enough to
# keep model construction (and `load_run`, whose buffers are then overwritten) fast on CPU
INIT_ITERATIONS = 3


def _unit(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return t / t.norm().clamp_min(eps)


class _SoftSpectralNorm(nn.Module):
    """Shared forward: optional power step (training only), then W / max(1, <u, W v> / coeff)."""

    def __init__(self, coeff: float, n_power_iterations: int) -> None:
        super().__init__()
        if not coeff > 0:
            raise ValueError(f"spectral_norm_coeff must be > 0, got {coeff}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations

    def _power_step(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _sigma(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Current estimate sigma_hat of the un-normalised weight's operator norm (no power step)."""
        return self._sigma(weight, self._u, self._v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                for _ in range(self.n_power_iterations):
                    self._power_step(weight)
        # clones: the buffers are updated in place by the next training forward, which must not invalidate
        # an autograd graph that still holds them
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = self._sigma(weight, u, v)
        return weight / torch.clamp(sigma / self.coeff, min=1.0)


class SoftSpectralNormMatrix(_SoftSpectralNorm):
    """Soft SN with the matrix norm of weight.reshape(out, -1): linear layers and 1x1 convolutions."""

    def __init__(self, weight: torch.Tensor, coeff: float, n_power_iterations: int = 1) -> None:
        super().__init__(coeff, n_power_iterations)
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        self.register_buffer("_u", _unit(torch.randn(out_dim, dtype=weight.dtype, device=weight.device)))
        self.register_buffer("_v", _unit(torch.randn(in_dim, dtype=weight.dtype, device=weight.device)))
        with torch.no_grad():
            for _ in range(INIT_ITERATIONS):
                self._power_step(weight.detach())

    def _power_step(self, weight: torch.Tensor) -> None:
        matrix = weight.flatten(1)  # (out, in * kh * kw)
        self._v.copy_(_unit(matrix.t() @ self._u))
        self._u.copy_(_unit(matrix @ self._v))

    def _sigma(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.dot(u, weight.flatten(1) @ v)


class SoftSpectralNormConv(_SoftSpectralNorm):
    """Soft SN with the operator norm of a convolution on inputs of shape `input_shape` = (C, H, W)."""

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int], coeff: float,
                 n_power_iterations: int = 1) -> None:
        super().__init__(coeff, n_power_iterations)
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("conv spectral norm needs groups=1, zero padding given as integers")
        if len(input_shape) != 3 or input_shape[0] != conv.in_channels:
            raise ValueError(f"input_shape {tuple(input_shape)} does not fit conv with {conv.in_channels} "
                             "input channels")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        weight = conv.weight.detach()
        v = _unit(torch.randn(1, *input_shape, dtype=weight.dtype, device=weight.device))
        out = F.conv2d(v, weight, None, self.stride, self.padding, self.dilation)
        # conv_transpose2d must map the output back onto the exact input size (strided convs lose the remainder)
        self.output_padding = tuple(
            size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, o, s, p, d, k in zip(input_shape[1:], out.shape[2:], self.stride, self.padding,
                                           self.dilation, weight.shape[2:]))
        self.input_shape = tuple(int(s) for s in input_shape)
        self.register_buffer("_v", v)
        self.register_buffer("_u", _unit(torch.randn_like(out)))
        with torch.no_grad():
            for _ in range(INIT_ITERATIONS):
                self._power_step(weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)

    def _power_step(self, weight: torch.Tensor) -> None:
        adjoint = F.conv_transpose2d(self._u, weight, None, self.stride, self.padding, self.output_padding,
                                     1, self.dilation)
        self._v.copy_(_unit(adjoint))
        self._u.copy_(_unit(self._conv(self._v, weight)))

    def _sigma(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u * self._conv(v, weight)).sum()


def spectral_norm(module: nn.Module, coeff: float, input_shape: Optional[Sequence[int]] = None,
                  n_power_iterations: int = 1) -> nn.Module:
    """Register soft spectral normalisation on `module.weight` (a Linear or Conv2d) and return the module.

    `input_shape` = (C, H, W) of the conv's input is required for convolutions larger than 1x1.
    """
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
        if input_shape is None:
            raise ValueError("spectral_norm of a conv larger than 1x1 needs its input_shape (C, H, W)")
        param = SoftSpectralNormConv(module, input_shape, coeff, n_power_iterations)
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        param = SoftSpectralNormMatrix(module.weight, coeff, n_power_iterations)
    else:
        raise ValueError(f"spectral_norm supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", param)
    return module


def apply_spectral_norm(model: nn.Module, coeff: float, input_shapes: dict,
                        exclude: Iterable[nn.Module] = (), include_linear: bool = False) -> nn.Module:
    """Soft-SN every Conv2d of `model` (and every nn.Linear when include_linear), except modules in `exclude`.

    `input_shapes` maps each conv module to its recorded (C, H, W) input shape (see `models.common`).
    """
    skip = {id(m) for m in exclude}
    kinds = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    for module in list(model.modules()):
        if isinstance(module, kinds) and id(module) not in skip:
            spectral_norm(module, coeff, input_shapes.get(module))
    return model
