"""DDU: Deep Deterministic Uncertainty (Mukhoti, Kirsch, van Amersfoort, Torr, Gal; arXiv 2102.11582).

A Gaussian discriminant analysis (GDA) fitted on the penultimate features z of a (spectrally normalised)
network: one full-covariance Gaussian per class,

    mu_c = mean of z over class c,   Sigma_c = 1/(n_c - 1) * sum (z - mu_c)(z - mu_c)^T,
    l_c(z) = log N(z; mu_c, Sigma_c + eps I),

with eps the first value of [0, float64.tiny, 1e-308, 1e-307, ..., 1e-1] for which every Sigma_c + eps I has a
Cholesky factor (docs/methods.md#ddu-density). Scores, each a confidence (higher = more in-distribution):

    "density"          epistemic:  LSE_c (l_c(z) + log pi_c)        (the feature log-density, "m1")
    "gmm_entropy"      -H(softmax_c(l_c(z) + log pi_c))             (the GDA's "m2", negated)
    "softmax_entropy"  aleatoric: -H(softmax(logits))              (the network's own entropy, negated)

priors="equal" drops log pi_c entirely, as the original `evaluate.py` does (LSE_c l_c, which differs from the
equal-weight mixture only by the constant log K); priors="class" uses the training-class frequencies pi_c, as the
paper's q(z) = sum_c q(z|c) pi_c and the original active-learning script do ([DIFF]).

Differences from the original `gmm_utils.gmm_fit` (docs/methods.md#ddu-deviations): a jitter search that fails
everywhere raises an error naming the classes and the largest jitter tried instead of leaving the model undefined, and
only Cholesky failures are caught.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from utils.detectors.base import Detector, num_classes_of

SCORES = ("density", "gmm_entropy", "softmax_entropy")
PRIORS = ("equal", "class")
# what each score measures, as the DDU tables name it
SCORE_NAMES = {"density": "GMM density", "gmm_entropy": "GMM entropy", "softmax_entropy": "softmax entropy"}


def default_jitters() -> list[float]:
    """DDU's jitter ladder: 0, the smallest positive normal float64, then 1e-308, 1e-307, ..., 1e-1."""
    return [0.0, torch.finfo(torch.float64).tiny] + [10.0 ** exponent for exponent in range(-308, 0)]


class JitterError(RuntimeError):
    """No jitter on the ladder made every class covariance positive definite."""


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class mean (K, F), unbiased covariance (K, F, F) and count (K,) of float64 features (N, F)."""
    features = features.to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes)
    too_few = [c for c in range(num_classes) if counts[c] < 2]
    if too_few:
        raise ValueError(f"DDU needs at least 2 training features per class for an unbiased covariance; "
                         f"classes {too_few} have {[int(counts[c]) for c in too_few]}")
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
    covariances = torch.stack([torch.cov(features[labels == c].T, correction=1).reshape(features.shape[1], -1)
                               for c in range(num_classes)])
    return means, covariances, counts


def jittered_cholesky(covariances: torch.Tensor, jitters: Iterable[float] | None = None
                      ) -> tuple[torch.Tensor, float]:
    """Cholesky factors (K, F, F) of Sigma_c + eps I for the first eps of the ladder, IN THE LADDER'S ORDER, that
    works for every class (the original's linear scan over 0, float64 tiny, 1e-308, ..., so tiny is tried before
    the smaller subnormal 1e-308).

    One eps for all classes, as in the original (it builds one batched MultivariateNormal). The original tries the
    ~310 rungs one by one; at F = 1024 with dead (zero-variance) features that is minutes of Cholesky calls.
    Success is monotone in the value of eps up to rounding, so this bisects the sorted values for the smallest
    one that works, v, and returns the first rung in ladder order whose value is >= v: the linear scan's answer
    whenever success is monotone, for about log2(310) factorisations.
    """
    ladder = default_jitters() if jitters is None else [float(eps) for eps in jitters]
    if not ladder:
        raise ValueError("the DDU jitter ladder is empty")
    eye = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    tried: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def attempt(eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(cholesky, failed classes mask) at one jitter, computed once."""
        if eps not in tried:
            cholesky, info = torch.linalg.cholesky_ex(covariances + eps * eye)
            # cholesky_ex can "succeed" with NaN on inputs that already hold NaN/inf; count those as failures
            tried[eps] = cholesky, (info != 0) | ~torch.isfinite(cholesky).flatten(1).all(1)
        return tried[eps]

    values = sorted(set(ladder))
    if attempt(values[-1])[1].any():
        bad = attempt(values[-1])[1].nonzero().flatten().tolist()
        raise JitterError(f"DDU: class covariance(s) of classes {bad} are not positive definite even with the "
                          f"largest jitter tried, {values[-1]:g} * I (features may be constant, huge, or NaN)")
    low, high = -1, len(values) - 1            # invariant: values[high] works; values[<= low] failed (or none)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if not attempt(values[middle])[1].any() else (middle, high)
    eps = next(rung for rung in ladder if rung >= values[high])
    if attempt(eps)[1].any():                   # rounding broke monotonicity: fall back to the smallest that works
        eps = values[high]
    return attempt(eps)[0], eps


