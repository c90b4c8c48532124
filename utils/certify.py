"""CCU's certificate: the largest ball around x on which the CCU confidence is provably <= f/K.

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), docs/methods.md#ccu-certificate. In the PCA metric d, for every z
with d(z, x) <= r:

    p(z|i) <= U_i(r) = sum_k exp(a_k - (D/2) l_k - c - max(d(x, mu_k) - r, 0)^2 / (2 e^{l_k}))
    p(z|o) >= L_o(r) = sum_l exp(b_l - (D/2) l'_l - c - (d(x, nu_l) + r)^2 / (2 e^{l'_l}))

and max_y p(y|z) <= (rho + lambda/K) / (rho + lambda) with rho = p(z|i)/p(z|o), which is <= f/K iff
rho <= b = lambda (f - 1) / (K - f). The radius R is the root of the increasing function

    g(r) = log U_i(r) - log L_o(r) - log b           (CCUs, p(x|o) = 1: g(r) = log U_i(r) - log b)

on [0, 1e4] (c = (D/2) log 2 pi + 1/2 sum_i log s_i cancels in the ratio but not for CCUs, so it is kept
everywhere); R = 0 when g(0) >= 0, R = 1e4 when g(1e4) < 0. The original calls scipy's brentq once per point;
here one batched, safeguarded Newton iteration (g' is analytic) runs on the whole batch on the model's device,
followed by bisection on whatever bracket is left open, all in float64. The returned R is the lower end of a
bracket with g(R) < 0 (up to float64 rounding of g, ~1e-15), so the certificate holds on the closed ball
B(x, R), and R is within rtol (1 + R) of the root (rtol = 1e-10 by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.ccu import CCUModel
from models.gmm import GMM, pairwise_sq_dist

R_MAX = 1e4


@dataclass
class BoundTerms:
    """Per-point distances and per-component constants of U_i and L_o, float64 on the model's device."""

    dist_in: torch.Tensor          # (N, K_in) d(x, mu_k)
    const_in: torch.Tensor         # (K_in,) a_k - (D/2) l_k - c
    var_in: torch.Tensor           # (K_in,) e^{l_k}
    dist_out: torch.Tensor | None  # (N, K_out) d(x, nu_l), None for CCUs
    const_out: torch.Tensor | None
    var_out: torch.Tensor | None
    log_b: float

    def select(self, idx: torch.Tensor) -> "BoundTerms":
        out = None if self.dist_out is None else self.dist_out[idx]
        return BoundTerms(self.dist_in[idx], self.const_in, self.var_in, out, self.const_out, self.var_out,
                          self.log_b)


def _gmm_terms(gmm: GMM, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distances (N, K), a_k - (D/2) l_k - c, e^{l_k}) for points already centred and whitened (float64)."""
    means = gmm.metric.centred_whiten(gmm.mu.detach().double())
    dist = pairwise_sq_dist(u, means).sqrt()
    logvar = gmm.logvar.detach().double()
    const = gmm.logweight.double() - 0.5 * gmm.metric.dim * logvar - gmm.log_const().double()
    return dist, const, logvar.exp()


def log_b(model: CCUModel, f: float = 1.1) -> float:
    """log b with b = lambda (f - 1) / (K - f): the largest density ratio that keeps the confidence <= f/K."""
    num_classes = model.num_classes
    if not 1.0 < f < num_classes:
        raise ValueError(f"f must lie in (1, K={num_classes}), got {f}")
    return float(model.loglam) + math.log(f - 1.0) - math.log(num_classes - f)


def bound_terms(model: CCUModel, x: torch.Tensor, f: float = 1.1) -> BoundTerms:
    """Everything g(r) needs, for a batch x (N, C, H, W) or (N, D) in pixel space."""
    with torch.no_grad():
        u = model.metric.centred_whiten(x.double())  # one whitening serves both mixtures
        dist_in, const_in, var_in = _gmm_terms(model.gmm_in, u)
        if model.ccus:
            return BoundTerms(dist_in, const_in, var_in, None, None, None, log_b(model, f))
        dist_out, const_out, var_out = _gmm_terms(model.gmm_out, u)
        return BoundTerms(dist_in, const_in, var_in, dist_out, const_out, var_out, log_b(model, f))


def _lse_and_slope(t: torch.Tensor, dt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSE_k t_k and, if dt is given, d/dr LSE = sum_k softmax(t)_k dt_k, from one exp (N, K) -> (N,)."""
    if dt is None:
        return torch.logsumexp(t, dim=1), None
    top = t.amax(dim=1, keepdim=True)
    weights = (t - top).exp()
    total = weights.sum(1)
    return top.squeeze(1) + total.log(), (weights * dt).sum(1) / total


