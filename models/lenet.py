"""Small MNIST ConvNets.

* `LeNet` (LeNetMadry of CCU and ACET, docs/methods.md#architectures): conv5x5 32 (pad 2), act, maxpool 2, conv5x5 64
  (pad 2), act, maxpool 2, FC 1024, act, FC K; init N(0, 2/fan_in) with zero biases as ACET. The first FC's in-size is
  computed from input_size (3136 at 28x28, 256 at 8x8). Features: the 1024-d hidden layer.
* `LeNetDDU` (DDU, arXiv 2102.11582): conv5x5 6, act, maxpool 2, conv5x5 16, act, maxpool 2, FC 120, act,
  FC 84, act, FC K (no padding: 28x28 -> 16x4x4). Features: the 84-d layer.

Neither is ever spectrally normalised (DDU never does): spectral_norm_coeff must be None.
`dropout` > 0 puts dropout before the output layer (CCU's MC-dropout LeNet).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.common import Backbone, NormalizeSpec, activation, check_input_size, finalize, make_normalize


def _no_spectral_norm(arch: str, spectral_norm_coeff: Optional[float]) -> None:
    if spectral_norm_coeff is not None:
        raise ValueError(f"{arch} does not support spectral_norm_coeff (DDU never normalises LeNet); use None")


def _too_small(arch: str, in_channels: int, input_size: int) -> ValueError:
    return ValueError(f"{arch} cannot take input shape {(in_channels, input_size, input_size)}: too small for "
                      "its convolutions and pooling")


class LeNet(Backbone):
    arch = "lenet"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False) -> None:
        super().__init__()
        _no_spectral_norm(self.arch, spectral_norm_coeff)
        size = check_input_size(self.arch, input_size)
        side = size // 2 // 2  # two 'same' convs, two floor max-pools
        if side < 1:
            raise _too_small(self.arch, in_channels, size)
        self.normalize = make_normalize(normalize)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), activation(mod), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), activation(mod), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(64 * side * side, 1024)
        self.act = activation(mod)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(1024, num_classes)
        self.num_features = 1024
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):  # ACET: N(0, 2 / fan_in), zero bias
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        finalize(self, (in_channels, size, size), None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(self.conv(self.normalize(x)).flatten(1)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class LeNetDDU(Backbone):
    arch = "lenet_ddu"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False) -> None:
        super().__init__()
        _no_spectral_norm(self.arch, spectral_norm_coeff)
        size = check_input_size(self.arch, input_size)
        side = ((size - 4) // 2 - 4) // 2  # valid 5x5 conv, pool, valid 5x5 conv, pool
        if size < 14 or side < 1:
            raise _too_small(self.arch, in_channels, size)
        self.normalize = make_normalize(normalize)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), activation(mod), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), activation(mod), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.act1, self.act2 = activation(mod), activation(mod)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(84, num_classes)
        self.num_features = 84
        finalize(self, (in_channels, size, size), None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act1(self.fc1(self.conv(self.normalize(x)).flatten(1)))
        return self.act2(self.fc2(hidden))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))
