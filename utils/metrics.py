"""The one set of metrics of the project.

Sign convention (used everywhere): a *confidence* is a per-sample score where HIGHER means MORE
IN-DISTRIBUTION. Every OOD metric takes `(conf_in, conf_out)` and treats the in-distribution as the positive
class, as scikit-learn's `roc_auc_score` does with label 1 for in-distribution samples.

All fractions are in [0, 1] (tables multiply by 100). Inputs may be numpy arrays, lists or tensors.
NaN or infinite scores and empty sets raise `ValueError` naming the problem instead of returning a number.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

FprConvention = Literal["id", "id_achievable", "ood"]
FPR_CONVENTIONS = {
    "id": "FPR@95%TPR(in): share of OOD samples with conf >= the 5th percentile (linear interpolation) of the "
          "in-distribution confidences (ACET's code; the Hein-lab papers' numbers)",
    "id_achievable": "FPR@95%TPR(in, achievable): share of OOD samples accepted at the highest observed threshold "
                     "keeping at least 95% of in-distribution samples",
    "ood": "FPR@95%TPR(out): share of in-distribution samples rejected when 95% of OOD samples are caught",
}


def _as_array(scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: the metrics need at least one score per set")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite scores out of {array.size}; "
                         "check the detector (e.g. a diverged model or a log of zero)")
    return array


def _labelled(conf_in, conf_out) -> tuple[np.ndarray, np.ndarray]:
    scores_in, scores_out = _as_array(conf_in, "conf_in"), _as_array(conf_out, "conf_out")
    labels = np.concatenate([np.ones(scores_in.size), np.zeros(scores_out.size)])
    return labels, np.concatenate([scores_in, scores_out])


def auroc(conf_in, conf_out) -> float:
    """Area under the ROC curve, in-distribution positive; ties count one half (constant scores give 0.5)."""
    labels, scores = _labelled(conf_in, conf_out)
    return float(roc_auc_score(labels, scores))


def aupr_in(conf_in, conf_out) -> float:
    """Average precision with the in-distribution as the positive class."""
    labels, scores = _labelled(conf_in, conf_out)
    return float(average_precision_score(labels, scores))


def aupr_out(conf_in, conf_out) -> float:
    """Average precision with the out-distribution as the positive class (scores negated)."""
    labels, scores = _labelled(conf_in, conf_out)
    return float(average_precision_score(1 - labels, -scores))


def fpr_at_95_tpr(conf_in, conf_out, convention: FprConvention = "id") -> float:
    """False-positive rate at 95% true-positive rate, under a named convention.

    "id" (ACET's evaluation code, Hein et al. 2019, arXiv 1812.05720; the default): tau = the 5th percentile of
    conf_in with linear interpolation (`np.percentile(conf_in, 5)`), FPR = #(conf_out >= tau) / N_out. tau may
    lie between two in-distribution scores, so the TPR it implies need not be a ROC point.
    "id_achievable": positives are in-distribution samples, accepted when conf >= threshold; the share of OOD
    samples accepted at the highest observed threshold that keeps at least 95% of the in-distribution samples.
    "ood" (OpenOOD, pytorch-ood): positives are OOD samples, caught when conf <= threshold; the share of
    in-distribution samples caught at the lowest threshold that catches at least 95% of the OOD samples.
    Ties at the threshold are accepted (resp. caught) together.

    For the last two the ROC curve comes from scikit-learn; the ROC point is the first one whose TPR reaches
    0.95 (sklearn's points are exactly the achievable thresholds, so no interpolation is involved).
    """
    if convention not in FPR_CONVENTIONS:
        raise ValueError(f"unknown FPR convention {convention!r}; valid: {', '.join(FPR_CONVENTIONS)}")
    if convention == "id":
        scores_in, scores_out = _as_array(conf_in, "conf_in"), _as_array(conf_out, "conf_out")
        tau = np.percentile(scores_in, 5)  # numpy's default method is linear interpolation
        return float(np.mean(scores_out >= tau))
    labels, scores = _labelled(conf_in, conf_out)
    if convention == "ood":
        labels, scores = 1 - labels, -scores
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95 - 1e-12, side="left")])


def detection_error(conf_in, conf_out) -> float:
    """min over thresholds of 0.5 * P(in rejected) + 0.5 * P(out accepted) (ODIN's detection error)."""
    labels, scores = _labelled(conf_in, conf_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def ood_metrics(conf_in, conf_out, fpr_convention: FprConvention = "id") -> dict[str, float]:
    """All OOD-detection metrics of one (in, out) pair: auroc, aupr_in, aupr_out, fpr95, detection_error."""
    labels, scores = _labelled(conf_in, conf_out)  # validates once; the helpers below re-validate cheaply
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(labels, scores)),
        "aupr_out": float(average_precision_score(1 - labels, -scores)),
        "fpr95": fpr_at_95_tpr(conf_in, conf_out, fpr_convention),
        "detection_error": detection_error(conf_in, conf_out),
    }


def _as_probs(probs) -> torch.Tensor:
    probs = torch.as_tensor(probs).detach().double()
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities of shape (N>0, K), got {tuple(probs.shape)}")
    if not torch.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or infinite values")
    return probs


def mmc(probs) -> float:
    """Mean maximal confidence: mean over samples of max_k p_k (a fraction; tables show x100).

    Accepts (N, K) probabilities or an (N,) vector of already-maximal confidences.
    """
    probs = torch.as_tensor(probs).detach().double()
    conf = probs if probs.ndim == 1 else _as_probs(probs).max(dim=1).values
    return float(_as_array(conf, "confidences").mean())


def accuracy(probs_or_logits, labels) -> float:
    scores, labels = _as_probs(probs_or_logits), torch.as_tensor(labels).cpu()
    return float((scores.argmax(dim=1) == labels).double().mean())


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels under the predicted probabilities."""
    probs, labels = _as_probs(probs), torch.as_tensor(labels).cpu().long()
    return float(-torch.log(probs.gather(1, labels[:, None]).clamp_min(eps)).mean())


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error with `n_bins` equal-width bins of the max confidence.

    Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin (the DDU
    original would index bin -1). ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|.
    """
    probs, labels = _as_probs(probs), torch.as_tensor(labels).cpu().long()
    conf, pred = probs.max(dim=1)
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    correct = (pred == labels).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - correct_sum).abs().sum() / conf.numel())