def bound_gap(terms: BoundTerms, r: torch.Tensor, with_grad: bool = False):
    """g(r) per point for radii r (N,), and g'(r) when with_grad (g' > 0: g is increasing)."""
    shrunk = (terms.dist_in - r[:, None]).clamp_min(0.0)                      # (N, K_in)
    t_in = terms.const_in - shrunk.pow(2) / (2.0 * terms.var_in)
    log_u, slope = _lse_and_slope(t_in, shrunk / terms.var_in if with_grad else None)
    gap = log_u - terms.log_b
    if terms.dist_out is not None:
        grown = terms.dist_out + r[:, None]                                   # (N, K_out)
        t_out = terms.const_out - grown.pow(2) / (2.0 * terms.var_out)
        log_l, slope_out = _lse_and_slope(t_out, -grown / terms.var_out if with_grad else None)
        gap = gap - log_l
        slope = slope - slope_out if with_grad else None
    return (gap, slope) if with_grad else gap


def _newton(terms: BoundTerms, lo: torch.Tensor, hi: torch.Tensor, iters: int, rtol: float):
    """Safeguarded Newton from r = lo (g(lo) < 0 <= g(hi)); a step leaving [lo, hi] becomes a bisection, and
    a point stops once its step is below rtol (only unfinished points are evaluated). Returns the bracket
    after a final two-sided probe around each Newton limit."""
    r, step = lo.clone(), torch.full_like(lo, math.inf)
    done = torch.zeros_like(lo, dtype=torch.bool)
    for _ in range(iters):
        idx = torch.nonzero(~done).squeeze(1)
        if idx.numel() == 0:
            break
        r_i, lo_i, hi_i = r[idx], lo[idx], hi[idx]
        gap, slope = bound_gap(terms.select(idx), r_i, with_grad=True)
        neg = gap < 0
        lo_i, hi_i = torch.where(neg, r_i, lo_i), torch.where(neg, hi_i, r_i)
        cand = r_i - gap / slope
        bad = ~torch.isfinite(cand) | (cand < lo_i) | (cand > hi_i)
        cand = torch.where(bad, 0.5 * (lo_i + hi_i), cand)
        step_i = (cand - r_i).abs()
        lo[idx], hi[idx], r[idx], step[idx] = lo_i, hi_i, cand, step_i
        done[idx] = step_i <= rtol * (1.0 + cand)
    # probe both sides of the Newton limit: brackets the root tightly when Newton has converged
    delta = 4.0 * step.nan_to_num(posinf=0.0) + rtol * (1.0 + r)
    for probe in (r - delta, r + delta):
        inside = (probe > lo) & (probe < hi)
        neg = bound_gap(terms, probe) < 0
        lo = torch.where(inside & neg, probe, lo)
        hi = torch.where(inside & ~neg, probe, hi)
    return lo, hi


def certified_radius(model: CCUModel, x: torch.Tensor, f: float = 1.1, r_max: float = R_MAX,
                     rtol: float = 1e-10, newton_iters: int = 30) -> torch.Tensor:
    """Certified radius R(x) in the PCA metric for every x (N, ...) -> (N,) float64 on x's device.

    Inside {z : d(z, x) <= R} the model's confidence max_y p(y|z) is <= f/K (docs/methods.md#ccu-certificate). R = 0
    where g(0) >= 0 (no certificate), R = r_max where g(r_max) < 0.
    """
    return radii_from_terms(bound_terms(model, x, f), r_max, rtol, newton_iters)


