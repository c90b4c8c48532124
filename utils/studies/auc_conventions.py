"""The two AUROC tie conventions of the gauc study: conservative (ties count against the model, as GOOD and
ProoD) and scikit-learn's (ties count 1/2). Shared by the study of certified models (gauc) and of detectors
(detector_gauc)."""
from __future__ import annotations

import numpy as np

CONVENTIONS = {"conservative": "conservative AUROC (ties count against the model, as GOOD / ProoD)",
               "sklearn": "scikit-learn AUROC (ties count 1/2)"}


def auroc_conservative(conf_in, conf_out) -> float:
    """Mean over all (in, out) pairs of [conf_out < conf_in]: ties count against the model."""
    from utils.metrics import _as_array

    scores_in, scores_out = _as_array(conf_in, "conf_in"), _as_array(conf_out, "conf_out")
    below = np.searchsorted(np.sort(scores_out), scores_in, side="left")  # out scores strictly below each in score
    return float(below.sum() / (scores_in.size * scores_out.size))


def auroc(conf_in, conf_out, convention: str) -> float:
    from utils import metrics

    return auroc_conservative(conf_in, conf_out) if convention == "conservative" else metrics.auroc(conf_in, conf_out)
