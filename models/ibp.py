"""Interval bound propagation (IBP): provable bounds of a network's outputs over an L-infinity box of inputs.

Gowal et al. 2018 (arXiv 1810.12715) for the propagation; GOOD (Bitterwolf, Meinke, Hein, NeurIPS 2020,
arXiv 2007.08473) for the confidence bound with the last layer "elided" into logit differences. For an input
box [l, u] = [clip(x - eps, 0, 1), clip(x + eps, 0, 1)]:

* affine layers (Linear, Conv2d, AvgPool, eval-mode BatchNorm, the input `Normalize`) map the box's centre
  c = (u + l) / 2 and radius r = (u - l) / 2 to W c + b and |W| r, the exact bounding box of the image;
* monotone elementwise layers (ReLU, LeakyReLU with slope >= 0, MaxPool, Flatten) map l and u directly;
* the last Linear layer is bounded on logit differences: with the penultimate box [l, u],
      ud_kl = max over the box of f_k - f_l = (W_k - W_l) c + |W_k - W_l| r + b_k - b_l,
  which is never looser than u_k - l_l (bounding each logit), and gives the confidence bound
      log max_y p(y|z) <= max_k -log sum_l exp(-ud_kl)      (ud_kk = 0).

The layers of a network are found in forward order (`layer_sequence`): an explicit list of layers, a model's
`ibp_layers()`, an `nn.Sequential` (nested ones flattened), the adapters of the backbones below, and otherwise a
torch.fx trace of any network whatever its class or attribute names, accepted when it is a chain (each operation
takes the previous one's output; F.relu, flatten and x.view(x.size(0), -1) are mapped to their layers). Any
other layer or operation raises `UnsupportedLayerError` naming the first one it cannot bound: a bound is never
computed loosely or wrongly. `confidence_upper_bound` returns the trivial bound 1.0 for such a model only when
the caller asks for it (`trivial_ok=True`, as the GAUC study does: "no certificate"). It evaluates in the
`dtype` it is given: float64 by default here; the GAUC study passes its `--precision` (float32 by default, as
GOOD's and ProoD's evaluations), so that the bound and the confidences it is compared with are rounded alike.
Training-time bounds (GOOD, ProoD) run in the inputs' dtype (float32) and need not be certificates.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Normalize
from models.layer_chain import NotAChainError, Reshape, chain_layers
from models.good import NegativeLinear
from models.lenet import LeNet
from models.mlp import MLP
from models.precision import eval_mode


class UnsupportedLayerError(ValueError):
    """A layer (or model) interval bound propagation cannot bound soundly."""


def _centre_radius(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (upper + lower) / 2, (upper - lower) / 2


def _affine(lower: torch.Tensor, upper: torch.Tensor, linear_map: Callable, abs_map: Callable):
    """Image box of an affine map x -> A x + b: centre A c + b, radius |A| r (exact)."""
    centre, radius = _centre_radius(lower, upper)
    mid, rad = linear_map(centre), abs_map(radius)
    return mid - rad, mid + rad


def _layer_weight(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    bias = module.bias.to(dtype) if module.bias is not None else None
    return module.weight.to(dtype), bias


def _linear(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    weight, bias = _layer_weight(module, lower.dtype)
    return _affine(lower, upper, lambda c: F.linear(c, weight, bias), lambda r: F.linear(r, weight.abs()))


def _conv(module: nn.Conv2d, lower: torch.Tensor, upper: torch.Tensor):
    if module.padding_mode != "zeros":
        raise UnsupportedLayerError(f"IBP supports Conv2d with zero padding only, got {module.padding_mode!r}")
    weight, bias = _layer_weight(module, lower.dtype)
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    return _affine(lower, upper, lambda c: F.conv2d(c, weight, bias, **conv),
                   lambda r: F.conv2d(r, weight.abs(), None, **conv))


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, lower: torch.Tensor, upper: torch.Tensor):
    """Eval-mode batch norm is the per-channel affine map x -> scale x + shift (running statistics)."""
    if module.training or module.running_mean is None:
        raise UnsupportedLayerError("IBP bounds batch norm in eval mode only (with running statistics); call "
                                    "model.eval() first")
    dtype = lower.dtype
    scale = module.running_var.to(dtype).add(module.eps).rsqrt()
    if module.weight is not None:
        scale = scale * module.weight.to(dtype)
    shift = -module.running_mean.to(dtype) * scale
    if module.bias is not None:
        shift = shift + module.bias.to(dtype)
    view = (1, -1) + (1,) * (lower.dim() - 2)
    return _affine(lower, upper, lambda c: c * scale.view(view) + shift.view(view),
                   lambda r: r * scale.abs().view(view))


def _normalize(module: Normalize, lower: torch.Tensor, upper: torch.Tensor):
    """(x - mean) / std with std > 0 is increasing in every coordinate."""
    view = (1, -1) + (1,) * (lower.dim() - 2)
    mean, std = module.mean.to(lower.dtype).view(view), module.std.to(lower.dtype).view(view)
    return (lower - mean) / std, (upper - mean) / std


def _monotone(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    return module(lower), module(upper)


def _leaky_relu(module: nn.LeakyReLU, lower: torch.Tensor, upper: torch.Tensor):
    if module.negative_slope < 0:
        raise UnsupportedLayerError(f"LeakyReLU with negative slope {module.negative_slope} is not monotone")
    return module(lower), module(upper)


def _dropout(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    if module.training:
        raise UnsupportedLayerError("IBP bounds dropout in eval mode only (the identity); call model.eval() first")
    return lower, upper



# module type -> bound function (lower, upper) -> (lower, upper); exact types, checked in this order
LAYER_BOUNDS: list[tuple[type, Callable]] = [
    (nn.Linear, _linear), (nn.Conv2d, _conv), (nn.ReLU, _monotone), (nn.LeakyReLU, _leaky_relu),
    # average pooling has non-negative weights: it maps lower to lower and upper to upper exactly
    (nn.AvgPool2d, _monotone), (nn.AdaptiveAvgPool2d, _monotone), (nn.MaxPool2d, _monotone),
    (nn.Flatten, _monotone), (Normalize, _normalize), (nn.BatchNorm1d, _batch_norm), (nn.BatchNorm2d, _batch_norm),
    (nn.Identity, _monotone), (nn.Dropout, _dropout),
    (NegativeLinear, _linear),  # ProoD's discriminator head, W = -exp(V): an affine layer
    (Reshape, _monotone),  # x.view / x.reshape in a traced chain: the same re-indexing of both bounds
]
SUPPORTED = ", ".join(kind.__name__ for kind, _ in LAYER_BOUNDS)


Layers = Union[nn.Module, Sequence[nn.Module]]


def _rule(module: nn.Module) -> Optional[Callable]:
    """The bound function of a supported layer (exact type), None for any other module."""
    return next((bound for kind, bound in LAYER_BOUNDS if type(module) is kind), None)


def layer_sequence(model: Layers) -> list[nn.Module]:
    """The layers whose composition is `model.forward`, in order, nested nn.Sequential flattened: an explicit
    list of layers, a model with `ibp_layers()` (the GOOD CNNs), an `nn.Sequential`, one of the adapters (mlp,
    lenet) below, or any other network whose torch.fx trace is a chain (`models.layer_chain`). A network that is
    none of these raises UnsupportedLayerError naming the first operation that cannot be bounded."""
    if isinstance(model, (list, tuple)):
        return _flat(model)
    model = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(model, "ibp_layers"):
        return _flat(model.ibp_layers())
    if isinstance(model, nn.Sequential):
        return _flat(model)
    adapter = _ADAPTERS.get(type(model))
    if adapter is not None:
        return _flat(adapter(model))
    if _rule(model) is not None:
        return [model]
    try:
        return _flat(chain_layers(model, lambda module: _rule(module) is not None))
    except NotAChainError as error:
        raise UnsupportedLayerError(f"IBP cannot follow {error}; supported layers: {SUPPORTED}") from error


def _flat(layers) -> list[nn.Module]:
    out = []
    for layer in layers:
        out += _flat(layer) if type(layer) is nn.Sequential else [layer]
    return out


# Adapters mirror the forward pass of existing backbones layer by layer; `confidence_upper_bound` checks at run
# time that the sequence reproduces model(x), so a drifted adapter raises instead of bounding another network.
_ADAPTERS: dict[type, Callable[[nn.Module], list[nn.Module]]] = {
    MLP: lambda m: [m.normalize, nn.Flatten(), *m.body, m.fc],
    LeNet: lambda m: [m.normalize, *m.conv, nn.Flatten(), m.fc1, m.act, m.dropout, m.fc],
}


def _bound_layer(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor):
    bound = _rule(module)
    if bound is not None:
        return bound(module, lower, upper)
    return _bound_sequence(layer_sequence(module), lower, upper)  # a network inside the network, or refused


def _bound_sequence(layers: list[nn.Module], lower: torch.Tensor, upper: torch.Tensor):
    for layer in layers:
        lower, upper = _bound_layer(layer, lower, upper)
    return lower, upper


def interval_bounds(module: Layers, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise bounds of module(z) over every z with lower <= z <= upper (batched, any device).

    `module` is a supported layer, a list of layers applied in order, or a network `layer_sequence` can follow
    (any chain of supported layers). The computation runs in lower's dtype; parameters are cast to it. A layer or
    operation that cannot be bounded raises UnsupportedLayerError naming it.
    """
    if bool((lower > upper).any()):
        raise ValueError("interval_bounds needs lower <= upper elementwise")
    return _bound_sequence(layer_sequence(module), lower, upper)