def radii_from_terms(terms: BoundTerms, r_max: float = R_MAX, rtol: float = 1e-10,
                     newton_iters: int = 30) -> torch.Tensor:
    """The root finding of `certified_radius` on precomputed `bound_terms` (N,) float64."""
    zero = torch.zeros(terms.dist_in.shape[0], dtype=torch.float64, device=terms.dist_in.device)
    top = torch.full_like(zero, r_max)
    radius = torch.where(bound_gap(terms, top) < 0, top, zero)
    active = torch.nonzero((bound_gap(terms, zero) < 0) & (radius == 0)).squeeze(1)
    if active.numel() == 0:
        return radius
    sub = terms.select(active)
    lo, hi = _newton(sub, zero[active], top[active], newton_iters, rtol)
    # bisection on whatever Newton left open (normally nothing): keeps the guarantee g(lo) < 0 <= g(hi)
    for _ in range(200):
        open_ = hi - lo > rtol * (1.0 + hi)
        if not bool(open_.any()):
            break
        mid = 0.5 * (lo + hi)
        neg = bound_gap(sub, mid) < 0
        lo = torch.where(open_ & neg, mid, lo)
        hi = torch.where(open_ & ~neg, mid, hi)
    radius[active] = lo
    return radius


def asymptotic_check(model: CCUModel) -> dict:
    """The condition of CCU's asymptotic theorem: min out-variance > max in-variance (then p(y|x) -> 1/K far
    from the data). For CCUs, p(x|o) = 1 and p(x|i) -> 0, so it always holds."""
    max_in = float(model.gmm_in.logvar.detach().exp().max())
    if model.ccus:
        return {"max_in_var": max_in, "min_out_var": math.inf, "ratio": math.inf, "holds": True}
    min_out = float(model.gmm_out.logvar.detach().exp().min())
    return {"max_in_var": max_in, "min_out_var": min_out, "ratio": min_out / max_in, "holds": min_out > max_in}


def linf_box_radius(model: CCUModel, x: torch.Tensor, eps: float) -> torch.Tensor:
    """(N,) float64: a radius in CCU's PCA metric whose ball around x contains the box
    [clip(x - eps, 0, 1), clip(x + eps, 0, 1)].

    With m_i = max(x_i - lower_i, upper_i - x_i) <= eps the largest per-pixel move, every z of the box has
    |z_i - x_i| <= m_i, so ||z - x||_2 <= ||m||_2 <= eps sqrt(D) in pixel space. The metric is
    d(z, x) = ||A (z - x)|| with A = S^{-1/2} V (V orthonormal), hence d <= ||m||_2 / sqrt(min s); also
    d <= sum_i m_i ||A e_i|| (triangle inequality over coordinates). The smaller of the two is returned.
    """
    flat = x.reshape(x.shape[0], -1).double()
    move = torch.maximum(flat - (flat - eps).clamp(0.0, 1.0), (flat + eps).clamp(0.0, 1.0) - flat)   # (N, D)
    s = model.metric.s.double().to(flat.device)
    columns = (model.metric.V.double().to(flat.device).pow(2) / s[:, None]).sum(0).sqrt()           # (D,) ||A e_i||
    return torch.minimum(move.norm(dim=1) * s.min().rsqrt(), move @ columns)


def ccu_confidence_upper_bound(model: CCUModel, x: torch.Tensor, eps: float) -> torch.Tensor:
    """(N,) float64 upper bound of CCU's max_y p(y|z) over the clipped L-inf eps-ball around each x.

    The box lies inside the PCA-metric ball B(x, r) with r = `linf_box_radius`; on that ball the density
    ratio rho = p(z|i)/p(z|o) is at most U_i(r)/L_o(r) (docs/methods.md, CCU's certificate), and
    max_y p(y|z) <= (rho + lambda/K)/(rho + lambda) = 1 - (1 - 1/K) sigmoid(log lambda - log rho).
    """
    terms = bound_terms(model, x, f=1.1)  # f only sets log_b, which is added back below
    radius = linf_box_radius(model, x, eps)
    log_rho = bound_gap(terms, radius) + terms.log_b
    num_classes = model.num_classes
    return 1.0 - (1.0 - 1.0 / num_classes) * torch.sigmoid(float(model.loglam) - log_rho)
