"""ProoD's joint model (Meinke, Bitterwolf, Hein, NeurIPS 2022, arXiv 2106.04260): a classifier f and a
certified binary discriminator d (in vs out),

    p(y|x) = sigmoid(d(x)) softmax(f(x))_y + (1 - sigmoid(d(x))) / K,

computed in log space as logaddexp(log sigmoid(d) + log_softmax(f), log sigmoid(-d) - log K): `forward` returns
these log-probabilities (valid logits). Only d is bounded: with u_d the IBP upper bound of d over the clipped
eps-ball, max_y p(y|z) <= sigmoid(u_d) + (1 - sigmoid(u_d)) / K. d's last layer has only negative weights, so
d -> -infinity and the confidence -> 1/K far from the data. `bias_shift` (a buffer) is added to d at
evaluation, as the paper raises d's bias before it deploys the model (CIFAR-10: 3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.ibp import input_box, interval_bounds


class ProodModel(nn.Module):
    """ProoD around a classifier (any architecture) and a discriminator with one output (a GOOD CNN)."""

    def __init__(self, classifier: nn.Module, discriminator: nn.Module, bias_shift: float = 0.0,
                 freeze_classifier: bool = True) -> None:
        super().__init__()
        self.classifier, self.discriminator = classifier, discriminator
        self.num_classes = int(getattr(classifier, "num_classes", 0)) or None
        self.freeze_classifier = freeze_classifier
        self.register_buffer("bias_shift", torch.tensor(float(bias_shift)))
        if freeze_classifier:
            for param in classifier.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> "ProodModel":
        """A frozen classifier stays in eval mode: its batch-norm statistics must not drift while d trains."""
        super().train(mode)
        if self.freeze_classifier:
            self.classifier.eval()
        return self

    def discriminator_logit(self, x: torch.Tensor) -> torch.Tensor:
        """d(x) + bias_shift, (N,)."""
        return self.discriminator(x).squeeze(1) + self.bias_shift

    def combine(self, logits: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        in_part = F.logsigmoid(d)[:, None] + F.log_softmax(logits, dim=1)
        out_part = (F.logsigmoid(-d) - math.log(num_classes))[:, None]
        return torch.logaddexp(in_part, out_part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.classifier(x), self.discriminator_logit(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's features (detectors that read features see the classifier)."""
        return self.classifier.features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's head (the discriminator also needs the input: see forward_with_features)."""
        return self.classifier.head(features)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classifier features, ProoD log-probabilities) from one pass: the scores evaluation computes."""
        features = self.classifier.features(x)
        return features, self.combine(self.classifier.head(features), self.discriminator_logit(x))

    @torch.no_grad()
    def confidence_upper_bound(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """(N,) float64: sigmoid(u_d) + (1 - sigmoid(u_d)) / K, u_d bounded by IBP in float64 (models/ibp.py)."""
        _, upper = interval_bounds(self.discriminator, *input_box(x, eps, torch.float64))
        gate = torch.sigmoid(upper.squeeze(1) + self.bias_shift.double())
        return gate + (1.0 - gate) / self.num_classes
