"""Far-away limits of every detector's score along rays alpha * d (`gen_attack_stats.py --study audit --detectors`).

Once `utils.limits.limit_analysis` has certified that the ray alpha * d stays in one linear region for all
alpha' >= alpha, the network is affine there, so its penultimate features and logits are exactly

    z(a) = u + a v,   f(a) = a s + c   (s = W v, c = W u + b for an affine head),

and one forward-mode pass at the certified alpha gives (u, v, s, c). Each detector's score is then a function of
a alone, whose limit as a -> inf follows from its formula (docs/methods.md#far-away-limits-of-detectors):
`RULES[name](detector, ray)` returns the limit per ray (finite, +inf or -inf) and a mask of the rays for which the
derivation is exact. A ray whose rule does not apply (a tie that cancels the leading term, a detector without a
rule, a network that is not piecewise affine) gets the score measured at the largest alpha, marked numeric.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from utils.detectors.base import Detector, model_outputs

INF = float("inf")
TIE_TOL = 1e-9  # a leading coefficient within TIE_TOL of its scale counts as zero (a tie: numeric, not exact)


@dataclass
class Rays:
    """Per ray (rows): features z(a) = u + a v and logits f(a) = a s + c in the final region, float64."""

    u: torch.Tensor
    v: torch.Tensor
    c: torch.Tensor
    s: torch.Tensor


# rule(detector, rays) -> (limit (N,) float64, exact (N,) bool)
Rule = Callable[[Detector, Rays], "tuple[torch.Tensor, torch.Tensor]"]


@torch.no_grad()
def feature_rays(model: nn.Module, directions: torch.Tensor, alpha: torch.Tensor, batch_size: int = 256) -> Rays:
    """(u, v, c, s) along each direction from one forward-mode pass of a float64 copy at alpha * d, tangent d.

    Exact when the region is certified from `alpha` on (`limit_analysis(...).alpha` with `.certified`)."""
    net = copy.deepcopy(model).eval().double()
    parts = []
    for d, a in zip(directions.double().split(batch_size), alpha.double().split(batch_size)):
        with fwAD.dual_level():
            z, logits = model_outputs(net, fwAD.make_dual(a.view(-1, *[1] * (d.dim() - 1)) * d, d))
            (z, v), (f, s) = fwAD.unpack_dual(z), fwAD.unpack_dual(logits)
        v = torch.zeros_like(z) if v is None else v
        s = torch.zeros_like(f) if s is None else s
        parts.append((z - a[:, None] * v, v, f - a[:, None] * s, s))
    u, v, c, s = (torch.cat([p[i] for p in parts]) for i in range(4))
    return Rays(u, v, c, s)


def _sign(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign of x as -1/0/+1, exact): 0 only when x is exactly 0; |x| <= TIE_TOL * scale but nonzero is a tie."""
    tie = (x.abs() <= TIE_TOL * scale) & (x != 0)
    return torch.sign(x), ~tie


