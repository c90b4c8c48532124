"""CCU certified radii: one batched Newton/bisection for all points vs brentq per point.

Meinke & Hein (arXiv 1909.12180) find each radius with `scipy.optimize.brentq` on g(r) = log U_i(r) -
log L_o(r) - log b, one point at a time (docs/methods.md#ccu-certificate). `utils.certify.certified_radius` solves all
points at once in float64 torch. Setting: a random CCU model of MNIST size (D = 784, 100 in- and 100 out-components
sharing a PCA-like metric with singular values spread over six decades, out-variances = 4 x in-variances as after CCU's
clamp) and 10 000 points (uniform noise, and noisy copies of in-means at several scales, so that radii range
from 0 to large).

Ours is timed end to end (the float64 whitening of the points included). Two per-point references:
  * "original style": brentq per point whose g(r) recomputes the metric distances d(x, mu_k) of all 2 x 100
    means on every call (float32 torch, as the original's get_b_out does); timed on `--n-ref-orig` points;
  * "per-point brentq, distances precomputed": the strongest per-point loop, only the root finding in numpy
    float64 (distances from our batched code, not timed); timed on `--n-ref` points.
Each is extrapolated linearly to --n points (said in the table). Radii agree with ours to 1e-6 (printed).

    python benchmarks/bench_certify.py               # ~1 min on one CPU core
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ccu import CCUModel  # noqa: E402
from models.gmm import GMM, PCAMetric  # noqa: E402
from utils.certify import R_MAX, bound_terms, certified_radius, radii_from_terms  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="points certified by ours")
    parser.add_argument("--n-ref", type=int, default=1000, help="points for the precomputed-distance brentq loop")
    parser.add_argument("--n-ref-orig", type=int, default=50, help="points for the original-style brentq loop")
    parser.add_argument("--components", type=int, default=100)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the reference is single-threaded)")
    parser.add_argument("--repeats", type=int, default=3, help="ours: best of this many runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser


class _Linear(torch.nn.Module):
    def __init__(self, dim: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def random_ccu(dim: int, components: int, generator: torch.Generator) -> CCUModel:
    metric = PCAMetric(dim)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    metric.V.copy_(basis.T)
    metric.s.copy_(torch.logspace(2, -4, dim))
    means_in = (0.3 + 0.2 * torch.randn(components, dim, generator=generator)).clamp(0, 1)
    var_in = 0.5 * float(metric.whiten(0.05 * torch.randn(1000, dim, generator=generator)).var(0).mean())
    gmm_in = GMM(metric, components, mu=means_in, logvar=torch.full((components,), math.log(var_in)))
    gmm_out = GMM(metric, components, mu=torch.rand(components, dim, generator=generator),
                  logvar=torch.full((components,), math.log(4 * var_in)))
    return CCUModel(_Linear(dim), gmm_in, gmm_out, metric).eval()


def points(model: CCUModel, n: int, generator: torch.Generator) -> torch.Tensor:
    """Half uniform noise, half in-means plus Gaussian noise of scales 0.001 .. 0.3."""
    dim = model.metric.dim
    uniform = torch.rand(n // 2, dim, generator=generator)
    idx = torch.randint(model.gmm_in.n_components, (n - n // 2,), generator=generator)
    scale = torch.logspace(-3, math.log10(0.3), n - n // 2)[:, None]
    near = (model.gmm_in.mu.detach()[idx] + scale * torch.randn(n - n // 2, dim, generator=generator)).clamp(0, 1)
    return torch.cat([uniform, near])


def brentq_loop(terms, idx: np.ndarray) -> np.ndarray:
    """The reference: per point, g in numpy float64 and scipy brentq on [0, 1e4] (maxiter 10 000)."""
    di, ci, vi = terms.dist_in.cpu().numpy(), terms.const_in.cpu().numpy(), terms.var_in.cpu().numpy()
    do, co, vo = terms.dist_out.cpu().numpy(), terms.const_out.cpu().numpy(), terms.var_out.cpu().numpy()
    out = np.zeros(len(idx))
    for j, n in enumerate(idx):
        def g(r, n=n):
            return (logsumexp(ci - np.maximum(di[n] - r, 0.0) ** 2 / (2 * vi))
                    - logsumexp(co - (do[n] + r) ** 2 / (2 * vo)) - terms.log_b)
        if g(0.0) >= 0:
            continue
        out[j] = R_MAX if g(R_MAX) < 0 else brentq(g, 0.0, R_MAX, maxiter=10000)
    return out


def original_style_loop(model: CCUModel, x: torch.Tensor, idx: np.ndarray, log_b: float) -> np.ndarray:
    """The original's shape: per point, g(r) re-whitens the differences to all means (float32) on every call."""
    metric, gmms = model.metric, (model.gmm_in, model.gmm_out)
    consts = [(g.logweight - 0.5 * metric.dim * g.logvar - g.log_const()).detach() for g in gmms]
    variances = [g.logvar.detach().exp() for g in gmms]
    out = np.zeros(len(idx))
    with torch.no_grad():
        for j, n in enumerate(idx):
            def g(r, point=x[n]):
                d_in, d_out = (metric.whiten(g.mu - point).norm(dim=1) for g in gmms)
                log_u = torch.logsumexp(consts[0] - (d_in - r).clamp_min(0) ** 2 / (2 * variances[0]), 0)
                log_l = torch.logsumexp(consts[1] - (d_out + r) ** 2 / (2 * variances[1]), 0)
                return float(log_u - log_l) - log_b
            if g(0.0) >= 0:
                continue
            out[j] = R_MAX if g(R_MAX) < 0 else brentq(g, 0.0, R_MAX, maxiter=10000)
    return out


