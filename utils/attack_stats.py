"""CCU Table 1: adversarial noise inside CCU's certified balls (`gen_attack_stats.py --study ccu`).

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), SPEC 1.6-1.7. For each seed x0 (uniform noise by default) the CCU
run gives a certified radius R(x0) in its PCA metric; every model of the table is then attacked inside
B(x0, R) intersected with [0,1]^D, maximising its log-confidence max_y log p(y|x):

  * work in whitened coordinates u = x V^T / sqrt(s), where the ball is Euclidean;
  * `restarts` random starts u0 + R (U[0,1] - 0.5) per coordinate, `steps` ascent steps on the raw gradient
    times a per-sample step alpha (initially 3.0): if the log-confidence got worse, go back to the previous
    point and halve alpha, otherwise accept and multiply alpha by 1.1;
  * after every step: project onto the ball in u, map to pixels, clip to [0,1], map forward again.

Rows, all x100: TE (test error), MMC (mean confidence of the adversarial samples), SR (share of adversarial
samples with log-conf >= the median in-distribution test log-conf) and AUC (in-test vs adversarial noise).

Differences from the original `gen_pca_noise`: "revert" really restores the previous point (the original kept
the stepped one through an aliased in-place update); every restart uses the given step size; and the returned
sample is pulled radially towards its seed after the final alternating projections, so it lies in the ball AND
in the box exactly (the seed is in the box, so the segment towards it stays there).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.gmm import PCAMetric
from utils.attacks import eval_mode

STUDY = "ccu_attack"


def log_conf(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """max_y log softmax(model(x)); for CCU's log-probability outputs this is max_y log p(y|x)."""
    return F.log_softmax(model(x), dim=1).amax(dim=1)


def _to_ball_and_box(u: torch.Tensor, u_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric) -> torch.Tensor:
    """One alternating projection: L2 ball of radius R around u_seed in u, then the [0,1] box in pixels."""
    delta = u - u_seed
    delta = delta * (radius[:, None] / delta.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return metric.whiten(metric.unwhiten(u_seed + delta).clamp(0.0, 1.0))


def _pull_inside(x: torch.Tensor, x_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric) -> torch.Tensor:
    """Move each x towards its seed until d(x, seed) <= R: exact feasibility for ball and box (flat (N, D))."""
    dist = metric.distance(x, x_seed)
    scale = (radius * (1.0 - 1e-6) / dist.clamp_min(1e-30)).clamp(max=1.0)
    return x_seed + (x - x_seed) * scale[:, None]


def _score_and_grad(model: nn.Module, u: torch.Tensor, metric: PCAMetric, shape: tuple) -> tuple:
    u = u.detach().requires_grad_(True)
    score = log_conf(model, metric.unwhiten(u).view(-1, *shape))
    (grad,) = torch.autograd.grad(score.sum(), u)
    return score.detach(), grad


def pca_ball_attack(model: nn.Module, x_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric,
                    restarts: int = 50, steps: int = 500, step_size: float = 3.0, final_projections: int = 10,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Most confident point of model within {d(x, x_seed) <= R} cap [0,1]^D, per seed (batched).

    x_seed (N, C, H, W) in [0,1], radius (N,) in the PCA metric. Returns (x_adv (N, C, H, W), log_conf (N,)),
    the best of the seed itself and every restart; both detached.
    """
    shape, n = tuple(x_seed.shape[1:]), x_seed.shape[0]
    metric = metric.to(x_seed.device)
    flat_seed = x_seed.reshape(n, -1).detach()
    radius = radius.to(x_seed.device, x_seed.dtype)
    u_seed = metric.whiten(flat_seed)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            best_score = log_conf(model, x_seed)
        best_x = flat_seed.clone()
        for _ in range(restarts):
            noise = torch.rand(u_seed.shape, generator=generator, dtype=u_seed.dtype).to(u_seed.device) - 0.5
            u = _to_ball_and_box(u_seed + radius[:, None] * noise, u_seed, radius, metric)
            score, grad = _score_and_grad(model, u, metric, shape)
            alpha = torch.full_like(radius, step_size)
            for _ in range(steps):
                cand = _to_ball_and_box(u + alpha[:, None] * grad, u_seed, radius, metric)
                cand_score, cand_grad = _score_and_grad(model, cand, metric, shape)
                better = cand_score >= score  # NaN never accepted
                u = torch.where(better[:, None], cand, u)
                grad = torch.where(better[:, None], cand_grad, grad)
                score = torch.where(better, cand_score, score)
                alpha = torch.where(better, alpha * 1.1, alpha * 0.5)
            for _ in range(final_projections):
                u = _to_ball_and_box(u, u_seed, radius, metric)
            x = _pull_inside(metric.unwhiten(u).clamp(0.0, 1.0), flat_seed, radius, metric)
            with torch.no_grad():
                score = log_conf(model, x.view(-1, *shape))
            better = score > best_score
            best_x = torch.where(better[:, None], x, best_x)
            best_score = torch.where(better, score, best_score)
    return best_x.view(-1, *shape).detach(), best_score.detach()


def attack_in_batches(model: nn.Module, seeds: torch.Tensor, radius: torch.Tensor, metric: PCAMetric,
                      args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    xs, scores = [], []
    for start in range(0, seeds.shape[0], args.batch_size):
        x, score = pca_ball_attack(model, seeds[start:start + args.batch_size], radius[start:start + args.batch_size],
                                   metric, args.restarts, args.steps, args.step_size, generator=generator)
        xs.append(x.cpu())
        scores.append(score.cpu())
    return torch.cat(xs), torch.cat(scores)

