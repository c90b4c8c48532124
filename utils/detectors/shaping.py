"""Activation shaping: energy of the logits of clipped (ReAct), pruned (ASH) or rescaled (SCALE) penultimate
features through the network's last layer (W, b).

All three act on the penultimate feature VECTOR z of `model.features` (the pooled vector for convolutional
networks). ReAct's original clips that vector too; ASH and SCALE's originals prune the pre-pooling feature map
(C x H x W), which our models do not expose. OpenOOD's ASH network does what we do (the pooled vector viewed as a
C x 1 x 1 map), as does the Mahalanobis++ code's SCALE / ASH evaluation (docs/methods.md#ash).
"""
from __future__ import annotations

import torch
from torch import nn

from utils.detectors.common import check_choice
from utils.detectors.training_stats import HeadDetector, TrainStatsDetector, check_in, percentile

ASH_VARIANTS = ("p", "b", "s")


def kept_count(dim: int, p: float) -> int:
    """How many of dim activations survive pruning at percentile p: dim - round(dim * p / 100), at least 1
    (the originals' count; with round-half-to-even as numpy's round)."""
    return max(1, dim - int(round(dim * p / 100.0)))


def ash(features: torch.Tensor, p: float, variant: str = "s") -> torch.Tensor:
    """ASH of feature vectors (N, F): keep the top (100 - p)% activations of each row, then
    -p: leave them;  -b: set each to s1 / k (s1 = the row's sum before pruning);
    -s: multiply them by exp(s1 / s2) (s2 = the row's sum after pruning)."""
    k = kept_count(features.shape[1], p)
    values, index = features.topk(k, dim=1)
    if variant == "p":
        return torch.zeros_like(features).scatter(1, index, values)
    total = features.sum(dim=1, keepdim=True)
    if variant == "b":
        return torch.zeros_like(features).scatter(1, index, (total / k).expand(-1, k))
    return torch.zeros_like(features).scatter(1, index, values * torch.exp(ratio(total, values.sum(1, keepdim=True))))


def ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """s1 / s2, and 0 where s2 = 0: then the kept activations are all 0 (a dead ReLU layer), so the original's
    0 / 0 = NaN would only turn a well-defined zero vector into NaN."""
    return torch.where(s2 == 0, torch.zeros_like(s1), s1 / torch.where(s2 == 0, torch.ones_like(s2), s2))


def scale_factor(features: torch.Tensor, p: float) -> torch.Tensor:
    """SCALE's exp(s1 / s2) per row (N, 1): s1 the sum of all activations, s2 the sum of the top (100 - p)%."""
    k = kept_count(features.shape[1], p)
    return torch.exp(ratio(features.sum(dim=1, keepdim=True), features.topk(k, dim=1).values.sum(dim=1, keepdim=True)))


class ReAct(TrainStatsDetector):
    """ReAct (Sun, Guo, Li; NeurIPS 2021, arXiv 2111.12797): energy after rectifying the features,

        confidence(x) = logsumexp_k (W min(z, c) + b)_k,  c = the p-th percentile of all training activations
        (every entry of every training feature vector, numpy's linear interpolation), default p = 90.
    """

    def __init__(self, model: nn.Module, p: float = 90.0) -> None:
        super().__init__(model)
        self.p = check_in("ReAct p", p, 0.0, 100.0)
        self.threshold: torch.Tensor | None = None

    def _fit(self, features, logits, labels) -> None:
        self.threshold = percentile(features, self.p)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        clipped = features.float().clamp(max=float(self.threshold))
        return torch.logsumexp(self.head_logits(clipped), dim=1)


class ASH(HeadDetector):
    """ASH (Djurisic, Bozanic, Ashok, Liu; ICLR 2023, arXiv 2209.09858): energy of the shaped features,

        confidence(x) = logsumexp_k (W a(z) + b)_k, a = ASH-p / ASH-b / ASH-s at percentile p (see `ash`).

    variant "s" and p = 90 by default. Nothing to fit: the pruning is per sample.
    """

    def __init__(self, model: nn.Module, p: float = 90.0, variant: str = "s") -> None:
        super().__init__(model)
        self.p = check_in("ASH p", p, 0.0, 100.0)
        self.variant = check_choice("ASH variant", str(variant).lower().removeprefix("ash-").removeprefix("-"),
                                    ASH_VARIANTS)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.head_logits(ash(features.float(), self.p, self.variant)), dim=1)


class Scale(HeadDetector):
    """SCALE (Xu, Chen, Franchi, Yao; ICLR 2024, arXiv 2310.00227): energy of the features scaled, not pruned,

        confidence(x) = logsumexp_k (W (r(z) z) + b)_k,  r(z) = exp(s1 / s2),  s1 = sum_i z_i,
        s2 = sum of the top (100 - p)% entries of z; default p = 85.
    """

    def __init__(self, model: nn.Module, p: float = 85.0) -> None:
        super().__init__(model)
        self.p = check_in("SCALE p", p, 0.0, 100.0)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z = features.float()
        return torch.logsumexp(self.head_logits(z * scale_factor(z, self.p)), dim=1)