def energy_limit(s: torch.Tensor, c: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """lim T logsumexp((a s + c) / T): +inf / -inf by the sign of max s, else T LSE of c over the classes at 0."""
    top = s.amax(1)
    sign, exact = _sign(top, s.abs().amax(1))
    at_top = s == top[:, None]
    finite = temperature * torch.logsumexp((c / temperature).masked_fill(~at_top, -INF), 1)
    return torch.where(sign > 0, INF, torch.where(sign < 0, -INF, finite)), exact


def _affine_energy(detector: Detector, u: torch.Tensor, v: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy limit of features u + a v (already shaped) through the head (W, b)."""
    weight, bias = _head(detector, u)
    return energy_limit(v @ weight.T, u @ weight.T + bias, temperature)


def _head(detector: Detector, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from utils.detectors.training_stats import head_parameters

    if getattr(detector, "weight", None) is None:
        detector.weight, detector.bias = head_parameters(detector.model, like.shape[1])
    return detector.weight.to(like), detector.bias.to(like)


def limit_probs(rays: Rays) -> torch.Tensor:
    """lim softmax(a s + c): softmax of c over the classes tied at the top slope (as `utils.limits`)."""
    top = rays.s.amax(1, keepdim=True)
    tied = rays.s >= top - TIE_TOL * rays.s.abs().amax(1, keepdim=True)
    return torch.softmax(rays.c.masked_fill(~tied, -INF), 1)


def _all_exact(limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return limit, torch.ones(len(limit), dtype=torch.bool)


# --------------------------------------------------------------------------------------------- logit scores
def _msp(detector, rays):
    return _all_exact(limit_probs(rays).amax(1))


def _maxlogit(detector, rays):
    top = rays.s.amax(1)
    sign, exact = _sign(top, rays.s.abs().amax(1))
    finite = rays.c.masked_fill(rays.s != top[:, None], -INF).amax(1)
    return torch.where(sign > 0, INF, torch.where(sign < 0, -INF, finite)), exact


def _energy(detector, rays):
    return energy_limit(rays.s, rays.c, getattr(detector, "temperature", 1.0))


def _entropy(detector, rays):
    probs = limit_probs(rays)
    return _all_exact(torch.where(probs > 0, probs * probs.log(), 0.0).sum(1))


def _gen(detector, rays):
    return _all_exact(detector.from_outputs(rays.u, limit_probs(rays).log()).double())  # softmax(log p) = p


# ---------------------------------------------------------------------------------- clipped / pruned features
def _react(detector, rays):
    """min(u + a v, t): entries with v > 0 reach t, v < 0 keep falling, v = 0 stay min(u, t)."""
    t = float(detector.threshold)
    u = torch.where(rays.v > 0, t, torch.where(rays.v < 0, rays.u, rays.u.clamp(max=t)))
    return _affine_energy(detector, u, rays.v.clamp(max=0))


def eventual_top(rays: Rays, k: int) -> torch.Tensor:
    """(N, F) bool: the k entries of u + a v that are largest for all large a (by v, ties broken by u)."""
    by_u = torch.sort(rays.u, dim=1, descending=True, stable=True).indices
    order = by_u.gather(1, torch.sort(rays.v.gather(1, by_u), dim=1, descending=True, stable=True).indices)
    return torch.zeros_like(rays.v, dtype=torch.bool).scatter(1, order[:, :k], True)


def _scaled_energy(detector, rays, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy of kept(u + a v) * exp(s1 / s2): the factor tends to exp(sum v / sum_top v) > 0, so the logit
    slope is that factor times W (v on the kept entries): only its sign matters."""
    weight, _ = _head(detector, rays.u)
    top_sum = (rays.v * eventual_top(rays, _kept(detector, rays)).double()).sum(1)
    slope = (rays.v * kept.double()) @ weight.T
    limit, exact = energy_limit(slope, torch.zeros_like(slope))
    return limit, exact & (top_sum > 0) & torch.isinf(limit)


def _kept(detector, rays) -> int:
    from utils.detectors.shaping import kept_count

    return kept_count(rays.v.shape[1], detector.p)


def _ash(detector, rays):
    top = eventual_top(rays, _kept(detector, rays))
    if detector.variant == "s":
        return _scaled_energy(detector, rays, top)
    if detector.variant == "p":
        return _affine_energy(detector, rays.u * top, rays.v * top)
    k = int(top[0].sum())  # ASH-b: every kept entry becomes s1 / k = (sum u + a sum v) / k
    return _affine_energy(detector, top * rays.u.sum(1, keepdim=True) / k, top * rays.v.sum(1, keepdim=True) / k)


def _scale(detector, rays):
    return _scaled_energy(detector, rays, torch.ones_like(rays.v, dtype=torch.bool))


# -------------------------------------------------------------------------------------- normalised features
def _at_direction(detector, rays):
    """KNN, Mahalanobis++: functions of z / |z| only, which tends to v / |v|."""
    return _all_exact(detector.from_outputs(rays.v, rays.c).double())


def _nnguide(detector, rays):
    from utils.detectors.neighbours import unit_rows
    from utils.detectors.training_stats import topk_similarities

    guidance = topk_similarities(unit_rows(rays.v), detector.bank.to(rays.v.device), detector.k).mean(1).double()
    energy, exact = energy_limit(rays.s, rays.c)
    inf = torch.isinf(energy)
    return torch.where(inf, energy * torch.sign(guidance), energy * guidance), exact & ~(inf & (guidance == 0))


# ----------------------------------------------------------------------------------- distances in feature space
def _vim(detector, rays):
    """energy - alpha |R^T(u - o) + a R^T v|: both grow linearly, so the sign of max s - alpha |R^T v| decides."""
    basis, origin = detector.residual_basis.to(rays.v), detector.origin.to(rays.v)
    residual_slope = (rays.v @ basis).norm(dim=1)
    coefficient = rays.s.amax(1) - detector.alpha * residual_slope
    sign, exact = _sign(coefficient, rays.s.abs().amax(1) + detector.alpha * residual_slope)
    energy, energy_exact = energy_limit(rays.s, rays.c)
    flat = energy - detector.alpha * ((rays.u - origin) @ basis).norm(dim=1)  # no residual growth
    grows = residual_slope > 0
    limit = torch.where(grows, torch.where(sign > 0, INF, -INF), flat)
    return limit, torch.where(grows, exact & (sign != 0), energy_exact)


def _fdbd(detector, rays):
    """(a mean_c (s_y - s_c) / |w_y - w_c| + O(1)) / (a |v| + O(1)) -> mean_c (s_y - s_c) / |w_y - w_c| / |v|."""
    detector.check_fitted()
    weight, _ = _head(detector, rays.v)
    slope, intercept = rays.v @ weight.T, rays.u @ weight.T + detector.bias.to(rays.v)
    top = slope.amax(1, keepdim=True)
    predicted = intercept.masked_fill(slope != top, -INF).argmax(1)  # argmax of a s + c for large a
    gaps = (top - slope) / detector.gaps.to(rays.v)[predicted]
    return _all_exact(gaps.sum(1) / max(1, slope.shape[1] - 1) / rays.v.norm(dim=1))


def _quadratic(engine, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v^T P v on the engine's support, its rounding scale |v|^T |P| |v|) of a fitted `Mahalanobis` (a pinv's
    largest entries come from directions of tiny training variance, so max|P| |v|^2 would call real terms ties)."""
    vs = v[:, engine.support].to(engine._precision)
    scale = ((vs.abs() @ engine._precision.abs()) * vs.abs()).sum(1)
    return ((vs @ engine._precision) * vs).sum(1).cpu(), scale.cpu()


def _mahalanobis(detector, rays):
    """-min_c (z - mu_c)^T P (z - mu_c) = -a^2 v^T P v + O(a): -inf unless P v = 0, then the score at u."""
    if detector.needs_grad:
        return _none(detector, rays)
    q, scale = _quadratic(detector, rays.v)
    sign, exact = _sign(q, scale)
    return torch.where(sign > 0, -INF, detector.from_outputs(rays.u, rays.c).double().cpu()), exact


def _rmds(detector, rays):
    """-min_c [MD_c - MD_0] = -a^2 (v^T P v - v^T P_0 v) + O(a): the sign of that difference decides."""
    q, scale = _quadratic(detector.classes_, rays.v)
    q0, scale0 = _quadratic(detector.background, rays.v)
    sign, exact = _sign(q - q0, scale + scale0)
    finite = detector.from_outputs(rays.u, rays.c).double().cpu()
    # q == q0 with v != 0 leaves a linear term: not derived here
    flat = (q == 0) & (q0 == 0)
    return torch.where(sign > 0, -INF, torch.where(sign < 0, INF, finite)), exact & ((sign != 0) | flat)


def _none(detector, rays):
    return torch.full((len(rays.v),), float("nan"), dtype=torch.float64), torch.zeros(len(rays.v), dtype=torch.bool)


RULES: dict[str, Rule] = {
    "msp": _msp, "maxlogit": _maxlogit, "energy": _energy, "entropy": _entropy, "gen": _gen,
    "react": _react, "ash": _ash, "scale": _scale,
    "knn": _at_direction, "mahalanobis++": _at_direction, "nnguide": _nnguide,
    "vim": _vim, "fdbd": _fdbd, "mahalanobis": _mahalanobis, "rmds": _rmds,
}


def detector_limits(name: str, detector: Detector, rays: Rays) -> tuple[torch.Tensor, torch.Tensor]:
    """(limit (N,) float64 on the CPU, exact (N,) bool) of one detector; constant features (v = 0) give the score
    at u for every detector that works from the features and logits."""
    limit, exact = RULES.get(name, _none)(detector, rays)
    limit, exact = limit.double().cpu(), exact.cpu()
    constant = (rays.v == 0).all(1).cpu()
    if constant.any() and not detector.needs_grad:
        at_u = detector.from_outputs(rays.u[constant], rays.c[constant]).double().cpu()
        limit[constant], exact[constant] = at_u, True
    return limit, exact


@torch.no_grad()
def scores_at(detector: Detector, directions: torch.Tensor, alpha: float, batch_size: int = 256) -> torch.Tensor:
    """The detector's score at alpha * d, float64: from a float64 copy's features and logits where the detector
    works from those, else `detector.confidence` on its own model."""
    out = []
    if detector.needs_grad or type(detector).from_outputs is Detector.from_outputs:
        for d in directions.split(batch_size):
            out.append(detector.confidence((alpha * d.double()).float()).double().cpu())
        return torch.cat(out)
    net = copy.deepcopy(detector.model).eval().double()
    for d in directions.split(batch_size):
        out.append(detector.from_outputs(*model_outputs(net, alpha * d.double())).double().cpu())
    return torch.cat(out)
