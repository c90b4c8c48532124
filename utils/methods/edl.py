"""Evidential deep learning (Sensoy, Kaplan, Kandemir, NeurIPS 2018, arXiv 1806.01768), as CCU's EDL baseline.

CCU's version (docs/methods.md#edl; the original's `utils/edl.py`), with z the backbone's logits:

    alpha = ELU(z) + 2,   S = sum_k alpha_k,   p = alpha / S
    L = mean_i [ sum_k (onehot(y_i)_k - p_k)^2 + sum_k p_k (1 - p_k) / S ]        (no KL regulariser)

**[DIFF]** The paper's expected squared error has the variance term p_k (1 - p_k) / (S + 1) (the Dirichlet
variance), adds an annealed KL term towards the uniform Dirichlet, and uses ReLU evidence (alpha = ReLU(z) + 1).
CCU divides by S, has no KL term and uses ELU(z) + 2. The default follows CCU, the paper being reproduced;
`--edl-variance paper` selects the (S + 1) denominator.

The model is wrapped (`EDLModel`) so that it outputs log alpha. These are valid logits: softmax(log alpha) =
alpha / S = p, so every softmax-based metric, detector and attack of the project sees EDL's p, as CCU's wrapper
(which returns log p) makes them do; the loss recovers alpha = exp(output).
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.methods.base import FlagGroup, Method

EDL_VARIANCES = {"ccu": 0.0, "paper": 1.0}  # the variance term's denominator is S + this


def _add_edl(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--edl-variance", default="ccu", choices=list(EDL_VARIANCES),
                       help="EDL variance term p(1-p)/S as CCU's code, or /(S+1) as the EDL paper")


class EDLModel(nn.Module):
    """A backbone whose output is log alpha = log(ELU(z) + 2), z = backbone logits; forward = head(features).

    features(x) is the backbone's penultimate vector, so feature detectors (Mahalanobis, DDU) are unchanged.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.log(F.elu(self.base.head(features)) + 2.0)  # ELU >= -1, so alpha >= 1 and the log is safe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def wrap_edl(model: nn.Module, opts: Namespace, init: bool) -> EDLModel:
    """Backbone -> EDLModel (same structure at training start and when rebuilt from a run folder)."""
    return EDLModel(model)


def edl_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
             opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of sum_k (onehot - p)^2 + sum_k p (1 - p) / (S + c); c = 0 (CCU) or 1 (paper)."""
    variance = getattr(opts, "edl_variance", "ccu")
    if variance not in EDL_VARIANCES:
        raise ValueError(f"unknown --edl-variance {variance!r}; valid: {', '.join(EDL_VARIANCES)}")
    log_alpha = model(x)
    alpha = log_alpha.exp()
    strength = alpha.sum(dim=1)
    probs = alpha / strength[:, None]
    onehot = F.one_hot(y, num_classes=alpha.shape[1]).to(probs.dtype)
    error = ((onehot - probs) ** 2).sum(dim=1)
    spread = (probs * (1.0 - probs)).sum(dim=1) / (strength + EDL_VARIANCES[variance])
    return (error + spread).mean(), log_alpha


EDL = Method(loss=edl_loss, flags=(FlagGroup("evidential deep learning", _add_edl),), wrap_model=wrap_edl)

EDL_METHODS: dict[str, Method] = {"edl": EDL}
