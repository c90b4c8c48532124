"""CCU's input-space Gaussian mixtures and the PCA metric they share.

Meinke & Hein, "Towards neural networks that provably know when they don't know", ICLR 2020 (arXiv 1909.12180).
Every component of both mixtures (in- and out-distribution) uses the metric

    d(x, y) = || S^{-1/2} V (x - y) ||_2

with V the PCA basis of the flattened in-distribution training data and S = diag(s) its singular values (of the
centred data matrix, not covariance eigenvalues: the original's choice, kept), floored at s_1 / min_sv_factor.
A component with mean mu_k and log-variance l_k = log sigma_k^2 is then the exact Gaussian
N(mu_k, sigma_k^2 V^T S V):

    log N_k(x) = a_k - (D/2) l_k - d(x, mu_k)^2 / (2 e^{l_k}) - (D/2) log(2 pi) - 1/2 sum_i log s_i

with uniform frozen log-weights a_k = -log K_g. The mixture density is LSE_k log N_k(x), never exponentiated.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.precision import full_precision


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, D) -> (N, D)."""
    return x.reshape(x.shape[0], -1)


class _ResizeOnLoad(nn.Module):
    """Takes parameter/buffer shapes from the state_dict being loaded, so a module built with placeholder
    shapes (e.g. `wrap_model(init=False)` without the size keys in the config) still loads a checkpoint."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 (torch hook)
        for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if tensor is None or incoming is None or incoming.shape == tensor.shape:
                continue
            fresh = torch.empty(incoming.shape, dtype=tensor.dtype, device=tensor.device)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
            else:
                self._buffers[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PCAMetric(_ResizeOnLoad):
    """The metric d(x, y) = ||S^{-1/2} V (x - y)|| (docs/methods.md#ccu-model) with buffers V (D, D), s (D,), mean (D,).

    `whiten(x) = x_flat V^T / sqrt(s)` is linear and does NOT centre, so d(x, y) = ||whiten(x - y)||;
    `mean` is kept because centring before taking pairwise distances is free and improves float precision.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("V", torch.eye(dim))
        self.register_buffer("s", torch.ones(dim))
        self.register_buffer("mean", torch.zeros(dim))

    @property
    def dim(self) -> int:
        return self.V.shape[1]

    @classmethod
    def fit(cls, x: torch.Tensor | np.ndarray, min_sv_factor: float = 1e6) -> "PCAMetric":
        """Fit V, s (floored at s_1 / min_sv_factor) and the mean with sklearn PCA on flattened data (N, ...).

        With fewer samples than dimensions PCA yields N components; the basis is completed with an orthonormal
        basis of the remaining directions at the floored singular value, so the metric stays a norm on R^D
        (the original would have a degenerate V there).
        """
        from scipy.linalg import null_space
        from sklearn.decomposition import PCA

        data = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        data = _flat(data).double().numpy()
        dim = data.shape[1]
        # covariance_eigh (sklearn >= 1.5) is the fast exact solver when N >> D; older versions use "full"
        solver = "covariance_eigh" if data.shape[0] >= dim else "full"
        try:
            pca = PCA(svd_solver=solver).fit(data)
        except ValueError:
            pca = PCA(svd_solver="full").fit(data)
        basis, singular = pca.components_, np.clip(pca.singular_values_, 0.0, None)
        if basis.shape[0] < dim:
            complement = null_space(basis).T  # (D - r, D) orthonormal, orthogonal to the PCA rows
            basis = np.concatenate([basis, complement], axis=0)
            singular = np.concatenate([singular, np.zeros(dim - singular.shape[0])])
        singular = np.maximum(singular, singular[0] / min_sv_factor)
        metric = cls(dim)
        metric.V.copy_(torch.from_numpy(basis))
        metric.s.copy_(torch.from_numpy(singular))
        metric.mean.copy_(torch.from_numpy(pca.mean_))
        return metric

    @full_precision  # the metric defines the certified balls: never in bf16/fp16 under --amp
    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (N, ...) -> coordinates u = x_flat V^T / sqrt(s) (N, D) in which d is Euclidean."""
        return (_flat(x) @ self.V.T.to(x.dtype)) * self.s.to(x.dtype).rsqrt()

    @full_precision
    def unwhiten(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of `whiten`: (N, D) -> flattened pixels (N, D) (V is orthonormal)."""
        return (u * self.s.to(u.dtype).sqrt()) @ self.V.to(u.dtype)

    @full_precision
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x_i, y_i) per row; x, y of the same (or broadcastable flattened) shape."""
        return self.whiten(_flat(x) - _flat(y)).norm(dim=1)

    def log_norm_const(self) -> torch.Tensor:
        """1/2 sum_i log s_i: the log-determinant part of the normalising constant c of every component."""
        return 0.5 * self.s.log().sum()

    def centred_whiten(self, x: torch.Tensor) -> torch.Tensor:
        """whiten(x - mean): same pairwise distances as `whiten`, smaller norms, so less cancellation."""
        return self.whiten(_flat(x) - self.mean.to(x.dtype))


def pairwise_sq_dist(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """||u_i - m_k||^2 for u (N, D), m (K, D) -> (N, K), by the Gram expansion (memory N*K, not N*K*D)."""
    sq = u.pow(2).sum(1, keepdim=True) + m.pow(2).sum(1) - 2.0 * (u @ m.T)
    return sq.clamp_min(0.0)


class GMM(_ResizeOnLoad):
    """Spherical Gaussian mixture in the PCA metric (docs/methods.md#ccu-model): trainable pixel-space means `mu` (K, D)
    and log-variances `logvar` (K,), frozen uniform log-weights `logweight` (K,) (a buffer, never trained).

    `metric` is a shared submodule: the in- and out-mixture of one CCU model hold the same PCAMetric object.
    """

    def __init__(self, metric: PCAMetric, n_components: int, mu: torch.Tensor | None = None,
                 logvar: torch.Tensor | None = None) -> None:
        super().__init__()
        dim = metric.dim
        self.metric = metric
        mu = torch.zeros(n_components, dim) if mu is None else torch.as_tensor(mu, dtype=torch.float32)
        logvar = torch.zeros(n_components) if logvar is None else torch.as_tensor(logvar, dtype=torch.float32)
        if mu.shape != (n_components, dim) or logvar.shape != (n_components,):
            raise ValueError(f"GMM expects mu ({n_components}, {dim}) and logvar ({n_components},), "
                             f"got {tuple(mu.shape)} and {tuple(logvar.shape)}")
        self.mu = nn.Parameter(mu.clone())
        self.logvar = nn.Parameter(logvar.clone())
        self.register_buffer("logweight", torch.full((n_components,), -math.log(n_components)))

    @property
    def n_components(self) -> int:
        return self.mu.shape[0]

    def log_const(self) -> torch.Tensor:
        """c = (D/2) log 2 pi + 1/2 sum_i log s_i, shared by every component of both mixtures."""
        return 0.5 * self.metric.dim * math.log(2 * math.pi) + self.metric.log_norm_const()

    def sq_distances(self, x: torch.Tensor) -> torch.Tensor:
        """d(x_n, mu_k)^2, shape (N, K), in the dtype of x."""
        u = self.metric.centred_whiten(x)
        return pairwise_sq_dist(u, self.metric.centred_whiten(self.mu.to(u.dtype)))

    def component_log_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log N_k(x) including the log-weight, shape (N, K)."""
        logvar = self.logvar.to(x.dtype)
        dim = self.metric.dim
        return (self.logweight.to(x.dtype) - 0.5 * dim * logvar - self.log_const().to(x.dtype)
                - self.sq_distances(x) / (2.0 * logvar.exp()))

    @full_precision  # never in bf16/fp16 under --amp: densities reach -1e9 and the Gram distances cancel
    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = LSE_k log N_k(x), shape (N,)."""
        return torch.logsumexp(self.component_log_densities(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_density(x)
