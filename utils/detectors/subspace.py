"""Detectors that use the geometry of the last layer (W, b) in feature space: ViM and fDBD."""
from __future__ import annotations

import torch
from torch import nn

from utils.detectors.training_stats import TrainStatsDetector, check_count, head_parameters


def vim_default_dim(features: int) -> int:
    """The original's principal-subspace size: 1000 for >= 2048 features, 512 for >= 768, else half."""
    return 1000 if features >= 2048 else 512 if features >= 768 else features // 2


class ViM(TrainStatsDetector):
    """ViM, virtual-logit matching (Wang, Li, Feng, Zhang; CVPR 2022, arXiv 2203.10807):

        u = -pinv(W) b                           (the origin of feature space for the logits)
        R = eigenvectors of (1/N) sum_i (z_i - u)(z_i - u)^T beyond the `dim` largest eigenvalues
        alpha = mean_i max_k f_k(x_i) / mean_i ||R^T (z_i - u)||   (over the training set)
        confidence(x) = logsumexp_k f_k(x) - alpha ||R^T (z - u)||

    f the model's logits. dim defaults to `vim_default_dim(F)` and alpha to the training-set value; either can be
    given as an option.
    """

    def __init__(self, model: nn.Module, dim: int | None = None, alpha: float | None = None) -> None:
        super().__init__(model)
        self.dim = None if dim is None else check_count("ViM dim", dim)
        self.alpha = None if alpha is None else float(alpha)
        self.origin: torch.Tensor | None = None
        self.residual_basis: torch.Tensor | None = None

    def _fit(self, features, logits, labels) -> None:
        weight, bias = head_parameters(self.model, features.shape[1])
        dim = vim_default_dim(features.shape[1]) if self.dim is None else self.dim
        if dim >= features.shape[1]:
            raise ValueError(f"ViM dim = {dim} leaves no residual space in {features.shape[1]}-d features; "
                             f"pass dim < {features.shape[1]}")
        z = features.double().cpu()
        self.origin = -torch.linalg.pinv(weight.double().cpu()) @ bias.double().cpu()
        centred = z - self.origin
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(z))
        order = eigenvalues.argsort(descending=True)
        self.residual_basis = eigenvectors[:, order[dim:]]
        self.dim = dim
        if self.alpha is None:
            residual = (centred @ self.residual_basis).norm(dim=1).mean()
            if residual <= 0:
                raise ValueError("ViM: the training features have no residual off the principal subspace; "
                                 "pass a smaller dim")
            self.alpha = float(logits.double().cpu().amax(dim=1).mean() / residual)

    def residual_norm(self, features: torch.Tensor) -> torch.Tensor:
        """||R^T (z - u)|| per row, float64 on the features' device (CPU for MPS)."""
        device = features.device if features.device.type != "mps" else torch.device("cpu")
        centred = features.to(device, torch.float64) - self.origin.to(device)
        return (centred @ self.residual_basis.to(device)).norm(dim=1)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        residual = self.residual_norm(features)
        energy = torch.logsumexp(logits.double(), dim=1).to(residual.device)
        return (energy - self.alpha * residual).to(features.device)


class FDBD(TrainStatsDetector):
    """fDBD, feature distance to decision boundaries (Liu & Qin; ICML 2024, arXiv 2312.11536):

        confidence(x) = [1/(K-1) sum_{c != yhat} |f_yhat - f_c| / ||w_yhat - w_c||] / ||z - mu||,

    f = W z + b the last layer's logits of z, yhat = argmax f, mu the mean training feature: the average
    distance from z to the decision boundaries of yhat, relative to the distance from the training mean.
    The original sums over c instead of averaging (a constant factor K - 1, no change in ranking).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.mean: torch.Tensor | None = None
        self.gaps: torch.Tensor | None = None  # (K, K) ||w_p - w_c||, with 1 on the diagonal

    def _fit(self, features, logits, labels) -> None:
        self.weight, self.bias = head_parameters(self.model, features.shape[1])
        gaps = torch.cdist(self.weight.double(), self.weight.double())
        off_diagonal = ~torch.eye(len(gaps), dtype=torch.bool, device=gaps.device)
        if (gaps[off_diagonal] == 0).any():
            raise ValueError("fDBD: two classes have identical last-layer weights, so their decision boundary "
                             "has no distance")
        self.gaps = gaps.masked_fill(~off_diagonal, 1.0)
        self.mean = features.double().mean(dim=0)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        z = features.double()
        head = self.head_logits(z)
        top, predicted = head.max(dim=1)
        distances = (top[:, None] - head) / self.gaps.to(z.device)[predicted]
        mean_distance = distances.sum(dim=1) / max(1, head.shape[1] - 1)
        return mean_distance / (z - self.mean.to(z.device)).norm(dim=1).clamp_min(1e-12)
