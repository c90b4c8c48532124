"""`gen_attack_stats.py --study audit --detectors LIST`: the far-away audit for every detector.

Per (run, direction source, detector): the limit of the detector's score along each ray alpha * d
(`utils.studies.detector_limits`), checked against the score at alpha = --alpha-check, and `far_accept`, the
share of rays whose limit the detector accepts at its threshold for 95% true positives on the in-distribution test
set (+inf accepted, -inf rejected).
"""
from __future__ import annotations

import argparse
import math

import torch

from utils.detectors.base import Detector
from utils.studies.detector_limits import detector_limits, feature_rays, scores_at
from utils.studies.detector_runs import threshold_95


def agreement(limit: torch.Tensor, at_check: torch.Tensor, before: torch.Tensor, tol: float) -> torch.Tensor:
    """(N,) bool: the score at the largest alpha agrees with the limit. Finite limits: |limit - score| <=
    tol * max(1, |limit|); +inf: the score is positive and grew since alpha / 10; -inf: negative and fell."""
    finite = (limit - at_check).abs() <= tol * limit.abs().clamp_min(1.0)
    up = (at_check > 0) & (at_check > before)
    down = (at_check < 0) & (at_check < before)
    return torch.where(limit == math.inf, up, torch.where(limit == -math.inf, down, finite))


def detector_stats(name: str, detector: Detector, directions: torch.Tensor, result, conf_in: torch.Tensor,
                   args: argparse.Namespace) -> dict:
    """The row fields of one detector on one set of directions; `result` is the run's `LimitResult`."""
    at_check = scores_at(detector, directions, args.alpha_check, args.batch_size)
    if result.method == "exact":
        rays = feature_rays(detector.model, directions, result.alpha, args.batch_size)
        limit, exact = detector_limits(name, detector, rays)
        exact &= result.certified
    else:  # not piecewise affine: no rays to follow
        limit, exact = at_check.clone(), torch.zeros(len(directions), dtype=torch.bool)
    limit = torch.where(exact, limit, at_check)  # what cannot be derived is the score at the largest alpha
    threshold = threshold_95(conf_in)
    agrees = agreement(limit, at_check, scores_at(detector, directions, args.alpha_check / 10, args.batch_size),
                       args.agree_tol)[exact]
    finite = limit[torch.isfinite(limit)]

    def share(mask: torch.Tensor) -> float:
        return float(mask.double().mean()) if len(mask) else float("nan")

    return {"limit_kind": "exact" if bool(exact.all()) else "numeric", "n_numeric": int((~exact).sum()),
            "threshold_95": threshold, "far_accept": share(limit >= threshold),
            "numeric_far_accept": share(at_check >= threshold),
            "share_pos_inf": share(limit == math.inf), "share_neg_inf": share(limit == -math.inf),
            "limit_median_finite": float(finite.median()) if len(finite) else float("nan"),
            "limit_agreement": share(agrees)}


def detector_table(rows: list[dict]) -> str:
    """Markdown: one line per (label, run, source, detector) with a far_accept, newest row wins."""
    from utils.tables import markdown, newest_rows

    newest = newest_rows((row for row in rows if "far_accept" in row),
                         lambda row: (row["label"], row["run"], row["source"], row.get("detector") or "msp"))
    if not newest:
        return ""
    grid = [["Model", "Directions", "Detector", "Limit", "+inf (%)", "-inf (%)", "Median finite limit",
             "Threshold (95% TPR)", "far_accept (%)", "Agrees with alpha-check (%)"]]
    for (label, _, source, detector), r in newest.items():
        kind = r["limit_kind"] + (f" ({r['n_numeric']} of {r['n']} rays)" if r["limit_kind"] == "numeric" else "")
        grid.append([label, source, detector, kind, f"{100 * r['share_pos_inf']:.1f}", f"{100 * r['share_neg_inf']:.1f}",
                     f"{r['limit_median_finite']:.4g}", f"{r['threshold_95']:.4g}", f"{100 * r['far_accept']:.1f}",
                     "n/a" if math.isnan(r["limit_agreement"]) else f"{100 * r['limit_agreement']:.1f}"])
    return ("Far-away limits of the detectors' scores along alpha * d; far_accept: share of rays whose limit is "
            "accepted at the threshold that keeps 95% of the in-distribution test set.\n\n" + markdown(grid))
