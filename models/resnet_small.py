"""ACET's ResNetSmall (Hein, Andriushchenko, Bitterwolf, arXiv 1812.05720; docs/methods.md#architectures): a
pre-activation ResNet-20 (He et al., arXiv 1603.05027) for SVHN / CIFAR.

conv3x3 16 stem; 3 stages of `units` (3) units with widths 16/32/64 and strides 1/2/2; each unit is
BN-act-conv3x3, BN-act-conv3x3 plus a shortcut; the first unit of every stage applies its BN-act before the
split, so its shortcut also sees the activated input; shortcut = avg-pool(stride) + zero channel padding
(parameter-free); final BN-act, global average pool, FC. BN momentum 0.99 in TensorFlow's convention, i.e.
PyTorch momentum 0.01; eps 1e-5. Features: the pooled 64-d vector. `mod` switches to leaky ReLU (the shortcuts
are already DDU-style). `dropout` > 0 applies dropout to the features before the FC.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from models.common import (Backbone, NormalizeSpec, PoolPadShortcut, activation, batch_norm, check_input_size,
                           finalize, make_normalize)

BN_MOMENTUM = 0.01  # TF decay 0.99


class PreActUnit(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, activate_before_residual: bool,
                 mod: bool, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.bn1, self.act1 = batch_norm(in_planes, bn_momentum), activation(mod)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.act2 = batch_norm(planes, bn_momentum), activation(mod)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.activate_before_residual = activate_before_residual
        self.shortcut = PoolPadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        residual = pre if self.activate_before_residual else x
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + self.shortcut(residual)


class ResNetSmall(Backbone):
    arch = "resnet_small"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, units: int = 3, widths: Sequence[int] = (16, 32, 64),
                 bn_momentum: float = BN_MOMENTUM) -> None:
        """`bn_momentum` is PyTorch's (ACET: 0.01); short runs on small data want PyTorch's default 0.1, since
        running statistics with momentum 0.01 need a few hundred steps to settle."""
        super().__init__()
        size = check_input_size(self.arch, input_size)
        self.normalize = make_normalize(normalize)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [PreActUnit(in_planes, planes, stride, True, mod, bn_momentum)]
            blocks += [PreActUnit(planes, planes, 1, False, mod, bn_momentum) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.bn, self.act = batch_norm(in_planes, bn_momentum), activation(mod)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(self.normalize(x)))
        return self.pool(self.act(self.bn(out))).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))
