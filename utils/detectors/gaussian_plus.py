"""Mahalanobis variants with one shared covariance: Mahalanobis++ (normalised features) and the relative
Mahalanobis distance (RMDS). Distances come from `Mahalanobis`'s float64 pseudo-inverse machinery."""
from __future__ import annotations

import torch
from torch import nn

from utils.detectors.mahalanobis import Mahalanobis
from utils.detectors.neighbours import unit_rows
from utils.detectors.training_stats import TrainStatsDetector


def tied_gaussian(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> Mahalanobis:
    """A fitted Mahalanobis distance: class means mu_c and the maximum-likelihood covariance of the class-centred
    features, (1/N) sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T (sklearn's EmpiricalCovariance, as the originals),
    pseudo-inverted in float64."""
    z = features.double() if features.device.type != "mps" else features.cpu().double()
    labels = labels.to(z.device)
    classes = torch.unique(labels)
    means = torch.stack([z[labels == c].mean(dim=0) for c in classes])
    centred = z - means[torch.searchsorted(classes, labels)]
    engine = Mahalanobis(model)
    engine.means, engine.classes = means, classes
    engine._set_precision(centred.T @ centred / len(z))
    return engine


class MahalanobisPlusPlus(TrainStatsDetector):
    """Mahalanobis++ (Mueller & Hein; ICML 2025, arXiv 2505.18032): Lee et al.'s Mahalanobis score on
    L2-normalised features,

        u = z/||z||,  confidence(x) = -min_c (u - mu_c)^T pinv(Sigma) (u - mu_c),

    mu_c and the tied Sigma fitted on the normalised training features (`tied_gaussian`). No input
    preprocessing (the paper uses none).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.gaussian: Mahalanobis | None = None

    def _fit(self, features, logits, labels) -> None:
        self.gaussian = tied_gaussian(self.model, unit_rows(features), labels)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        distances = self.gaussian.distances(unit_rows(features).to(self.gaussian.means.device))
        return -distances.amin(dim=1).to(features.device)


class RMDS(TrainStatsDetector):
    """Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan; arXiv 2106.09022):

        confidence(x) = -min_c [ MD_c(z) - MD_0(z) ],

    MD_c the squared Mahalanobis distance to class mean mu_c under the tied class-centred covariance (as
    `Mahalanobis`), MD_0 the squared distance to the mean of all training features under their covariance (one
    "background" Gaussian), both maximum likelihood and pseudo-inverted, on the raw features.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.classes_: Mahalanobis | None = None
        self.background: Mahalanobis | None = None

    def _fit(self, features, logits, labels) -> None:
        self.classes_ = tied_gaussian(self.model, features, labels)
        self.background = tied_gaussian(self.model, features, torch.zeros_like(labels))

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        z = features.to(self.classes_.means.device)
        relative = self.classes_.distances(z) - self.background.distances(z)
        return -relative.amin(dim=1).to(features.device)
