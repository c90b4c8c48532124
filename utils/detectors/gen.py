"""GEN: generalised entropy of the softmax (Liu, Lochman, Zach; CVPR 2023; no arXiv version, CVPR open access)."""
from __future__ import annotations

import torch
from torch import nn

from utils.detectors.base import Detector
from utils.detectors.training_stats import check_count, check_in


class GEN(Detector):
    """GEN (Liu, Lochman, Zach; "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
    CVPR 2023): minus the generalised (Tsallis-like) entropy of the M largest softmax probabilities,

        confidence(x) = -sum_{j in top-M} p_j^g (1 - p_j)^g,  p = softmax(logits),

    default g = 0.1 and M = K (all classes; the paper's M = 100 is for ImageNet's 1000). Needs only the logits.
    """

    def __init__(self, model: nn.Module, g: float = 0.1, M: int | None = None) -> None:
        super().__init__(model)
        self.g = check_in("GEN g", g, 1e-12, float("inf"))
        self.M = None if M is None else check_count("GEN M", M)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.double().softmax(dim=1)
        top = probs.topk(min(self.M or probs.shape[1], probs.shape[1]), dim=1).values
        return -(top.pow(self.g) * (1.0 - top).pow(self.g)).sum(dim=1).to(logits.dtype)
