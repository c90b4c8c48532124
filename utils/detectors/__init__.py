"""Post-hoc confidence scores: `DETECTORS[name](model, **options)`; higher confidence = more in-distribution."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn
from torch.utils.data import DataLoader, Dataset

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


def fitted_detector(name: str, loaded: Sequence[nn.Module], options: dict, train_set: Callable[[], Dataset],
                    batch_size: int) -> Detector:
    """Detector `name` with its options on the loaded run(s) (all of them for an ensemble, else the first), fitted
    on the run's un-augmented training split when it has training statistics to fit; `train_set()` is called only
    then, so a detector with nothing to fit never loads the training set."""
    cls = get_detector_class(name)
    detector = cls(loaded if cls.ensemble else loaded[0], **options)
    if type(detector).fit is not Detector.fit:
        detector.fit(DataLoader(train_set(), batch_size=batch_size))
    return detector
