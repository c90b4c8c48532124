"""CCU: a classifier combined with in- and out-distribution Gaussian mixtures in input space.

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), docs/methods.md#ccu-model. With lambda = e^{loglam} = p(o)/p(i):

    p(y|x) = [ p_hat(y|x) p(x|i) + (lambda/K) p(x|o) ] / [ p(x|i) + lambda p(x|o) ]

computed in log space:

    num_y = LSE( log p_hat(y|x) + log p(x|i),  loglam - log K + log p(x|o) )
    den   = LSE( log p(x|i),  loglam + log p(x|o) )
    log p(y|x) = num_y - den

CCUs (the original's RobustModel) fixes p(x|o) = 1, i.e. log p(x|o) = 0. Far from both mixtures, and when every
out-variance exceeds every in-variance, p(x|i)/p(x|o) -> 0 and p(y|x) -> 1/K.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from models.ccu_bound import ccu_confidence_upper_bound
from models.gmm import GMM, PCAMetric
from models.precision import full_precision


def infer_num_classes(base: nn.Module) -> int:
    """The classifier's K: `base.num_classes` if set, else the out_features of its last nn.Linear."""
    if isinstance(getattr(base, "num_classes", None), int):
        return base.num_classes
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot infer the number of classes of the base model; pass num_classes=")
    return linears[-1].out_features


class CCUModel(nn.Module):
    """CCU (ccus=False) or CCUs (ccus=True) around a backbone; `forward(x)` returns K log-probabilities.

    Submodules: `base` (the classifier, outputs logits), `gmm_in`, `gmm_out` (None for CCUs) and `metric`, the
    PCAMetric shared by both mixtures. `loglam` is a frozen buffer.

    Features/head contract: `features(x)` and `head(f)` delegate to the base network, so `head(features(x))`
    gives the BASE classifier's logits; the CCU output also needs the input itself (through the densities),
    so `forward(x) != head(features(x))` in general. Use `forward` (or `model(x)`) for CCU's probabilities,
    or `forward_with_features(x)` for both at once.
    """

    def __init__(self, base: nn.Module, gmm_in: GMM, gmm_out: GMM | None = None, metric: PCAMetric | None = None,
                 loglam: float = 0.0, ccus: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        metric = gmm_in.metric if metric is None else metric
        if gmm_in.metric is not metric or (gmm_out is not None and gmm_out.metric is not metric):
            raise ValueError("both mixtures must share the CCU model's PCAMetric object")
        if gmm_out is None and not ccus:
            raise ValueError("CCU needs an out-distribution mixture (gmm_out); CCUs (ccus=True) does not")
        self.base, self.gmm_in, self.gmm_out, self.metric = base, gmm_in, (None if ccus else gmm_out), metric
        self.ccus = ccus
        self.num_classes = infer_num_classes(base) if num_classes is None else num_classes
        self.register_buffer("loglam", torch.tensor(float(loglam)))

    @full_precision  # the densities and the output formula stay float32 under --amp (utils/amp.py)
    def log_densities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(x|i), log p(x|o)), each (N,); log p(x|o) = 0 for CCUs."""
        log_p_in = self.gmm_in.log_density(x)
        if self.ccus:
            return log_p_in, torch.zeros_like(log_p_in)
        return log_p_in, self.gmm_out.log_density(x)

    @full_precision
    def combine(self, logits: torch.Tensor, log_p_in: torch.Tensor, log_p_out: torch.Tensor) -> torch.Tensor:
        """The log-space formula of the module docstring: base logits and densities -> (N, K) log-probs.

        Evaluated through the log-ratio t = log p(x|i) - log(lambda p(x|o)) instead of num_y - den: the
        densities reach -1e9 far from the data, where float32 cannot resolve log K in num_y - den (the
        result would not even be normalised). Dividing numerator and denominator by the larger term,
            t < 0:   log p(y|x) = LSE(log p_hat_y + t, -log K) - softplus(t)
            t >= 0:  log p(y|x) = LSE(log p_hat_y, -t - log K) - softplus(-t)
        is the same quantity with every intermediate of order one.
        """
        log_probs_base = F.log_softmax(logits, dim=1)
        log_k = math.log(self.num_classes)
        ratio = (log_p_in - self.loglam.to(log_p_in.dtype) - log_p_out)[:, None]   # (N, 1)
        near_in = ratio >= 0
        t_neg, t_pos = torch.where(near_in, 0.0, ratio), torch.where(near_in, ratio, 0.0)
        far = torch.logaddexp(log_probs_base + t_neg, torch.full_like(t_neg, -log_k)) - F.softplus(t_neg)
        near = torch.logaddexp(log_probs_base, -t_pos - log_k) - F.softplus(-t_pos)
        return torch.where(near_in, near, far)

    def forward(self, x: torch.Tensor, return_densities: bool = False):
        """log p(y|x), shape (N, K); with return_densities also (log p(x|i), log p(x|o)).

        The keyword (rather than a separate method) lets a DDP-wrapped model return the densities through the
        wrapper's forward, which keeps gradient synchronisation intact.
        """
        log_p_in, log_p_out = self.log_densities(x)
        log_probs = self.combine(self.base(x), log_p_in, log_p_out)
        if return_densities:
            return log_probs, log_p_in, log_p_out
        return log_probs

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base penultimate features, CCU log-probabilities) from one pass (what evaluation's scorers use)."""
        features = self.base.features(x)
        return features, self.combine(self.base.head(features), *self.log_densities(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    @torch.no_grad()
    def confidence_upper_bound(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """(N,) float64 bound of the confidence over the clipped L-inf eps-ball around each x: CCU's certificate
        on the PCA-metric ball that contains the box (models.ccu_bound.ccu_confidence_upper_bound)."""
        return ccu_confidence_upper_bound(self, x, eps)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.base.head(features)

    def gmms(self) -> list[GMM]:
        return [self.gmm_in] if self.ccus else [self.gmm_in, self.gmm_out]


def build_ccu(base: nn.Module, dim: int, n_in: int, n_out: int, loglam: float = 0.0, ccus: bool = False,
              num_classes: int | None = None) -> CCUModel:
    """A CCU model with placeholder tensors of the right shapes (a checkpoint or `load_gmm_state` fills them)."""
    metric = PCAMetric(dim)
    gmm_out = None if ccus else GMM(metric, n_out)
    return CCUModel(base, GMM(metric, n_in), gmm_out, metric, loglam=loglam, ccus=ccus, num_classes=num_classes)


def load_gmm_state(model: CCUModel, state: dict) -> CCUModel:
    """Copy the tensors of a `gen_gmm.py` file (`{"metric": {V, s, mean}, "gmm_in": {mu, logvar, logweight},
    "gmm_out": {...}}`) into a CCU model built by `build_ccu` with matching shapes."""
    model.metric.load_state_dict(state["metric"])
    model.gmm_in.load_state_dict({**state["gmm_in"], **_prefixed(model.metric, "metric.")})
    if model.gmm_out is not None:
        model.gmm_out.load_state_dict({**state["gmm_out"], **_prefixed(model.metric, "metric.")})
    return model


def _prefixed(module: nn.Module, prefix: str) -> dict:
    return {prefix + k: v for k, v in module.state_dict().items()}
