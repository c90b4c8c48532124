"""Fully connected ReLU network: ACET's two-moons toy MLP 2-100-100-2 (Hein et al., arXiv 1812.05720) and the
Know-your-limits toy MLPs (Ulmer & Cina, arXiv 2012.05329: ReLU + dropout after each hidden layer)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from models.common import Backbone, NormalizeSpec, activation, finalize, make_normalize


def flat_input_dim(input_size: Union[int, Sequence[int]]) -> int:
    """The MLP's input dimension: input_size is the flat dim, or a shape such as (C, H, W) whose product it is."""
    if isinstance(input_size, (list, tuple)):
        dims = [int(d) for d in input_size]
        if not dims or min(dims) < 1:
            raise ValueError(f"mlp: input_size shape must be non-empty and positive, got {input_size!r}")
        return math.prod(dims)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"mlp: input_size must be the flat input dim (int) or a shape, got {input_size!r}")
    return input_size


class MLP(Backbone):
    """x.flatten(1) -> [Linear -> act -> Dropout] per hidden width -> Linear(K); features = last hidden layer.

    Spectral normalisation, when asked, applies to every hidden Linear (never to the output layer).
    """

    arch = "mlp"

    def __init__(self, num_classes: int, in_channels: int, input_size: Union[int, Sequence[int]],
                 dropout: float = 0.0, normalize: NormalizeSpec = None,
                 spectral_norm_coeff: Optional[float] = None, mod: bool = False,
                 widths: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        self.input_dim = in_dim = flat_input_dim(input_size)
        self.normalize = make_normalize(normalize)
        layers: list = []
        for width in widths:
            layers += [nn.Linear(in_dim, int(width)), activation(mod)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = int(width)
        self.body = nn.Sequential(*layers)
        self.num_features = in_dim
        self.fc = nn.Linear(in_dim, num_classes)
        finalize(self, (self.input_dim,), spectral_norm_coeff, sn_exclude=[self.fc], include_linear=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x).flatten(1))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)
