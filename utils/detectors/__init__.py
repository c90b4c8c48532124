"""Post-hoc confidence scores: `DETECTORS[name](model, **options)`; higher confidence = more in-distribution."""
from __future__ import annotations

from utils.detectors.base import Detector
from utils.detectors.logit import MSP, Energy, Entropy, MaxLogit
from utils.detectors.ddu import DDU_DETECTORS
from utils.detectors.posthoc import POSTHOC_DETECTORS
from utils.detectors.recent import RECENT_DETECTORS

DETECTORS: dict[str, type[Detector]] = {
    "msp": MSP,
    "maxlogit": MaxLogit,
    "energy": Energy,
    "entropy": Entropy,
    **POSTHOC_DETECTORS,
    **DDU_DETECTORS,
    **RECENT_DETECTORS,
}


def get_detector_class(name: str) -> type[Detector]:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]