def input_box(x: torch.Tensor, eps: float, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[clip(x - eps, 0, 1), clip(x + eps, 0, 1)] in `dtype` (default x's)."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.to(dtype or x.dtype)
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def logit_difference_bounds(model: Layers, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """(N, K, K) ud with ud[n, k, l] >= f_k(z) - f_l(z) for every z in the box (ud[n, k, k] = 0): IBP up to
    the penultimate layer, then the last Linear layer elided into logit differences."""
    layers = layer_sequence(model)
    last = layers[-1]
    if type(last) is not nn.Linear:
        raise UnsupportedLayerError(f"the elision bound needs a Linear last layer, got {type(last).__name__}")
    lower, upper = _bound_sequence(layers[:-1], lower, upper)
    centre, radius = _centre_radius(lower, upper)
    weight, bias = _layer_weight(last, lower.dtype)
    weight_diff = weight[:, None, :] - weight[None, :, :]                  # (K, K, H): W_k - W_l
    ud = torch.einsum("klh,nh->nkl", weight_diff, centre) + torch.einsum("klh,nh->nkl", weight_diff.abs(), radius)
    if bias is not None:
        ud = ud + (bias[:, None] - bias[None, :])
    eye = torch.eye(ud.shape[1], dtype=torch.bool, device=ud.device)
    return ud.masked_fill(eye, 0.0)


def log_confidence_bound_from_differences(ud: torch.Tensor) -> torch.Tensor:
    """log max_y p(y|z) <= max_k -log sum_l exp(-ud_kl), from (N, K, K) logit-difference bounds."""
    return (-torch.logsumexp(-ud, dim=2)).amax(dim=1)


def _apply_sequence(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """x through the layers exactly as _bound_sequence walks them (networks inside expanded the same way)."""
    for layer in layers:
        x = layer(x) if _rule(layer) is not None else _apply_sequence(layer_sequence(layer), x)
    return x


def _check_sequence(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> None:
    """The layer sequence must reproduce the model's output, or the bound would be of another network."""
    with torch.no_grad():
        out = _apply_sequence(layers, x)
        expected = model(x)
    if out.shape != expected.shape or not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
        raise UnsupportedLayerError(f"the IBP layer sequence of {type(model).__name__} does not reproduce its "
                                    "forward pass; refusing to bound it")


def round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest `dtype` number >= each value (a bound stays a bound when it is rounded to a coarser dtype)."""
    rounded = values.to(dtype)
    below = rounded.to(values.dtype) < values
    return torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)


@torch.no_grad()
def confidence_upper_bound(model: Layers, x: torch.Tensor, eps: float, dtype: torch.dtype = torch.float64,
                           trivial_ok: bool = False) -> torch.Tensor:
    """(N,) upper bound of max_y softmax(model(z))_y over the clipped eps-ball around each x, computed in `dtype`.

    IBP (with the elided last layer) runs in `dtype`: box, parameters and every operation. Models with their own
    certificate (`model.confidence_upper_bound(x, eps)`: ProoD, CCU) compute it in float64; it is rounded up to
    `dtype`. `model` may also be a list of layers applied in order. A model IBP cannot follow raises
    UnsupportedLayerError naming the first layer or operation it cannot bound; with `trivial_ok=True` it gets
    the trivial bound 1.0 instead (a caller that records it as "no certificate"). The model is bounded in eval
    mode (as it is evaluated).
    """
    if isinstance(model, (list, tuple)):
        model = nn.Sequential(*model)
    core = getattr(model, "module", model)
    with eval_mode(core):
        if hasattr(core, "confidence_upper_bound"):
            return round_up_to(core.confidence_upper_bound(x, eps).double(), dtype)
        try:
            layers = layer_sequence(core)  # traced once for the check and the bound
            _check_sequence(core, layers, x)
            ud = logit_difference_bounds(layers, *input_box(x, eps, dtype))
        except UnsupportedLayerError:
            if not trivial_ok:
                raise
            return torch.ones(x.shape[0], dtype=dtype, device=x.device)
    return log_confidence_bound_from_differences(ud).exp().clamp(max=1.0)
