"""Mahalanobis distance to the closest class mean in feature space (Lee et al., NeurIPS 2018, arXiv 1807.03888).

The single-layer version that CCU uses as its "Maha" baseline (docs/methods.md#mahalanobis; the original's
`single_maha.py`): penultimate features only, no feature ensemble and no logistic-regression combination of layers.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from utils.detectors.base import Detector, num_classes_of
from utils.detectors.common import (GRADIENTS, check_choice, input_gradient, model_device, perturb,
                                    select_setting, step_direction, sweep_loader)

# Lee et al.'s noise magnitudes, which CCU's single_maha.py also searches (docs/methods.md#mahalanobis).
MAHALANOBIS_EPS_GRID: tuple[float, ...] = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def _stat_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class Mahalanobis(Detector):
    """confidence(x) = -min_c (z - mu_c)^T P (z - mu_c), z = model.features(x) (squared distance, as Lee et al.).

    fit(loader): class means mu_c of the training features and the tied covariance of the class-centred
    features, Sigma = (1/N) sum_c sum_{i in c} (z_i - mu_c)(z_i - mu_c)^T (maximum likelihood, as sklearn's
    EmpiricalCovariance used by Lee et al. and CCU), P = pinv(Sigma) (as EmpiricalCovariance's pinvh, so that
    rank-deficient features, e.g. dead ReLUs, do not break the fit). Statistics are accumulated batch by batch
    in float64 (shifted by the first batch's mean against cancellation), so memory does not grow with N.
    Classes absent from the fitting data get no mean and are ignored.

    ridge > 0 inverts Sigma + ridge * I instead (not in Lee et al. or CCU): pinv ignores feature directions in
    which the training data never vary (dead ReLUs are common in LeNet's 1024-d layer), so an input that
    activates them is not penalised; a ridge penalises them. pytorch-ood 0.4.0 inverts the *unnormalised*
    scatter matrix plus 1e-6 * I, which ranks inputs exactly as ridge = 1e-6 / N does here.

    eps > 0 adds Lee et al.'s input preprocessing: x~ = x - eps * sign(grad_x M(x)) (sign(0) = +1), a step in
    [0, 1] pixel units that decreases the distance M to the closest class (the std division of the original
    is absorbed as explained in `ODIN`); gradient="raw" is CCU's clip(x + eps * grad_x conf(x), 0, 1).
    With eps == 0 the score needs only the features of the shared forward pass, so `needs_grad` is False
    and `from_outputs` works; `needs_grad` is an instance attribute that follows eps (also after `tune`).
    """

    tunable = True
    needs_features = True

    def __init__(self, model: nn.Module, eps: float = 0.0, gradient: str = "sign",
                 clip: Optional[bool] = None, ridge: float = 0.0) -> None:
        super().__init__(model)
        if ridge < 0:
            raise ValueError(f"Mahalanobis ridge must be >= 0, got {ridge}")
        self.ridge = float(ridge)
        self.gradient = check_choice("Mahalanobis gradient", gradient, GRADIENTS)
        self.clip = (gradient == "raw") if clip is None else bool(clip)
        self.eps = float(eps)
        self.means: Optional[torch.Tensor] = None      # (K', F), float64
        self.classes: Optional[torch.Tensor] = None    # (K',) labels with a mean
        self.support: Optional[torch.Tensor] = None    # (F',) feature indices with nonzero training variance
        self._precision: Optional[torch.Tensor] = None  # (F', F') on the support
        self._means_precision: Optional[torch.Tensor] = None  # (K', F') = means P on the support
        self._means_quad: Optional[torch.Tensor] = None  # (K',) = mu_c^T P mu_c

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = float(value)
        self.needs_grad = self._eps != 0.0

    @torch.no_grad()
    def fit(self, loader: Iterable) -> "Mahalanobis":
        device = model_device(self.model)
        dtype = _stat_dtype(device)
        shift = sums = counts = outer = None
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device).long()
            if (y < 0).any():
                raise ValueError("Mahalanobis.fit needs labelled in-distribution data (found label -1)")
            z = self.model.features(x).to(dtype)
            if shift is None:
                num_classes = num_classes_of(self.model, z[:1].to(x.dtype))
                shift = z.mean(dim=0)
                sums = torch.zeros(num_classes, z.shape[1], dtype=dtype, device=device)
                counts = torch.zeros(num_classes, dtype=dtype, device=device)
                outer = torch.zeros(z.shape[1], z.shape[1], dtype=dtype, device=device)
            z = z - shift
            sums.index_add_(0, y, z)
            counts += torch.bincount(y, minlength=counts.numel()).to(dtype)
            outer += z.T @ z
        if shift is None:
            raise ValueError("Mahalanobis.fit got an empty loader")
        present = counts > 0
        sums, counts = sums[present], counts[present]
        # sum_c sum_i (z_i - mu_c)(z_i - mu_c)^T = sum_i z_i z_i^T - sum_c s_c s_c^T / n_c  (s_c: class sums)
        covariance = (outer - sums.T @ (sums / counts[:, None])) / counts.sum()
        covariance.diagonal().add_(self.ridge)
        self.means = sums / counts[:, None] + shift
        self.classes = torch.nonzero(present).flatten()
        self._set_precision(covariance)
        return self

    def _set_precision(self, covariance: torch.Tensor) -> None:
        """P = pinv(Sigma) (the inverse, via Cholesky, when a ridge makes Sigma positive definite), computed on
        the features that vary in training only.

        A feature with zero variance (a dead ReLU) has an all-zero row and column in the PSD Sigma, so pinv
        has zeros there and equals pinv of the remaining block: dropping those features first is exact, and
        it makes the eigendecomposition smaller and free of the degenerate zero cluster (several times faster
        on LeNet's 1024-d features).
        """
        self.support = torch.nonzero(covariance.diagonal() > 0).flatten()
        block = covariance[self.support][:, self.support]
        factor, info = torch.linalg.cholesky_ex(block) if self.ridge > 0 else (None, 1)
        if info == 0:  # positive definite (ridge > 0): the exact inverse, several times cheaper than eigh
            self._precision = torch.cholesky_inverse(factor)
        else:
            self._precision = torch.linalg.pinv(block, hermitian=True)
        means = self.means[:, self.support]
        self._means_precision = means @ self._precision
        self._means_quad = (self._means_precision * means).sum(dim=1)

    @property
    def precision(self) -> torch.Tensor:
        """(F, F) precision matrix pinv(Sigma + ridge I), float64 (zero rows/columns for constant features)."""
        if self._precision is None:
            raise RuntimeError("Mahalanobis detector is not fitted: call fit(train_loader) first")
        dim = self.means.shape[1]
        full = self._precision.new_zeros(dim, dim)
        full[self.support[:, None], self.support[None, :]] = self._precision
        return full

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K') squared Mahalanobis distances of features to every class mean, in float64."""
        if self._precision is None:
            raise RuntimeError("Mahalanobis detector is not fitted: call fit(train_loader) first")
        z = features[:, self.support].to(self._precision.dtype)
        quad = ((z @ self._precision) * z).sum(dim=1, keepdim=True)
        return (quad - 2.0 * z @ self._means_precision.T + self._means_quad).clamp_min(0.0)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.needs_grad:
            raise RuntimeError(f"Mahalanobis with eps={self.eps} perturbs the input: call confidence(x)")
        return -self.distances(features).amin(dim=1)

    def _conf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conf = -self.distances(self.model.features(x)).amin(dim=1)
        return conf, conf

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        if not self.needs_grad:
            with torch.no_grad():
                return self._conf(x)[0]
        return self.confidence_sweep(x, [self.eps])[0]

    def confidence_sweep(self, x: torch.Tensor, eps_list: Sequence[float]) -> torch.Tensor:
        """(len(eps_list), N) confidences from ONE backward pass shared by all eps (eps = 0 is free)."""
        grad, conf0 = input_gradient(self._conf, x)
        direction = step_direction(grad, self.gradient)
        rows = []
        with torch.inference_mode():
            for eps in eps_list:
                rows.append(conf0 if eps == 0 else self._conf(perturb(x, direction, float(eps), self.clip))[0])
        return torch.stack(rows)

    def tune(self, loader_in: Iterable, loader_out: Iterable,
             eps_grid: Sequence[float] = MAHALANOBIS_EPS_GRID, criterion: str = "fpr95",
             fpr_convention: str = "id", max_batches: Optional[int] = None) -> dict:
        """Choose eps on held-out in/out data (CCU: AUROC on 12 train vs 12 Tiny-Images batches, i.e.
        `criterion="auroc", max_batches=12`), set it (and needs_grad) on the detector, return the choice."""
        check_choice("criterion", criterion, ("fpr95", "auroc"))
        device = model_device(self.model)
        sweep = lambda x: self.confidence_sweep(x, eps_grid)  # noqa: E731  (E, B)
        conf_in = sweep_loader(sweep, loader_in, device, max_batches)
        conf_out = sweep_loader(sweep, loader_out, device, max_batches)
        index, metrics = select_setting(conf_in, conf_out, criterion, fpr_convention)
        self.eps = float(eps_grid[index])
        return {"eps": self.eps, "criterion": criterion,
                **{f"val_{name}": value for name, value in metrics.items()}}
