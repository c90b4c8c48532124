"""Scores computed from one forward pass: the logits (and, for feature detectors, the penultimate features)."""
from __future__ import annotations

import torch

from utils.detectors.base import Detector


class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, arXiv 1610.02136): max_k softmax(f(x))_k.

    For the CCU model, whose outputs are log-probabilities, this is exactly CCU's confidence exp(log-conf).
    """

    returns_probability = True

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1).amax(dim=1)


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., arXiv 1911.11132): max_k f_k(x)."""

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.amax(dim=1)


class Energy(Detector):
    """Negative free energy (Liu et al., arXiv 2010.03759): T * logsumexp_k(f_k(x) / T).

    With T = 1 this is also DDU's "softmax density" score (m1 of the softmax model).
    """

    def __init__(self, model, temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = temperature

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.temperature * torch.logsumexp(logits / self.temperature, dim=1)


class Entropy(Detector):
    """Negated softmax entropy (natural log): -H(softmax(f(x))), so that higher means more in-distribution."""

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        log_probs = logits.log_softmax(dim=1)
        return (log_probs.exp() * log_probs).sum(dim=1)
