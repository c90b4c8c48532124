"""Confidence of ReLU networks far away from the data: exact limits along rays and far-away curves.

Theorem 3.1 of Hein, Andriushchenko & Bitterwolf (CVPR 2019, arXiv 1812.05720; docs/methods.md#far-away-limit): a
network that is affine, f(x) = V^l x + a^l, on each of finitely many polytopes Q_l has, along almost every ray
alpha * d, a class k with lim_{alpha -> inf} softmax_k(f(alpha d)) = 1. Ulmer & Cina (UAI 2021, arXiv 2012.05329)
draw the consequence for every uncertainty score built on the probabilities: it converges, and its input
gradient vanishes.

`limit_analysis` computes the limit exactly. For alpha beyond the last region boundary on the ray the logits
are f(alpha d) = alpha s + b with slope s = V d and intercept b, so

    lim softmax(f(alpha d)) = softmax(b restricted to T),  T = argmax_k s_k  (the tied top slopes)

which is a one-hot vector (limit confidence 1) when the top slope is unique. One forward-mode pass at the
point alpha d with tangent d gives f (primal) and s = J(alpha d) d (tangent) for a whole batch of directions,
and `RegionRecorder` sees, at every ReLU / leaky ReLU / max-pool, the pre-activation z and its slope a along
the ray. Inside the current region each z is affine in alpha, z(alpha') = z + (alpha' - alpha) a, so the ray
never leaves the region iff no unit is heading for a sign change: (z > 0 and a >= 0) or (z <= 0 and a <= 0)
for every ReLU, and for every max-pool window the winner's slope is >= the slopes of the others. Layer by
layer this certifies that the activation pattern is the same for ALL alpha' >= alpha (in particular at
2 alpha, 4 alpha, ...), not only at the points looked at. Directions that are not certified yet are looked at
again further out: each unit heading for a change predicts where it happens (alpha - z / a), and the next alpha
is past the farthest predicted change, but at least 2 alpha (doubling) and at most 1024 alpha; after
`max_steps` looks the rest are reported uncertified with the estimate at the last alpha.

Which networks are piecewise affine is decided while they run, by an ALLOW-LIST: an operation applied to an
input-dependent tensor passes only if it is known to be affine in that tensor (`AFFINE`: linear layers,
convolutions, sums, average pools, reshapes, eval-mode batch norm and dropout, ...), or is a ReLU / leaky ReLU /
max-pool, which the recorder tracks. Products of two input-dependent tensors, division by one, rounding
division, and every operation not on the list (smooth non-linearities such as exp, softmax, tanh; untracked
piecewise-affine ones such as clamp, abs, max over a dim; and discontinuous ones such as sign, floor,
threshold) are flagged, so an unknown operation is refused, never certified. A CCU model (Gaussian mixtures:
squared distances, exp) is flagged this way. Such a model raises `NotPiecewiseAffineError`, or, with
on_non_pa="numeric" / "nan", gets the confidence measured at alpha = 1e6 (`numeric_confidence`) or NaN. Layers need not be nn.Modules: functional calls
(F.relu, torch.relu, Tensor.relu, F.max_pool2d) are seen too, through a TorchFunctionMode.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

RELU_LIKE = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
MAX_POOL = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices"}
# Affine in each input-dependent operand when the others are constant (torch function / Tensor method names).
AFFINE = {
    # sums, differences, scaling, and linear maps of one input-dependent operand
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
    "neg", "neg_", "__neg__", "negative", "__pos__", "positive", "sum", "mean", "cumsum", "diff",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "matmul", "__matmul__", "__rmatmul__", "mm",
    "bmm", "mv", "addmm", "addmv", "baddbmm", "einsum", "linear", "bilinear", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    # quotient by a constant (checked below)
    "div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide",
    # eval-mode layers (checked below)
    "batch_norm", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    # moving, copying and selecting entries
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "permute", "transpose", "transpose_", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
    "expand", "expand_as", "repeat", "tile", "contiguous", "clone", "to", "float", "double", "cpu", "cuda",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk", "unbind", "narrow", "select",
    "index_select", "gather", "__getitem__", "__setitem__", "copy_", "flip", "roll", "pad", "constant_pad_nd",
    "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "channel_shuffle",
    # constants shaped like the input (their values do not depend on it)
    "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
    # metadata: no values are computed
    "__get__", "size", "dim", "ndimension", "numel", "__len__", "is_floating_point", "is_contiguous", "stride",
    "element_size", "type_as",
}
SMOOTH = {"exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log10", "log1p", "sigmoid", "sigmoid_", "tanh",
          "tanh_", "softmax", "log_softmax", "softmin", "logsumexp", "gelu", "silu", "elu", "selu", "celu",
          "softplus", "mish", "pow", "pow_", "__pow__", "__rpow__", "square", "sqrt", "rsqrt", "reciprocal",
          "norm", "vector_norm", "cdist", "erf", "sin", "cos", "atan", "logit", "layer_norm", "group_norm",
          "instance_norm", "local_response_norm", "normalize", "glu", "var", "std", "logsigmoid", "softsign",
          "tanhshrink", "cosine_similarity", "tan", "sinh", "cosh", "asinh"}  # named in the error message only
BILINEAR = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "matmul", "__matmul__", "__rmatmul__",
            "mm", "bmm", "mv", "einsum", "bilinear", "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
            "conv_transpose2d", "conv_transpose3d", "addmm", "addmv", "baddbmm"}  # non-affine with two such operands
DIVISION = {"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"}


class NotPiecewiseAffineError(ValueError):
    """The model applies a non-piecewise-affine operation to its input (Theorem 3.1 does not apply)."""


def _tangent(value: object) -> Optional[torch.Tensor]:
    return fwAD.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None


class RegionRecorder(TorchFunctionMode):
    """Records, during one forward pass, the activation pattern and (under forward-mode AD) whether the ray
    stays in the current linear region; flags operations that are not piecewise affine.

    `patterns`: one (N, units) bool tensor per ReLU-like call (z > 0) and one (N, outputs) argmax-index tensor
    per max-pool; `unstable`: (N,) bool, some unit heads for a sign change along the ray; `horizon`: (N,) how
    much further along alpha the farthest such change is predicted; `violation`: the first offending op or None.
    """

    def __init__(self, batch_size: int, dual: bool = True) -> None:
        super().__init__()
        self.batch_size, self.dual = batch_size, dual
        self.patterns: list[torch.Tensor] = []
        self.unstable = torch.zeros(batch_size, dtype=torch.bool)
        self.horizon = torch.zeros(batch_size, dtype=torch.float64)
        self.violation: Optional[str] = None

    def _flag(self, name: str, why: str) -> None:
        self.violation = self.violation or f"{name} ({why})"

    def _tracks(self, z: torch.Tensor) -> bool:
        """Only units that depend on the input define the region (under forward AD: those with a tangent)."""
        return _tangent(z) is not None if self.dual else z.dim() > 0 and z.shape[0] == self.batch_size

    def _relu(self, z: torch.Tensor) -> None:
        if not self._tracks(z):
            return
        z_flat = z.detach().reshape(self.batch_size, -1)
        self.patterns.append(z_flat > 0)
        slope = _tangent(z)
        if slope is not None:
            a = slope.detach().reshape(self.batch_size, -1)
            heading = ((z_flat > 0) & (a < 0)) | ((z_flat <= 0) & (a > 0))
            self._heading(heading, torch.where(heading, -z_flat / a, 0.0))

    def _max_pool(self, args: tuple, kwargs: dict) -> None:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
        opts = dict(zip(names, args), **kwargs)
        z, kernel = opts["input"], opts["kernel_size"]
        if not self._tracks(z):
            return
        stride = opts.get("stride") or kernel
        padding, dilation = opts.get("padding", 0), opts.get("dilation", 1)
        if opts.get("ceil_mode", False):
            self._flag("max_pool2d", "ceil_mode windows are not tracked")
            return
        primal = z.detach()
        n, c = primal.shape[:2]
        unfold = dict(kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)
        windows = F.unfold(primal.reshape(n * c, 1, *primal.shape[2:]), **unfold)  # (N*C, k*k, L)
        valid = F.unfold(torch.ones_like(primal[:1, :1]), **unfold).bool()       # padded entries are False
        windows = windows.masked_fill(~valid, float("-inf"))
        winner = windows.argmax(1, keepdim=True)                                  # (N*C, 1, L)
        self.patterns.append(winner.reshape(n, -1))
        slope = _tangent(z)
        if slope is not None:
            a = F.unfold(slope.detach().reshape(n * c, 1, *primal.shape[2:]), **unfold)
            a_win = a.gather(1, winner)
            heading = (a > a_win) & valid  # a loser climbs faster than the winner: it overtakes it
            overtake = torch.where(heading, (windows.gather(1, winner) - windows) / (a - a_win), 0.0)
            self._heading(heading.reshape(n, -1), overtake.reshape(n, -1))

    def _heading(self, heading: torch.Tensor, distance: torch.Tensor) -> None:
        """heading: (N, units) bool; distance: (N, units) alpha still to go before each such change."""
        self.unstable = self.unstable.to(heading.device) | heading.any(1)
        self.horizon = torch.maximum(self.horizon.to(heading.device), distance.amax(1).double())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in RELU_LIKE:
            self._relu(args[0])
        elif name in MAX_POOL:
            self._max_pool(args, kwargs)
        else:
            why = self._not_affine(name, args, kwargs)
            if why:
                self._flag(name, why)
        return func(*args, **kwargs)

    def _not_affine(self, name: str, args: tuple, kwargs: dict) -> Optional[str]:
        """Why `name(*args, **kwargs)` is not known to be affine in its input-dependent tensors (None: it is)."""
        leaves, _ = tree_flatten((args, kwargs))
        dependent = [isinstance(leaf, torch.Tensor) and _tangent(leaf) is not None for leaf in leaves]
        if not any(dependent):
            return None                                   # constants (weights, buffers) may go through anything
        if name not in AFFINE:
            kind = "smooth non-linearity" if name in SMOOTH else "not on the allow-list of piecewise-affine ops"
            return f"{kind}; express it with linear layers, relu / leaky_relu and max_pool2d"
        if name in BILINEAR and sum(dependent) > 1:
            return "product of two input-dependent tensors"
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        if name in DIVISION and (_tangent(divisor) is not None or kwargs.get("rounding_mode") is not None):
            return "division by an input-dependent tensor, or a rounding division"
        if name == "batch_norm" and (kwargs.get("training") or (len(args) > 5 and args[5])):
            return "batch statistics in training mode"
        if "dropout" in name and (kwargs.get("training") or (len(args) > 2 and args[2])):
            return "random dropout in training mode"
        return None


@dataclass
class LimitResult:
    """Per direction d: the limit of softmax(f(alpha d)) as alpha -> inf and how it was obtained."""

    confidence: torch.Tensor  # (N,) max_k of `probs`
    probs: torch.Tensor       # (N, K) limit softmax
    slope: torch.Tensor       # (N, K) s = V d, the logits' slope in the final region (NaN if numeric)
    intercept: torch.Tensor   # (N, K) b, with f(alpha d) = alpha s + b there (NaN if numeric)
    alpha: torch.Tensor       # (N,) the alpha from which the region is certified (or the last one tried)
    certified: torch.Tensor   # (N,) bool: no unit changes sign for any alpha' >= alpha
    n_tied: torch.Tensor      # (N,) classes sharing the top slope (1 = limit confidence exactly 1)
    method: str = "exact"     # "exact", or "numeric" / "nan" for a model that is not piecewise affine


def _prepare(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """An eval-mode copy (float64 by default: slopes and intercepts are compared to ~1e-9)."""
    net = copy.deepcopy(model).eval()
    return net.to(dtype) if dtype is not None else net


def _device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(iter(net.parameters()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _refusal(net: nn.Module, violation: str) -> NotPiecewiseAffineError:
    return NotPiecewiseAffineError(
        f"{type(net).__name__} is not piecewise affine: it applies {violation} to its input, so Theorem 3.1 does "
        "not apply; measure it with numeric_confidence(model, d, alpha=1e6) or pass on_non_pa='numeric'")


def _ray_pass(net: nn.Module, d: torch.Tensor, alpha: torch.Tensor):
    """One forward-mode pass at alpha d with tangent d: logits, their slope along d, and the recorder."""
    recorder = RegionRecorder(len(d))
    scale = alpha.view(-1, *([1] * (d.dim() - 1)))
    with torch.no_grad(), fwAD.dual_level(), warnings.catch_warnings():
        # torch loads its forward-AD decompositions through the deprecated torch.jit.script on first use
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        try:
            with recorder:
                out = net(fwAD.make_dual(scale * d, d))
        except Exception:
            if recorder.violation is None:
                raise
            # the op that broke the pass was refused first (forward-mode AD lacks some ops, e.g. floor_divide)
            raise _refusal(net, recorder.violation) from None
        logits, slope = fwAD.unpack_dual(out)
    slope = torch.zeros_like(logits) if slope is None else slope  # a constant network has slope 0
    return logits, slope, recorder


def _limit_softmax(slope: torch.Tensor, intercept: torch.Tensor, tie_tol: float):
    """softmax of the intercepts over the classes tied at the top slope (one-hot when the top is unique)."""
    top = slope.amax(-1, keepdim=True)
    tied = slope >= top - tie_tol * slope.abs().amax(-1, keepdim=True)
    probs = torch.softmax(intercept.masked_fill(~tied, float("-inf")), -1)
    return probs, tied.sum(-1)


def _limit_chunk(net: nn.Module, d: torch.Tensor, alpha0: float, max_steps: int, tie_tol: float):
    n = len(d)
    alpha = torch.full((n,), float(alpha0), dtype=d.dtype, device=d.device)
    certified = torch.zeros(n, dtype=torch.bool, device=d.device)
    slope = intercept = None
    seen = alpha.clone()  # the alpha each direction was last looked at
    todo = torch.arange(n, device=d.device)
    for _ in range(max_steps):
        out, s, recorder = _ray_pass(net, d[todo], alpha[todo])
        if recorder.violation:
            raise _refusal(net, recorder.violation)
        if slope is None:
            slope, intercept = out.new_empty(n, out.shape[1]), out.new_empty(n, out.shape[1])
        seen[todo] = alpha[todo]
        slope[todo], intercept[todo] = s, out - alpha[todo, None] * s  # f(alpha d) = alpha s + b
        stable = ~recorder.unstable.to(d.device)
        certified[todo[stable]] = True
        # past the farthest predicted change (the pattern may change on the way: look again there), >= doubling
        step = (recorder.horizon.to(d) * 1.001).clamp(min=alpha[todo], max=1023 * alpha[todo])
        alpha[todo] = alpha[todo] + torch.where(stable, 0.0, step)
        todo = todo[~stable]
        if len(todo) == 0:
            break
    probs, n_tied = _limit_softmax(slope, intercept, tie_tol)
    return probs, slope, intercept, seen, certified, n_tied


@torch.no_grad()
def numeric_probs(model: nn.Module, directions: torch.Tensor, alpha: float = 1e6,
                  dtype: Optional[torch.dtype] = torch.float64, batch_size: int = 512) -> torch.Tensor:
    """softmax(f(alpha d)) measured at one large alpha, (N, K); works for any model."""
    net = _prepare(model, dtype)
    device, net_dtype = _device_dtype(net)
    out = [torch.softmax(net(alpha * d.to(device, net_dtype)), -1).cpu()
           for d in directions.split(batch_size)]
    return torch.cat(out)


def numeric_confidence(model: nn.Module, directions: torch.Tensor, alpha: float = 1e6, **kwargs) -> torch.Tensor:
    """max_k softmax_k(f(alpha d)) at one large alpha (1e6), (N,)."""
    return numeric_probs(model, directions, alpha, **kwargs).amax(-1)


def limit_analysis(model: nn.Module, directions: torch.Tensor, alpha0: float = 1.0, max_steps: int = 64,
                   tie_tol: float = 1e-9, batch_size: int = 512, dtype: Optional[torch.dtype] = torch.float64,
                   on_non_pa: str = "raise", numeric_alpha: float = 1e6) -> LimitResult:
    """Exact limit of softmax(f(alpha d)) as alpha -> inf for each direction d (rows of `directions`, any input
    shape), batched; see the module docstring for the method and the stabilisation certificate.

    tie_tol: classes whose slope is within tie_tol * max|s| of the top count as tied. on_non_pa: what a model
    that is not piecewise affine gets: "raise" (NotPiecewiseAffineError), "numeric" (softmax at
    `numeric_alpha`, method="numeric") or "nan".
    """
    if on_non_pa not in ("raise", "numeric", "nan"):
        raise ValueError(f"unknown on_non_pa {on_non_pa!r}; valid: raise, numeric, nan")
    net = _prepare(model, dtype)
    device, net_dtype = _device_dtype(net)
    try:
        parts = [_limit_chunk(net, d.to(device, net_dtype), alpha0, max_steps, tie_tol)
                 for d in directions.split(batch_size)]
    except NotPiecewiseAffineError as error:
        if on_non_pa == "raise":
            raise
        return _fallback(model, directions, on_non_pa, numeric_alpha, dtype, batch_size, str(error))
    probs, slope, intercept, alpha, certified, n_tied = (torch.cat([p[i] for p in parts]).cpu() for i in range(6))
    return LimitResult(probs.amax(-1), probs, slope, intercept, alpha, certified, n_tied)


def _fallback(model, directions, how, numeric_alpha, dtype, batch_size, reason) -> LimitResult:
    warnings.warn(f"{reason}; reporting {'the confidence at alpha=%g' % numeric_alpha if how == 'numeric' else 'NaN'}")
    n = len(directions)
    if how == "numeric":
        probs = numeric_probs(model, directions, numeric_alpha, dtype=dtype, batch_size=batch_size)
    else:
        probs = torch.full((n, 1), float("nan"))
    nan = torch.full_like(probs, float("nan"))
    return LimitResult(probs.amax(-1), probs, nan, nan, torch.full((n,), numeric_alpha),
                       torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), method=how)


def limit_confidence(model: nn.Module, directions: torch.Tensor, **kwargs) -> torch.Tensor:
    """lim_{alpha -> inf} max_k softmax_k(f(alpha d)) for each direction d, (N,); see `limit_analysis`."""
    return limit_analysis(model, directions, **kwargs).confidence


@torch.no_grad()
def activation_pattern(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, P) int64: every ReLU / leaky-ReLU unit's on/off state and every max-pool window's argmax at x."""
    recorder = RegionRecorder(len(x), dual=False)
    with recorder:
        model(x)
    if not recorder.patterns:
        return torch.zeros(len(x), 0, dtype=torch.long)
    return torch.cat([p.long().reshape(len(x), -1).cpu() for p in recorder.patterns], 1)


