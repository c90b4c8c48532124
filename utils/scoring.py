"""Per-sample confidences of several detectors of one model, from one forward pass per batch."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils.amp import autocast
from utils.detectors.base import Detector, model_outputs
from utils.detectors.bayes import predictive_confidence, tempered_probs
from utils.progress import bar


@dataclass
class SetScores:
    """What evaluation keeps of one dataset: confidences per detector key (and, where a temperature was given,
    the same detector on tempered logits), and the model's predictive probabilities."""
    confidences: dict[str, torch.Tensor] = field(default_factory=dict)
    tempered: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None     # (N, K), None for ensembles
    probs: torch.Tensor | None = None      # (N, K) predictive probabilities (MMC, accuracy, NLL, ECE)
    tempered_probs: torch.Tensor | None = None  # (N, K) an ensemble's mean of per-member tempered softmaxes
    labels: torch.Tensor | None = None


def _batch_scores(model, detectors: dict[str, Detector], temperatures: dict[str, float], x: torch.Tensor,
                  out: dict[str, list], amp: str = "off") -> None:
    shared = {key: det for key, det in detectors.items() if not det.needs_grad}
    with torch.no_grad():
        if model is not None:
            with autocast(x.device, amp):  # "off" by default: the metrics' scores come from float32 logits
                features, logits = model_outputs(model, x)
            features, logits = features.float(), logits.float()
            out["__logits"].append(logits.cpu())
            out["__probs"].append(logits.softmax(dim=1).cpu())
            for key, det in shared.items():
                out[key].append(det.from_outputs(features, logits).cpu())
                if key in temperatures:
                    out["t|" + key].append(det.from_outputs(features, logits / temperatures[key]).cpu())
        else:  # an ensemble: its members' softmaxes give both its score and the predictive probabilities
            (key, ensemble), = detectors.items()
            member_logits = ensemble.member_logits(x)
            member_probs = tempered_probs(member_logits)
            out[key].append(predictive_confidence(member_probs, ensemble.score).cpu())
            out["__probs"].append(member_probs.mean(dim=0).cpu())
            if key in temperatures:  # one temperature per member, on the same logits
                member_probs = tempered_probs(member_logits, temperatures[key])
                out["t|" + key].append(predictive_confidence(member_probs, ensemble.score).cpu())
                out["t|__probs"].append(member_probs.mean(dim=0).cpu())
            return
    for key, det in detectors.items():
        if det.needs_grad:
            out[key].append(det.confidence(x).detach().cpu())


def score_dataset(model: nn.Module | None, detectors: dict[str, Detector], dataset: Dataset, batch_size: int,
                  device: torch.device, desc: str = "", num_workers: int = 0, progress: bool | None = None,
                  temperatures: dict[str, float] | None = None, amp: str = "off") -> SetScores:
    """Run every detector on `dataset`; detectors without input gradients share one forward pass per batch.

    `model` is the network whose softmax gives the reported probabilities; for an ensemble it is None and
    `detectors` holds the one ensemble detector. `temperatures` (detector key -> T) also scores those
    logit/feature detectors on logits / T (temperature scaling, DDU's t_* metrics) from the same pass; for an
    ensemble T is a list, one temperature per member.
    `amp` (utils/amp.py) runs the shared pass in bf16/fp16 (evaluate.py --amp-scores); the default "off"
    keeps the scores float32, since bf16 logits tie confidences near 1 and move AUROC / FPR.
    """
    temperatures = temperatures or {}
    out: dict[str, list] = defaultdict(list)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    for x, y in bar(loader, progress, desc=desc, leave=False):
        _batch_scores(model, detectors, temperatures, x.to(device, non_blocking=True), out, amp)
        out["__labels"].append(y)
    cat = lambda key: torch.cat(out[key]).double() if out[key] else None  # noqa: E731
    return SetScores(confidences={key: cat(key) for key in detectors},
                     tempered={key: cat("t|" + key) for key in detectors if out["t|" + key]},
                     logits=cat("__logits"), probs=cat("__probs"), tempered_probs=cat("t|__probs"),
                     labels=torch.cat(out["__labels"]))
