"""CCU's density-ratio bound on a ball of the PCA metric: what a CCU model needs to bound its own confidence.

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), docs/methods.md#ccu-certificate. For every z with d(z, x) <= r,
p(z|i) <= U_i(r) and p(z|o) >= L_o(r) (utils/certify.py's docstring writes both out), so the confidence is
<= f/K wherever g(r) = log U_i(r) - log L_o(r) - log b < 0. Here: the terms of g (float64), g and g', the
metric radius of an L-inf box, and the resulting confidence bound on a box. The certified radius (the root of g)
is solved above the models, in utils/certify.py. `model` is a models.ccu.CCUModel throughout; this module does
not import it, since models/ccu.py calls the bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.gmm import GMM, pairwise_sq_dist


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


def log_b(model: nn.Module, f: float = 1.1) -> float:
    """log b with b = lambda (f - 1) / (K - f): the largest density ratio that keeps the confidence <= f/K."""
    num_classes = model.num_classes
    if not 1.0 < f < num_classes:
        raise ValueError(f"f must lie in (1, K={num_classes}), got {f}")
    return float(model.loglam) + math.log(f - 1.0) - math.log(num_classes - f)


def bound_terms(model: nn.Module, x: torch.Tensor, f: float = 1.1) -> BoundTerms:
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


def linf_box_radius(model: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
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


def ccu_confidence_upper_bound(model: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
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