# ---------------------------------------------------------------------------------------------------- curves
def max_confidence(probs: torch.Tensor) -> torch.Tensor:
    """max_k of the mean prediction, for an (S, N, K) probability tensor."""
    return probs.mean(0).amax(-1)


def probability_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (S, N, K) probabilities: a toy model's `predict_samples`, else softmax of the logits (S = 1)."""
    if hasattr(model, "predict_samples"):
        return model.predict_samples
    model.eval()
    return lambda x: torch.softmax(model(x), -1)[None]


def ray_curve(model: nn.Module, x_dirs: torch.Tensor, alphas: Sequence[float] | torch.Tensor,
              score: Callable[[torch.Tensor], torch.Tensor] = max_confidence, origin: Optional[torch.Tensor] = None,
              batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """score(origin + alpha d) and ||grad_x score||_2 for every alpha and direction: two (A, N) tensors.

    `score` maps (S, N, K) probabilities to (N,) (e.g. `max_confidence`, or utils.studies.toy.SCORES entries).
    """
    probs_of = probability_fn(model)
    device = next(iter(model.parameters())).device
    alphas = torch.as_tensor(alphas, dtype=x_dirs.dtype).to(device)
    d = x_dirs.to(device)
    points = alphas.view(-1, *([1] * d.dim())) * d[None]  # (A, N, ...)
    if origin is not None:
        points = points + origin.to(device)
    points = points.reshape(-1, *d.shape[1:])
    scores, norms = [], []
    for x in points.split(batch_size):
        x = x.detach().requires_grad_(True)
        value = score(probs_of(x))
        (grad,) = torch.autograd.grad(value.sum(), x)
        scores.append(value.detach().cpu())
        norms.append(grad.flatten(1).norm(dim=1).cpu())
    shape = (len(alphas), len(d))
    return torch.cat(scores).reshape(shape), torch.cat(norms).reshape(shape)
