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

import torch

from models.ccu import CCUModel
# the bound itself lives with the model that uses it (CCUModel.confidence_upper_bound); re-exported here
from models.ccu_bound import (BoundTerms, bound_gap, bound_terms, ccu_confidence_upper_bound,  # noqa: F401
                              linf_box_radius, log_b)

R_MAX = 1e4


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
