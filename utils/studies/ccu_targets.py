"""The columns of CCU Table 1 (`gen_attack_stats.py --study ccu`): every table entry scored by its own detector.

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), docs/methods.md#mc-dropout and #ccu-attack-study. Each entry of `model_paths.MODEL_PATHS` becomes an
`EntryModel`: `forward(x)` gives the network's (log-)probabilities, from which the test error is taken, and

* `objective(x)` is the differentiable score the attack maximises inside CCU's certified ball;
* `score(x)` is the score the table reports (MMC, SR, AUC), computed by the entry's own detector.

The score is in log space for detectors whose confidence is a probability (MSP, ODIN, EDL, an ensemble's max
mean probability), so MMC = 100 * mean exp(score) is a mean confidence; for the others (MC-dropout variance,
Mahalanobis, DDU density, energy) the raw score enters the ranks (SR, AUC) and its exp(.) makes MMC meaningless,
as in the original. The objective equals the reported score except for ODIN, whose input preprocessing is left
out of the attack (the attack maximises the tempered MSP, log max softmax(f(x) / T)), and Mahalanobis with an
eps > 0 (the attack maximises -min_c distance without the preprocessing step). MC dropout keeps its dropout
active in both, as CCU's MCD model does: its objective is a fresh 10-pass estimate each call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from utils.detectors import fitted_detector
from utils.detectors.base import Detector, model_outputs
from utils.detectors.bayes import Ensemble, MCDropout, as_one_network, dropout_active, predictive_confidence
from utils.detectors.mahalanobis import Mahalanobis
from utils.detectors.odin import ODIN
from utils.evaluation import run_train_split


class EntryModel(nn.Module):
    """One column of Table 1: a network (or ensemble) with its entry's detector; see the module docstring."""

    def __init__(self, network: nn.Module, detector: Detector) -> None:
        super().__init__()
        self.network, self.detector = network, detector
        # a detector whose confidence is a probability: the table reports its log (CCU's log-confidence)
        self.log_space = detector.returns_probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.detector, MCDropout):   # the MC-averaged prediction
            return self._mc_probs(x).mean(0).clamp_min(1e-30).log()
        return self.network(x)

    def _mc_probs(self, x: torch.Tensor) -> torch.Tensor:
        with dropout_active(self.network):
            return torch.stack([self.network(x).softmax(dim=1) for _ in range(self.detector.samples)])

    def _to_log(self, score: torch.Tensor) -> torch.Tensor:
        return score.clamp_min(1e-300).log() if self.log_space else score

    def objective(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable score the attack maximises (N,)."""
        det = self.detector
        if isinstance(det, MCDropout):
            return predictive_confidence(self._mc_probs(x), det.score)
        if isinstance(det, ODIN):
            return F.log_softmax(self.network(x) / det.temperature, dim=1).amax(dim=1)
        if isinstance(det, Mahalanobis):
            return -det.distances(self.network.features(x)).amin(dim=1)
        if isinstance(det, Ensemble):
            return self._to_log(predictive_confidence(
                torch.stack([m(x).softmax(dim=1) for m in det.models]), det.score))
        return self._to_log(det.from_outputs(*model_outputs(self.network, x)))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The score the table reports, by the entry's own detector (N,), detached."""
        return self._to_log(self.detector.confidence(x).detach().double()).float()


def entry_model(dirs: Iterable[Path], detector: str, options: dict, dataset: str, data_root: str,
                device: str, batch_size: int = 500) -> EntryModel:
    """Load an entry's run(s), build its detector (fitted on the run's training split where it needs to be)."""
    from utils import methods  # noqa: PLC0415

    loaded = [methods.load_run(d, device=device) for d in dirs]
    options = {k: v for k, v in options.items() if k not in ("tune_ood", "tune_criterion")}
    config = getattr(loaded[0], "run_config", {})
    det = fitted_detector(detector, loaded, options, lambda: run_train_split(config, dataset, data_root), batch_size)
    network = as_one_network(loaded)
    return EntryModel(network, det).to(device).eval()