def _timed(fn, *fn_args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn(*fn_args)
    return result, time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    model = random_ccu(args.dim, args.components, generator).to(args.device)
    x = points(model, args.n, generator).to(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        radius = certified_radius(model, x)
        times.append(time.perf_counter() - start)
    ours = min(times)
    rng = np.random.default_rng(args.seed)
    terms, terms_time = _timed(bound_terms, model, x)
    root_time = min(_timed(radii_from_terms, terms)[1] for _ in range(args.repeats))
    rows = []
    for name, n_ref, fn in (("brentq per point, original style (g re-whitens all means per call, float32)",
                             args.n_ref_orig, lambda i: original_style_loop(model, x, i, terms.log_b)),
                            ("brentq per point, distances precomputed (numpy float64)", args.n_ref,
                             lambda i: brentq_loop(terms, i))):
        idx = rng.choice(args.n, size=min(n_ref, args.n), replace=False)
        reference, seconds = _timed(fn, idx)
        seconds *= args.n / len(idx)
        err = float(np.abs(radius.cpu().numpy()[idx] - reference).max())
        scaled = "" if len(idx) == args.n else f"; timed on {len(idx)} points, x{args.n / len(idx):.0f}"
        rows.append((f"{name} (max abs diff to ours {err:.1e}{scaled})", seconds))
    r_pos = radius[radius > 0]
    print(f"radii: {100 * float((radius > 0).double().mean()):.0f}% certified, positive radii from "
          f"{float(r_pos.min()):.3g} to {float(r_pos.max()):.3g}")
    print(f"\n| method ({args.n} points, D={args.dim}, {args.components}+{args.components} components, "
          f"{args.threads} torch thread(s), {args.device}) | seconds | radii/s | ours is |")
    print("|---|---|---|---|")
    print(f"| utils.certify.certified_radius (batched, float64, best of {args.repeats}) | {ours:.3f} | "
          f"{args.n / ours:,.0f} | 1x |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {args.n / seconds:,.0f} | {seconds / ours:.0f}x faster |")
    print(f"\nsplit of ours: bound_terms (float64 whitening + distances) {terms_time:.3f} s, root finding "
          f"(radii_from_terms) {root_time:.3f} s; root finding alone vs the precomputed-distance brentq loop: "
          f"{rows[1][1] / root_time:.0f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
