"""Architectures with the features/head contract, soft spectral normalisation, and run-folder loading.

`MODELS[name](num_classes=..., in_channels=..., input_size=..., dropout=0.0, normalize=None | (mean, std),
spectral_norm_coeff=None, mod=False, **arch_kwargs)` -> a module with `forward(x)` (logits), `features(x)`
((N, num_features) penultimate vector) and `head(f)`, where forward(x) == head(features(x)). `input_size` is
the image side H = W (for `mlp`: the flat input dim, or a shape whose product it is). Arch kwargs:
mlp `widths`; resnet18/34/50 and vgg13/16/13_nobn `width` (base width, 64); resnet_small `units`, `widths`;
wrn `depth`, `widen_factor`; densenet_bc100 `depth`, `growth_rate`, `reduction`; good_cnn(_s/_l/_xl)
`width`, `negative_head` (good_cnn also `size`: S, L or XL; default L for one channel, XL otherwise).
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from models.densenet import DenseNetBC
from models.good import GoodCNN, good_cnn_l, good_cnn_s, good_cnn_xl
from models.lenet import LeNet, LeNetDDU
from models.mlp import MLP
from models.resnet import resnet18, resnet34, resnet50
from models.resnet_small import ResNetSmall
from models.vgg import vgg13, vgg13_nobn, vgg16
from models.wrn import WideResNet

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "lenet_ddu": LeNetDDU,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet_small": ResNetSmall,
    "wrn": WideResNet,
    "densenet_bc100": DenseNetBC,
    "vgg13": vgg13,
    "vgg13_nobn": vgg13_nobn,
    "vgg16": vgg16,
    "good_cnn": GoodCNN,
    "good_cnn_s": good_cnn_s,
    "good_cnn_l": good_cnn_l,
    "good_cnn_xl": good_cnn_xl,
}

from models.io import build_model, load_run, save_checkpoint  # noqa: E402  (io looks MODELS up at call time)

__all__ = ["MODELS", "build_model", "load_run", "save_checkpoint"]
