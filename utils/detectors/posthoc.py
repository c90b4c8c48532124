"""The input-gradient, feature-density and multi-pass detectors, for `utils.detectors.DETECTORS` to merge."""
from __future__ import annotations

from utils.detectors.base import Detector
from utils.detectors.bayes import Ensemble, MCDropout
from utils.detectors.edl import EDL
from utils.detectors.mahalanobis import Mahalanobis
from utils.detectors.odin import ODIN

POSTHOC_DETECTORS: dict[str, type[Detector]] = {
    "odin": ODIN,
    "mahalanobis": Mahalanobis,
    "mcdropout": MCDropout,
    "ensemble": Ensemble,
    "edl": EDL,
}
