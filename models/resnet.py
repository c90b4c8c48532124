"""CIFAR-style post-activation ResNets (He et al., arXiv 1512.03385) in the kuangliu/pytorch-cifar layout that
CCU and DDU use (docs/methods.md#architectures): conv3x3 64 stem (no max-pool), four stages of BasicBlock or Bottleneck
with widths 64/128/256/512 (x `width`/64) and strides 1/2/2/2, global average pool, FC.

Features: the pooled vector (512 for ResNet-18/34, 2048 for ResNet-50). The original uses avgpool 4 on the 4x4
map of a 32x32 input; adaptive pooling is the same there and also takes 28x28 (1-channel stem, DDU's
`mnist=True`) and 8x8 inputs. `mod` (DDU): leaky ReLU, and avg-pool + zero-pad shortcuts instead of 1x1 convs.
`dropout` > 0 applies dropout to the features before the FC.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
from torch import nn

from models.common import (Backbone, NormalizeSpec, PoolPadShortcut, activation, batch_norm, check_input_size,
                           finalize, make_normalize)


def _shortcut(in_planes: int, out_planes: int, stride: int, mod: bool) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    if mod:
        return PoolPadShortcut(in_planes, out_planes, stride)
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), batch_norm(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, mod: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1, self.act1 = batch_norm(planes), activation(mod)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2, self.act2 = batch_norm(planes), activation(mod)
        self.shortcut = _shortcut(in_planes, planes, stride, mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, mod: bool) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1, self.act1 = batch_norm(planes), activation(mod)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.act2 = batch_norm(planes), activation(mod)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3, self.act3 = batch_norm(out_planes), activation(mod)
        self.shortcut = _shortcut(in_planes, out_planes, stride, mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(Backbone):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], num_blocks: Sequence[int], arch: str,
                 num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, width: int = 64) -> None:
        super().__init__()
        self.arch = arch
        size = check_input_size(arch, input_size)
        self.normalize = make_normalize(normalize)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), batch_norm(width),
                                  activation(mod))
        stages, in_planes = [], width
        for i, (n, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(in_planes, width * 2 ** i, s, mod))
                in_planes = width * 2 ** i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(self.normalize(x)))).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2), features 512 (x width/64)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), "resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: BasicBlock x (3, 4, 6, 3), features 512 (x width/64)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), "resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3), features 2048 (x width/64)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), "resnet50", **kwargs)
