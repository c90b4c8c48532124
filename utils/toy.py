"""Toy binary classifiers on two half-moons and their uncertainty scores.

Ulmer & Cina, "Know your limits: Uncertainty estimation with ReLU classifiers fails at reliably detecting
out-of-distribution data", UAI 2021, arXiv 2012.05329 (SPEC 5.2). Every model has ONE logit f(x) and predicts
p(x) = [1 - sigmoid(f), sigmoid(f)] = softmax([0, f]); `predict_samples(x) -> (S, N, 2)` returns the S member /
Monte-Carlo predictions, from which the scores below are computed for any (S, N, K) probability tensor.

Data live in the raw `make_moons` coordinates (roughly [-1.2, 2.2] x [-0.7, 1.2]) as in the paper; the repo's
`moons` dataset is a different thing (rescaled into [0, 1]^2 for ACET's toy experiment).

Differences from the original code (SPEC 6 "Ulmer"), all deliberate:
* [BUG fixed] MC dropout is active at inference (the original left the module in eval mode: var = 0).
* [BUG fixed] Platt scaling counts patience per epoch on the full validation loss, not per batch.
* [BUG fixed] mutual information is H(mean_s p_s) - mean_s H(p_s); `mutual_information_original` reproduces the
  original's class-axis mean, which equals S/2 - mean entropy for K = 2 (hence its [4, 5] colour range).
* [DIFF] Anchored ensembles use Pearce et al.'s squared penalty; `anchor_penalty="original"` keeps the
  original's unsquared norm (see `AnchoredEnsemble`).
* BBB uses an own Gaussian-prior BayesianLinear (no blitz dependency) with the closed-form KL.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MOONS_SEED = 123


class MoonsData(NamedTuple):
    x_train: torch.Tensor  # (500, 2) float32
    y_train: torch.Tensor  # (500,) float32 in {0, 1}
    x_val: torch.Tensor    # (250, 2)
    y_val: torch.Tensor


def moons_data(n_samples: int = 750, noise: float = 0.125, n_train: int = 500, seed: int = MOONS_SEED) -> MoonsData:
    """`make_moons(750, noise=0.125)`: the first 500 points train, the last 250 validate (SPEC 5.2, seed 123)."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    return MoonsData(x_t[:n_train], y_t[:n_train], x_t[n_train:], y_t[n_train:])


# ---------------------------------------------------------------------------------------------------- scores
def entropy(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Predictive entropy in bits of the mean prediction: -sum_k pbar_k log2(pbar_k + eps); (S, N, K) -> (N,)."""
    mean = probs.mean(0)
    return -(mean * torch.log2(mean + eps)).sum(-1)


def max_prob(probs: torch.Tensor) -> torch.Tensor:
    """1 - max_k pbar_k (an uncertainty: 0 = certain); (S, N, K) -> (N,)."""
    return 1.0 - probs.mean(0).amax(-1)


def class_variance(probs: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the (population) variance across the S samples: mean_k Var_s[p_sk]; (S,N,K) -> (N,)."""
    return probs.var(0, unbiased=False).mean(-1)


def mutual_information(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mutual information I(y; theta | x) = H(mean_s p_s) - mean_s H(p_s) in bits (Depeweg et al. 2018, eq. 7-8).

    Non-negative by concavity of the entropy (clamped at 0 against rounding) and 0 when all samples agree.
    """
    member_entropy = -(probs * torch.log2(probs + eps)).sum(-1).mean(0)
    return (entropy(probs, eps) - member_entropy).clamp_min(0.0)


def mutual_information_original(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The original's "mutual information" [BUG, SPEC 6]: the entropy is taken over the SAMPLE axis of the
    class-averaged predictions, giving S/K*log2(K)-ish constants (S/2 - mean entropy for K = 2). Kept only to
    reproduce the published colour range; do not use as an uncertainty."""
    class_mean = probs.mean(-1)  # (S, N): 1/K for every sample
    sample_entropy = -(class_mean * torch.log2(class_mean + eps)).sum(0)
    member_entropy = -(probs * torch.log2(probs + eps)).sum(-1).mean(0)
    return sample_entropy - member_entropy


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": entropy, "max_prob": max_prob, "var": class_variance, "mutual_information": mutual_information,
}


def get_score(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; valid: {', '.join(SCORES)}")
    return SCORES[name]


# ---------------------------------------------------------------------------------------------------- layers
def _binary_probs(logit: torch.Tensor) -> torch.Tensor:
    """(..., N) logit -> (..., N, 2) probabilities [1 - sigmoid(f), sigmoid(f)]."""
    p1 = torch.sigmoid(logit)
    return torch.stack([1.0 - p1, p1], dim=-1)


def mlp_layers(hidden: Sequence[int], dropout: float, in_dim: int = 2) -> nn.Sequential:
    """in -> [Linear -> ReLU -> Dropout] per hidden width -> Linear(1), as the original's MLPModule."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class BayesianLinear(nn.Module):
    """Mean-field Gaussian linear layer for Bayes by Backprop (Blundell et al. 2015, arXiv 1505.05424).

    q(w) = N(mu, softplus(rho)^2) per weight, prior p(w) = N(0, prior_sigma^2), closed-form KL. In training
    the local reparametrisation trick (Kingma et al. 2015) samples pre-activations; `forward_samples` draws S
    whole weight matrices, so every sample is one ordinary ReLU network (piecewise affine in x).
    """

    def __init__(self, in_features: int, out_features: int, prior_sigma: float = 0.904837,
                 mu_init: float = -0.049415, rho_init: float = -7.910957) -> None:
        super().__init__()
        self.prior_sigma = prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).normal_(mu_init, 0.1))
        self.weight_rho = nn.Parameter(torch.empty(out_features, in_features).normal_(rho_init, 0.1))
        self.bias_mu = nn.Parameter(torch.empty(out_features).normal_(mu_init, 0.1))
        self.bias_rho = nn.Parameter(torch.empty(out_features).normal_(rho_init, 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        if not self.training:
            return mean  # posterior mean network
        var = F.linear(x * x, F.softplus(self.weight_rho) ** 2, F.softplus(self.bias_rho) ** 2)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def forward_samples(self, h: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """h: (S, N, in) -> (S, N, out) with one weight draw per sample s (shared across the N points)."""
        n_samples = h.shape[0]
        eps_w = torch.randn((n_samples, *self.weight_mu.shape), generator=generator).to(h)
        eps_b = torch.randn((n_samples, 1, self.bias_mu.numel()), generator=generator).to(h)
        weight = self.weight_mu + F.softplus(self.weight_rho) * eps_w        # (S, out, in)
        bias = self.bias_mu + F.softplus(self.bias_rho) * eps_b              # (S, 1, out)
        return torch.baddbmm(bias, h, weight.transpose(1, 2))

    def kl(self) -> torch.Tensor:
        """KL(q || p) = sum log(sigma_p / sigma) + (sigma^2 + mu^2) / (2 sigma_p^2) - 1/2."""
        total = torch.zeros(())
        for mu, rho in ((self.weight_mu, self.weight_rho), (self.bias_mu, self.bias_rho)):
            sigma = F.softplus(rho)
            total = total + (math.log(self.prior_sigma) - torch.log(sigma)
                             + (sigma ** 2 + mu ** 2) / (2 * self.prior_sigma ** 2) - 0.5).sum()
        return total
