"""Nearest-neighbour detectors on L2-normalised penultimate features: KNN and NNGuide.

The training bank is held in memory (N x F float32 on the model's device) and searched exactly by chunked matrix
products with a running top-k (`training_stats.topk_similarities`), instead of the originals' faiss flat index:
the same neighbours, no native dependency.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.detectors.training_stats import TrainStatsDetector, check_count, topk_similarities


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """z / ||z|| per row; an all-zero row (every ReLU dead) stays zero instead of the originals' 0 / 0 = NaN."""
    return F.normalize(features.float(), dim=1)


class NeighbourBank(TrainStatsDetector):
    """A bank of training features searched for each input's k most similar rows; subclasses say what the bank
    holds (`make_bank`) and how the neighbours' similarities become a confidence."""

    name = "neighbour"  # the detector's name in messages

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__(model)
        self.k = check_count(f"{self.name} k", k)
        self.bank: torch.Tensor | None = None

    def make_bank(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, features, logits, labels) -> None:
        if self.k > len(features):
            raise ValueError(f"{self.name} k = {self.k} exceeds the {len(features)} training features; "
                             "pass a smaller k")
        self.bank = self.make_bank(features, logits)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, k) cosine-type similarities of each input's k nearest bank rows, largest first."""
        self.check_fitted()
        return topk_similarities(unit_rows(features), self.bank.to(features.device), self.k)


class KNN(NeighbourBank):
    """Deep nearest neighbours (Sun, Ming, Zhu, Li; ICML 2022, arXiv 2204.06507):

        confidence(x) = -|| z/||z|| - z'_(k)/||z'_(k)|| ||_2,

    the Euclidean distance of the normalised feature to its k-th nearest normalised training feature (all
    training points; default k = 50, the paper's CIFAR setting). For unit vectors that distance is
    sqrt(2 - 2 s_(k)) with s_(k) the k-th largest cosine similarity, which is what is computed. The original code
    returns minus the SQUARED distance (faiss IndexFlatL2); the square root changes no ranking or metric.
    """

    name = "KNN"

    def __init__(self, model: nn.Module, k: int = 50) -> None:
        super().__init__(model, k)

    def make_bank(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return unit_rows(features)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        kth = self.similarities(features)[:, -1]
        return -(2.0 - 2.0 * kth).clamp_min(0.0).sqrt()


class NNGuide(NeighbourBank):
    """NNGuide (Park, Jung, Teoh; ICCV 2023, arXiv 2309.14888): the classifier's energy guided by its nearest
    neighbours in a bank of training features scaled by their own energy,

        bank_i = E(x_i) z_i/||z_i||,  E = logsumexp of the logits,
        confidence(x) = E(x) * mean of the k largest <z/||z||, bank_i>,

    default k = 100 (the paper's and OpenOOD's setting for ImageNet), over the whole training set (the paper and
    OpenOOD keep a random 1% of ImageNet's training set as the bank; on our data sets the whole set is small).
    """

    name = "NNGuide"

    def __init__(self, model: nn.Module, k: int = 100) -> None:
        super().__init__(model, k)

    def make_bank(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return unit_rows(features) * torch.logsumexp(logits, dim=1, keepdim=True)

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits.float(), dim=1) * self.similarities(features).mean(dim=1)
