"""Any network that returns logits, given the features/head contract of the backbones by a forward hook.

The features of a network from elsewhere are, by default, the input of its last `nn.Linear` (in the order of
`named_modules()`), the penultimate vector of the usual classifier; `layer="NAME"` takes the output of the module
NAME of `named_modules()` instead (flattened to (N, F)). `head(f)` is that last Linear when the network's output
is the last Linear applied to the features (checked on the first forward pass): detectors that need the last
layer's weight and bias (vim, nnguide, ...) refuse a network where it is not. Detectors that need features get
them from one forward pass of the unchanged network (`forward_with_features`), so scores are those of the
network itself.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.common import Normalize
from models.ibp import layer_sequence

FEATURE_HEAD_TOL = 1e-5  # |last Linear(features) - output| of a network whose head is that Linear (float32)


class HookedFeatures(nn.Module):
    """`network` (optionally behind a `Normalize` first layer) with features(x), head(f) and
    forward_with_features(x) read off a forward hook; forward(x) is the network's own output."""

    def __init__(self, network: nn.Module, layer: Optional[str] = None,
                 normalize: Optional[Normalize] = None) -> None:
        super().__init__()
        self.network = network
        self.normalize = normalize
        self.features_layer = layer
        self.last_linear_name = last_linear_name(network)
        modules = dict(network.named_modules())
        if layer is not None and layer not in modules:
            names = [name for name in modules if name]
            raise ValueError(f"features layer {layer!r} is not a module of {type(network).__name__}; valid: "
                             f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''}")
        self._head_matches: Optional[bool] = None  # unknown until the first forward pass
        self.num_outputs: Optional[int] = None      # the output width, known after the first forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x if self.normalize is None else self.normalize(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """((N, F) features, logits) of one forward pass of the network; features None for a network without an
        nn.Linear and without a features layer (logit scores need none; `features` says what to do)."""
        if self.features_layer is None and self.last_linear_name is None:
            return None, self(x)
        captured: dict[str, torch.Tensor] = {}
        get = self.network.get_submodule
        handles = []
        if self.last_linear_name is not None:
            def last_hook(module, inputs, output):
                captured["linear_in"], captured["linear_out"] = inputs[0], output
            handles.append(get(self.last_linear_name).register_forward_hook(last_hook))
        if self.features_layer is not None:
            def layer_hook(module, inputs, output):
                captured["layer_out"] = output
            handles.append(get(self.features_layer).register_forward_hook(layer_hook))
        try:
            logits = self(x)
        finally:
            for handle in handles:
                handle.remove()
        key = "layer_out" if self.features_layer is not None else "linear_in"
        if key not in captured:
            raise RuntimeError(f"the features module {self.features_layer or self.last_linear_name!r} was not "
                               "called by the forward pass")
        features = captured[key].flatten(1)
        if self._head_matches is None:
            self._head_matches = self._is_head(features, logits, captured)
            self.num_outputs = int(logits.shape[1])
        return features, logits

    def _is_head(self, features: torch.Tensor, logits: torch.Tensor, captured: dict) -> bool:
        """Whether output == last Linear(features) on this batch."""
        if "linear_in" not in captured or captured["linear_in"].flatten(1).shape != features.shape:
            return False
        with torch.no_grad():
            return bool(captured["linear_out"].shape == logits.shape and
                        torch.allclose(captured["linear_out"], logits, atol=FEATURE_HEAD_TOL, rtol=FEATURE_HEAD_TOL)
                        and torch.equal(captured["linear_in"].flatten(1), features))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_layer is None and self.last_linear_name is None:
            raise ValueError(f"{type(self.network).__name__} has no nn.Linear whose input would be its features; "
                             "name the features module (--features-layer NAME, a name of named_modules())")
        return self.forward_with_features(x)[0]

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The last Linear, when the network's output is that Linear of the features."""
        if self._head_matches is None:
            raise RuntimeError("the head of a hooked network is known after one forward pass: call features(x)")
        if not self._head_matches:
            source = (f"the output of {self.features_layer!r}" if self.features_layer is not None
                      else f"the input of {self.last_linear_name!r}")
            raise ValueError(f"the output of {type(self.network).__name__} is not its last nn.Linear "
                             f"({self.last_linear_name!r}) applied to its features ({source}): this detector needs "
                             "the last layer's weight and bias; use a logit or feature-only detector")
        return self.network.get_submodule(self.last_linear_name)(features)

    def ibp_layers(self) -> list[nn.Module]:
        """The layers of the network (and its Normalize) in forward order, for interval bounds."""
        return ([self.normalize] if self.normalize is not None else []) + layer_sequence(self.network)


def last_linear_name(network: nn.Module) -> Optional[str]:
    """The name of the last nn.Linear of named_modules() (registration order), None when there is none."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def with_features(network: nn.Module, layer: Optional[str] = None) -> nn.Module:
    """`network` itself when it has the features/head contract (the backbones of models/) and no other layer is
    asked for; otherwise the network with features by a forward hook (`HookedFeatures`)."""
    if layer is None and has_feature_contract(network):
        return network
    if isinstance(network, HookedFeatures) and layer in (None, network.features_layer):
        return network
    return HookedFeatures(network, layer)


def has_feature_contract(network: nn.Module) -> bool:
    """forward_with_features(x), or features(x) and head(f) functions (a `features` submodule, as torchvision's
    VGG has, is not the contract: its output is not the penultimate vector)."""
    def is_function(name: str) -> bool:
        value = getattr(network, name, None)
        return callable(value) and not isinstance(value, nn.Module)

    return is_function("forward_with_features") or (is_function("features") and is_function("head"))
