"""Per-sample confidences of several detectors of one model, from one forward pass per batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.detectors.base import Detector


def model_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of one forward pass.

    A model whose output is not head(features) (CCU: the GMMs enter the output) provides
    `forward_with_features(x)`; every other model composes its features and head.
    """
    if hasattr(model, "forward_with_features"):
        return model.forward_with_features(x)
    features = model.features(x)
    return features, model.head(features)


@dataclass
class SetScores:
    """What evaluation keeps of one dataset: confidences per detector key, and the model's predictions."""
    confidences: dict[str, torch.Tensor] = field(default_factory=dict)
    probs: torch.Tensor | None = None      # (N, K) predictive probabilities (MMC, accuracy, NLL, ECE)
    labels: torch.Tensor | None = None


def score_dataset(model: nn.Module | None, detectors: dict[str, Detector], dataset: Dataset, batch_size: int,
                  device: torch.device, desc: str = "", num_workers: int = 0, progress: bool = True) -> SetScores:
    """Run every detector on `dataset`; detectors without input gradients share one forward pass per batch.

    `model` is the network whose softmax gives the reported probabilities; for an ensemble it is None and the
    ensemble detector's `probs(x)` is used instead.
    """
    shared = {key: det for key, det in detectors.items() if not det.needs_grad}
    own = {key: det for key, det in detectors.items() if det.needs_grad}
    chunks: dict[str, list] = {key: [] for key in [*detectors, "__probs", "__labels"]}
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = x.to(device, non_blocking=True)
        with torch.no_grad():
            if model is not None:
                features, logits = model_outputs(model, x)
                chunks["__probs"].append(logits.softmax(dim=1).cpu())
                for key, det in shared.items():
                    chunks[key].append(det.from_outputs(features, logits).cpu())
            else:
                for key, det in shared.items():
                    chunks[key].append(det.confidence(x).cpu())
                chunks["__probs"].append(next(iter(detectors.values())).probs(x).cpu())
        for key, det in own.items():
            chunks[key].append(det.confidence(x).detach().cpu())
        chunks["__labels"].append(y)
    return SetScores(
        confidences={key: torch.cat(chunks[key]).double() for key in detectors},
        probs=torch.cat(chunks["__probs"]).double(), labels=torch.cat(chunks["__labels"]))
