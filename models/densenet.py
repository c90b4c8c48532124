"""DenseNet-BC (Huang et al., arXiv 1608.06993) as ODIN's pretrained `DenseNet3(100, K)`
(docs/methods.md#architectures).

conv3x3 stem to 2*growth channels; 3 dense blocks of n = (depth - 4) / 6 bottleneck layers
(BN-act-conv1x1 to 4*growth, BN-act-conv3x3 to growth, output concatenated to the input); between blocks a
transition BN-act-conv1x1 (channels x reduction) + avgpool 2; final BN-act, global average pool (avgpool 8 at
32x32), FC. Defaults: depth 100, growth 12, reduction 0.5 (DenseNet-BC-100, 342-d features). Conv init
N(0, 2 / (k*k*C_out)), BN (1, 0), FC bias 0. `dropout` follows every conv, as DenseNet3's dropRate (ODIN: 0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Backbone, NormalizeSpec, activation, check_input_size, finalize, make_normalize


class DenseLayer(nn.Module):
    def __init__(self, in_planes: int, growth: int, dropout: float, mod: bool) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(in_planes), activation(mod)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(4 * growth), activation(mod)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.act1(self.bn1(x))))
        out = self.dropout(self.conv2(self.act2(self.bn2(out))))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, dropout: float, mod: bool) -> None:
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(in_planes), activation(mod)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.dropout(self.conv(self.act(self.bn(x)))), 2)


class DenseNetBC(Backbone):
    arch = "densenet_bc100"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, depth: int = 100, growth_rate: int = 12, reduction: float = 0.5) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"densenet_bc100: depth must be 6n + 4 with n >= 1 (10, 16, ..., 100), got {depth}")
        size = check_input_size(self.arch, input_size)
        n = (depth - 4) // 6
        self.normalize = make_normalize(normalize)
        planes = 2 * growth_rate
        self.stem = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        blocks: list = []
        for b in range(3):
            for _ in range(n):
                blocks.append(DenseLayer(planes, growth_rate, dropout, mod))
                planes += growth_rate
            if b < 2:
                out_planes = int(math.floor(planes * reduction))
                blocks.append(Transition(planes, out_planes, dropout, mod))
                planes = out_planes
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.act = nn.BatchNorm2d(planes), activation(mod)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = planes
        self.fc = nn.Linear(planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(self.normalize(x)))
        return self.pool(self.act(self.bn(out))).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)
