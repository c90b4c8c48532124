"""Evidential-deep-learning scores (Sensoy et al., NeurIPS 2018, arXiv 1806.01768) of an `edl`-trained model."""
from __future__ import annotations

import math

import torch
from torch import nn

from utils.detectors.base import Detector
from utils.detectors.common import check_choice

EDL_SCORES = ("max_prob", "uncertainty")


class EDL(Detector):
    """Confidence of a Dirichlet output alpha, read from the logits of a model trained with `--method edl`.

    That model (`utils.methods.edl.EDLModel`) outputs log alpha, alpha = ELU(z) + 2, so alpha = exp(logits).
    * "max_prob": max_k alpha_k / S, S = sum_k alpha_k (CCU's EDL confidence; equal to the MSP of that model);
    * "uncertainty": -K / S, the negated Dirichlet uncertainty mass of the paper (higher S = more evidence).
    On a model not trained with EDL the formulas still run but alpha = exp(logits) has no evidential meaning.
    """

    returns_probability = True  # with score "max_prob" (per instance)

    def __init__(self, model: nn.Module, score: str = "max_prob") -> None:
        super().__init__(model)
        self.score = check_choice("EDL score", score, EDL_SCORES)
        self.returns_probability = self.score == "max_prob"

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        log_alpha = logits.double()
        if self.score == "max_prob":
            return log_alpha.softmax(dim=1).amax(dim=1)
        # -K / S = -exp(log K - logsumexp(log alpha)), without forming a large S
        return -torch.exp(math.log(logits.shape[1]) - torch.logsumexp(log_alpha, dim=1))
