"""VGG-13 / VGG-16 with batch norm (Simonyan & Zisserman, arXiv 1409.1556) in the CIFAR layout of
kuangliu/pytorch-cifar, used by CCU's MC-dropout baseline (VGG-13) and DDU (VGG-16), docs/methods.md#architectures.

Stages of conv3x3-BN-act with max-pool 2 between them, global average pool, FC; features 512 (x width/64).
Max-pools use ceil_mode so 28x28 inputs reach 1x1 as 32x32 ones do (identical results at 32x32).
`mod` switches to leaky ReLU (VGG has no shortcuts). `dropout` > 0 applies dropout to the features before the
FC (CCU's MC-dropout VGG: 0.5).

`vgg13_nobn` is the classifier of the confident-classifier GAN (Lee et al., ICLR 2018, arXiv 1711.09325;
alinlab/Confident_classifier src/models/vgg.py): configuration "B" without batch norm (biased 3x3 convs + ReLU,
max-pools), flattened, then FC 512 -> ReLU -> dropout -> FC 512 -> ReLU -> dropout -> FC K, dropout 0.5 in the
original. Convs start N(0, sqrt(2 / (9 * out_channels))), FCs N(0, 0.01), biases 0, as there. Features are the
second FC's ReLU output (the input of the last dropout + Linear).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.common import Backbone, NormalizeSpec, activation, check_input_size, finalize, make_normalize

# numbers are conv widths at width=64, "M" a max-pool
CONFIGS = {
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def conv_stack(config: list, in_channels: int, width: int, mod: bool, batch_norm: bool) -> tuple[list, int]:
    """The conv stages of a VGG configuration ("M" a ceil-mode max-pool): conv3x3 (+BN) + activation per number,
    widths scaled by width/64; returns (layers, output channels). With batch norm the convs carry no bias."""
    layers: list = []
    planes = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        out_planes = int(item) * width // 64
        conv = nn.Conv2d(planes, out_planes, 3, 1, 1, bias=not batch_norm)
        layers += [conv, nn.BatchNorm2d(out_planes), activation(mod)] if batch_norm else [conv, activation(mod)]
        planes = out_planes
    return layers, planes


class VGG(Backbone):
    def __init__(self, arch: str, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, width: int = 64) -> None:
        super().__init__()
        self.arch = arch
        size = check_input_size(arch, input_size)
        self.normalize = make_normalize(normalize)
        layers, planes = conv_stack(CONFIGS[arch], in_channels, width, mod, batch_norm=True)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = planes
        self.fc = nn.Linear(planes, num_classes)
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(self.normalize(x))).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class VGGNoBN(Backbone):
    """VGG without batch norm and with the original VGG's two hidden FC layers (module docstring)."""

    def __init__(self, arch: str, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None,
                 mod: bool = False, width: int = 64) -> None:
        super().__init__()
        self.arch = arch
        size = check_input_size(arch, input_size)
        self.normalize = make_normalize(normalize)
        layers, _ = conv_stack(CONFIGS[arch.removesuffix("_nobn")], in_channels, width, mod, batch_norm=False)
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        hidden = 512 * width // 64
        # 512 x 1 x 1 after five pools at 32x32 (the original); other sides flatten whatever is left
        self.mlp = nn.Sequential(nn.Linear(self._flat_size(in_channels, size), hidden), activation(mod),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden), activation(mod))
        self.dropout = nn.Dropout(dropout)
        self.num_features = hidden
        self.fc = nn.Linear(hidden, num_classes)
        self._init_weights()
        finalize(self, (in_channels, size, size), spectral_norm_coeff, sn_exclude=[self.fc])

    def _flat_size(self, in_channels: int, size: int) -> int:
        with torch.no_grad():
            try:
                return self.body(torch.zeros(1, in_channels, size, size)).shape[1]
            except RuntimeError as err:
                raise ValueError(f"{self.arch} cannot take input shape {(in_channels, size, size)}: "
                                 f"{str(err).splitlines()[0]}") from None

    def _init_weights(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, 0.0, (2.0 / (9 * layer.out_channels)) ** 0.5)
                nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.zeros_(layer.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.body(self.normalize(x)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


def vgg13_nobn(**kwargs) -> VGGNoBN:
    return VGGNoBN("vgg13_nobn", **kwargs)


def vgg13(**kwargs) -> VGG:
    return VGG("vgg13", **kwargs)


def vgg16(**kwargs) -> VGG:
    return VGG("vgg16", **kwargs)
