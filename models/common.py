"""Pieces shared by every backbone: the features/head contract, input normalisation, activations, shortcuts,
and the construction-time dry forward (shape check + input sizes for spectral normalisation)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.spectral_norm import apply_spectral_norm

NormalizeSpec = Optional[Tuple[Sequence[float], Sequence[float]]]


class Normalize(nn.Module):
    """(x - mean) / std per channel (or per feature for flat inputs): the model's first layer, so that code
    outside the model always works in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or bool((std_t <= 0).any()):
            raise ValueError(f"normalize needs mean and std of equal length with std > 0, got {mean}, {std}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over channels (dim 1) of (N, C, ...) or (N, D)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def make_normalize(normalize: NormalizeSpec) -> nn.Module:
    if normalize is None:
        return nn.Identity()
    if len(normalize) != 2:
        raise ValueError(f"normalize must be None or (mean, std), got {normalize!r}")
    return Normalize(*normalize)


def activation(mod: bool) -> nn.Module:
    """ReLU, or leaky ReLU with slope 0.01 under DDU's `-mod` (docs/methods.md#ddu-architecture)."""
    return nn.LeakyReLU(0.01) if mod else nn.ReLU()


def batch_norm(channels: int, momentum: float = 0.1) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum)


class PoolPadShortcut(nn.Module):
    """Parameter-free shortcut: avg-pool(stride) then zero channels (ACET's ResNet, DDU's `-mod`).

    ceil_mode keeps the spatial size equal to that of a stride-s conv with 'same' padding for odd inputs too
    (7 -> 4), and the average there is over the in-bounds pixels only.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"zero-pad shortcut cannot shrink channels {in_planes} -> {out_planes}")
        self.stride, self.extra = stride, out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class Backbone(nn.Module):
    """Base class: `features(x)` -> (N, num_features), `head(f)` -> logits, forward(x) = head(features(x)).
    Subclasses name their output layer `fc` and end their constructor with `finalize`."""

    arch: str = ""
    num_features: int = 0
    num_classes: int = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_input_size(arch: str, input_size: object) -> int:
    """An image backbone takes square inputs: input_size is the int H = W."""
    if isinstance(input_size, (list, tuple)) and len(input_size) == 2 and input_size[0] == input_size[1]:
        input_size = input_size[0]
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"{arch}: input_size must be a positive int (H = W), got {input_size!r}")
    return input_size


def record_input_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """Run one sample of shape `input_shape` through `model` (eval mode, no grad) and return the per-sample
    input shape of every Conv2d / Linear. An input the architecture cannot take raises a one-line ValueError."""
    shapes: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: shapes.__setitem__(mod, tuple(args[0].shape[1:])))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{model.arch} cannot take input shape {tuple(input_shape)}: {reason}") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return shapes


def finalize(model: Backbone, input_shape: Sequence[int], spectral_norm_coeff: Optional[float],
             sn_exclude: Iterable[nn.Module] = (), include_linear: bool = False) -> Backbone:
    """Validate the input shape with a dry forward, then apply soft spectral normalisation when asked.
    Also records `model.num_classes` from the output layer `model.fc`."""
    model.num_classes = model.fc.out_features
    shapes = record_input_shapes(model, input_shape)
    if spectral_norm_coeff is not None:
        apply_spectral_norm(model, spectral_norm_coeff, shapes, sn_exclude, include_linear)
    return model
