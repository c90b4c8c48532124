"""Wide ResNet (Zagoruyko & Komodakis, arXiv 1605.07146) as DDU and ODIN use it (docs/methods.md#architectures):
WRN-28-10 by default.

conv3x3 16 stem; 3 stages of n = (depth - 4) / 6 pre-activation blocks with widths 16k/32k/64k
(k = widen_factor) and strides 1/2/2. A block is BN-act-conv3x3(stride), BN-act, dropout, conv3x3, plus a
shortcut on the block input: identity, or a strided 1x1 conv when the shape changes (`mod`: avg-pool + zero
channel padding). Final BN-act, global average pool (avgpool 8 at 32x32), FC; features = the 64k-d vector.
BN momentum 0.01 (PyTorch convention), Kaiming-normal fan_out init. `dropout` (DDU: 0.3) sits between the two
convs of every block, as in DDU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.common import (Backbone, NormalizeSpec, PoolPadShortcut, activation, batch_norm, check_input_size,
                           finalize, make_normalize)

BN_MOMENTUM = 0.01


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float, mod: bool) -> None:
        super().__init__()
        self.bn1, self.act1 = batch_norm(in_planes, BN_MOMENTUM), activation(mod)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.act2 = batch_norm(planes, BN_MOMENTUM), activation(mod)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif mod:
            self.shortcut = PoolPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + self.shortcut(x)


class WideResNet(Backbone):
    arch = "wrn"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, depth: int = 28, widen_factor: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        size = check_input_size(self.arch, input_size)
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = make_normalize(normalize)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages, in_planes = [], 16
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBlock(in_planes, planes, s, dropout, mod))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn, self.act = batch_norm(in_planes, BN_MOMENTUM), activation(mod)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(self.normalize(x)))
        return self.pool(self.act(self.bn(out))).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)
