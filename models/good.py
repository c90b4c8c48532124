"""The plain CNNs of GOOD (Bitterwolf, Meinke, Hein, NeurIPS 2020, arXiv 2007.08473) and ProoD's discriminator
(Meinke, Bitterwolf, Hein, NeurIPS 2022, arXiv 2106.04260): 3x3 'same' convolutions, ReLU, no batch norm, so
interval bound propagation (`models/ibp.py`) stays tight.

    S  (ProoD's discriminator): C128 -> C256 s2 -> C256 -> AvgPool2 -> FC128 -> FC K
    L  (GOOD, MNIST):           C64 -> C64 -> C128 s2 -> C128 -> C128 -> FC512 -> FC K
    XL (GOOD, SVHN / CIFAR-10): C128 -> C128 -> C256 s2 -> C256 -> C256 -> FC512 -> FC512 -> FC K

`width` scales every channel and hidden width (1.0 = the papers'; tests use small ones). `good_cnn` picks the
papers' size from the input: L for one channel (MNIST), XL otherwise. `negative_head=True` makes the output
layer `NegativeLinear` (W = -exp(V)): on ReLU features that grow with the input's scale the output then tends to
-infinity, which is what ProoD's discriminator needs far from the data.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Backbone, NormalizeSpec, check_input_size, finalize, make_normalize

# size -> (conv layers as (channels, stride), pool after convs, hidden FC widths)
SIZES: dict[str, tuple[tuple[tuple[int, int], ...], bool, tuple[int, ...]]] = {
    "S": (((128, 1), (256, 2), (256, 1)), True, (128,)),
    "L": (((64, 1), (64, 1), (128, 2), (128, 1), (128, 1)), False, (512,)),
    "XL": (((128, 1), (128, 1), (256, 2), (256, 1), (256, 1)), False, (512, 512)),
}


class NegativeLinear(nn.Module):
    """y = x W^T + b with W = -exp(V) elementwise: every weight strictly negative (ProoD's last layer)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # V and b start as an ordinary nn.Linear's (U(-1/sqrt(in), 1/sqrt(in))), as ProoD's `LinearI_Neg` does:
        # |W| = exp(V) then starts near 1 (within exp(+-1/sqrt(in))), not at the tiny magnitudes of a Linear's
        # weights, which would make d's output nearly constant at the start.
        reference = nn.Linear(in_features, out_features)
        self.log_neg_weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return -self.log_neg_weight.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _side_after(size: int, convs: tuple[tuple[int, int], ...], pool: bool) -> int:
    for _, stride in convs:
        size = (size - 1) // stride + 1  # 3x3 conv, padding 1
    return size // 2 if pool else size


class GoodCNN(Backbone):
    """A GOOD/ProoD plain CNN of size S, L or XL (module docstring); features = the last hidden FC layer."""

    arch = "good_cnn"

    def __init__(self, num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
                 normalize: NormalizeSpec = None, spectral_norm_coeff: Optional[float] = None, mod: bool = False,
                 size: Optional[str] = None, width: float = 1.0, negative_head: bool = False) -> None:
        super().__init__()
        size = size or ("L" if in_channels == 1 else "XL")
        if size not in SIZES:
            raise ValueError(f"unknown GOOD CNN size {size!r}; valid: {', '.join(SIZES)}")
        if dropout or spectral_norm_coeff is not None or mod:
            raise ValueError("the GOOD CNNs take no dropout, spectral normalisation or mod (IBP needs plain ReLU "
                             "layers); leave them at their defaults")
        convs, pool, hidden = SIZES[size]
        scaled = lambda n: max(1, round(n * width))  # noqa: E731
        input_size = check_input_size("good_cnn", input_size)
        side = _side_after(input_size, convs, pool)
        if side < 1:
            raise ValueError(f"good_cnn cannot take input shape {(in_channels, input_size, input_size)}: too small")
        self.size, self.normalize = size, make_normalize(normalize)
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, stride in convs:
            layers += [nn.Conv2d(channels, scaled(out_channels), 3, stride=stride, padding=1), nn.ReLU()]
            channels = scaled(out_channels)
        if pool:
            layers.append(nn.AvgPool2d(2))
        layers.append(nn.Flatten())
        features = channels * side * side
        for width_out in hidden:
            layers += [nn.Linear(features, scaled(width_out)), nn.ReLU()]
            features = scaled(width_out)
        self.body = nn.Sequential(*layers)
        self.num_features = features
        self.fc = NegativeLinear(features, num_classes) if negative_head else nn.Linear(features, num_classes)
        finalize(self, (in_channels, input_size, input_size), None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def ibp_layers(self) -> list[nn.Module]:
        """The layers whose composition is forward (for `models.ibp`)."""
        return [self.normalize, *self.body, self.fc]


def _sized(size: str):
    def build(*args, **kwargs) -> GoodCNN:
        model = GoodCNN(*args, size=size, **kwargs)
        model.arch = f"good_cnn_{size.lower()}"
        return model
    build.__name__ = f"good_cnn_{size.lower()}"
    return build


good_cnn_s, good_cnn_l, good_cnn_xl = _sized("S"), _sized("L"), _sized("XL")