def gaussian_log_densities(features: torch.Tensor, means: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """log N(z; mu_c, L_c L_c^T) for every sample and class: (N, F) -> (N, K), float64, batched over classes.

    log N = -1/2 ||L_c^{-1}(z - mu_c)||^2 - sum_i log L_c[i, i] - F/2 log(2 pi).
    """
    features = features.to(device=means.device, dtype=torch.float64)
    centred = (features.unsqueeze(0) - means.unsqueeze(1)).transpose(1, 2)        # (K, F, N)
    whitened = torch.linalg.solve_triangular(cholesky, centred, upper=False)         # (K, F, N)
    mahalanobis = whitened.pow(2).sum(1)                                               # (K, N)
    half_log_det = cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)                   # (K,)
    dim = features.shape[1]
    return (-0.5 * mahalanobis - half_log_det.unsqueeze(1) - 0.5 * dim * math.log(2 * math.pi)).T


def negative_entropy(log_weights: torch.Tensor) -> torch.Tensor:
    """-H(softmax(log_weights)) per row; exact at probability 0 (0 * log 0 = 0), so no epsilon is needed."""
    log_probs = torch.log_softmax(log_weights, dim=1)
    return (log_probs.exp() * log_probs).nan_to_num(nan=0.0).sum(1)


class DDU(Detector):
    """DDU's feature-density detector (arXiv 2102.11582, docs/methods.md#ddu-density); see the module docstring for the
    formulas.

    score: "density" | "gmm_entropy" | "softmax_entropy"; priors: "equal" | "class" (the [DIFF] above);
    jitters: the ladder to search (default DDU's). After `fit`: `means_`, `cholesky_`, `log_priors_`, `jitter_`.
    """

    needs_grad = False
    needs_features = True  # the class Gaussians live in feature space (not for score "softmax_entropy")

    def __init__(self, model: nn.Module, score: str = "density", priors: str = "equal",
                 jitters: Iterable[float] | None = None) -> None:
        super().__init__(model)
        if score not in SCORES:
            raise ValueError(f"unknown DDU score {score!r}; valid: {', '.join(SCORES)}")
        if priors not in PRIORS:
            raise ValueError(f"unknown DDU priors {priors!r}; valid: {', '.join(PRIORS)}")
        self.score, self.priors = score, priors
        self.needs_features = score != "softmax_entropy"
        self.jitters = None if jitters is None else list(jitters)
        self.means_ = self.cholesky_ = self.log_priors_ = None
        self.jitter_: float | None = None

    @torch.no_grad()
    def fit(self, loader: Iterable) -> "DDU":
        """Fit the class Gaussians on the features of a plain (un-augmented) loader of the training split."""
        if self.score == "softmax_entropy":
            return self                                   # the network's own entropy needs no statistics
        self.model.eval()
        device = next(self.model.parameters()).device
        store = torch.device("cpu") if device.type == "mps" else device   # MPS has no float64
        features, labels = [], []
        for x, y in loader:
            features.append(self.model.features(x.to(device)).to(store, torch.float64))
            labels.append(torch.as_tensor(y).to(store))
        num_classes = num_classes_of(self.model, features[0][:1].to(torch.get_default_dtype()))
        return self.fit_features(torch.cat(features), torch.cat(labels), num_classes)

    def fit_features(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
                     ) -> "DDU":
        """Fit on precomputed features (N, F) and labels (N,); num_classes defaults to max(label) + 1."""
        if features.device.type == "mps":                 # MPS has no float64
            features, labels = features.cpu(), labels.cpu()
        labels = labels.to(device=features.device, dtype=torch.long)
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        means, covariances, counts = class_statistics(features, labels, num_classes)
        self.cholesky_, self.jitter_ = jittered_cholesky(covariances, self.jitters)
        self.means_ = means
        self.log_priors_ = (counts.to(torch.float64) / counts.sum()).log()
        return self

    def class_log_densities(self, features: torch.Tensor) -> torch.Tensor:
        """l_c(z) = log N(z; mu_c, Sigma_c + eps I): (N, F) -> (N, K) float64."""
        if self.means_ is None:
            raise RuntimeError("DDU is not fitted: call fit(train_loader) first")
        return gaussian_log_densities(features, self.means_, self.cholesky_)

    def log_joint(self, features: torch.Tensor) -> torch.Tensor:
        """l_c(z) + log pi_c (priors="class") or l_c(z) (priors="equal"): (N, K)."""
        log_densities = self.class_log_densities(features)
        return log_densities + self.log_priors_ if self.priors == "class" else log_densities

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.score == "softmax_entropy":
            return negative_entropy(logits)
        log_joint = self.log_joint(features)
        scores = log_joint.logsumexp(1) if self.score == "density" else negative_entropy(log_joint)
        return scores if features.device.type == "mps" else scores.to(features.device)


DDU_DETECTORS = {"ddu": DDU}
