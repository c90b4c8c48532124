"""The post-hoc detectors of 2021-2025 that OpenOOD and pytorch-ood ship, plus Mahalanobis++, for
`utils.detectors.DETECTORS` to merge (docs/methods.md#recent-post-hoc-detectors).

Each needs only the penultimate features z and logits of the shared forward pass, the last layer's (W, b) and
statistics of one pass over the training set, so all of them are gradient-free (`needs_grad = False`).
"""
from __future__ import annotations

from utils.detectors.base import Detector
from utils.detectors.gaussian_plus import RMDS, MahalanobisPlusPlus
from utils.detectors.gen import GEN
from utils.detectors.neighbours import KNN, NNGuide
from utils.detectors.shaping import ASH, ReAct, Scale
from utils.detectors.subspace import FDBD, ViM

RECENT_DETECTORS: dict[str, type[Detector]] = {
    "react": ReAct,
    "ash": ASH,
    "scale": Scale,
    "knn": KNN,
    "vim": ViM,
    "gen": GEN,
    "fdbd": FDBD,
    "nnguide": NNGuide,
    "mahalanobis++": MahalanobisPlusPlus,
    "rmds": RMDS,
}
