"""CCU certified radii: one batched Newton/bisection for all points vs the original's brentq per point.

Meinke & Hein (arXiv 1909.12180) find each radius with `scipy.optimize.brentq` on g(r) = log U_i(r) -
log L_o(r) - log b, one point at a time (SPEC 1.6). `utils.certify.certified_radius` solves all points at once
in float64 torch. Setting: a random CCU model of MNIST size (D = 784, 100 in- and 100 out-components sharing a
PCA-like metric with singular values spread over six decades, out-variances = 4 x in-variances as after CCU's
clamp) and 10 000 points (uniform noise, and noisy copies of in-means at several scales, so that radii range
from 0 to large).

Ours is timed end to end (distances included). The reference gets the distances precomputed (its most
favourable case: only the root finding is timed) and runs on `--n-ref` points, extrapolated linearly to all
points unless --n-ref equals --n. Both agree to 1e-6 on the reference points (checked and printed).

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
from utils.certify import R_MAX, bound_terms, certified_radius  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="points certified by ours")
    parser.add_argument("--n-ref", type=int, default=1000, help="points certified by the brentq loop")
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
    idx = np.random.default_rng(args.seed).choice(args.n, size=min(args.n_ref, args.n), replace=False)
    terms = bound_terms(model, x)
    start = time.perf_counter()
    reference = brentq_loop(terms, idx)
    ref_time = (time.perf_counter() - start) * args.n / len(idx)
    err = float(np.abs(radius.cpu().numpy()[idx] - reference).max())
    certified = float((radius > 0).double().mean())
    r_pos = radius[radius > 0]
    extrapolated = "" if len(idx) == args.n else f" (timed on {len(idx)} points, scaled x{args.n / len(idx):.0f})"
    print(f"radii: {100 * certified:.0f}% certified, positive radii from {float(r_pos.min()):.3g} to "
          f"{float(r_pos.max()):.3g}; max |ours - brentq| on {len(idx)} points: {err:.2e}")
    print(f"\n| method ({args.n} points, D={args.dim}, {args.components}+{args.components} components, "
          f"{args.threads} thread(s), {args.device}) | seconds | radii/s |")
    print("|---|---|---|")
    print(f"| utils.certify.certified_radius (batched, float64) | {ours:.3f} | {args.n / ours:,.0f} |")
    print(f"| scipy brentq per point (distances precomputed){extrapolated} | {ref_time:.2f} | "
          f"{args.n / ref_time:,.0f} |")
    print(f"\nspeed-up: {ref_time / ours:.0f}x (target >= 50x)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
