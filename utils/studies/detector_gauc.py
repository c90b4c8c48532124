"""`gen_attack_stats.py --study gauc --detectors LIST`: AUC and AAUC of each detector's OWN score.

The attack of the gauc study (APGD with restarts, then ProoD's monotone momentum PGD from its starts) maximises the
detector's score itself inside the clipped L-inf eps-ball around each OOD point, so AAUC is the AUROC of the
in-distribution scores against the highest score found per OOD point (never below its clean score: the clean point
is a candidate). Scores through top-k selections or percentiles (ASH, SCALE, KNN, NNGuide, GEN's top-M, fDBD's
argmax, ReAct's clip, Mahalanobis' min over classes) are differentiated by autograd, i.e. by their gradient where
the selection is locally constant, which exists almost everywhere (docs/methods.md). There is no certificate for
these scores, so their rows have no GAUC.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from utils.detectors.base import Detector, model_outputs

ATTACK = "apgd+prood_monotone_pgd on the detector's score"


class DetectorScore(nn.Module):
    """x -> (N, 1) detector score, differentiable in x: the "logits" the attacks of utils.attacks climb."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.network = detector.model  # a submodule, so utils.attacks.eval_mode reaches its layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.from_outputs(*model_outputs(self.network, x)).float()[:, None]


def check_attackable(name: str, detector: Detector) -> None:
    """A detector whose score is not a function of one forward pass (input preprocessing, sampling) is refused."""
    if detector.needs_grad or type(detector).from_outputs is Detector.from_outputs:
        raise ValueError(f"--study gauc --detectors: {name} needs input gradients or several passes, so its score "
                         f"cannot be attacked here; drop it from --detectors")


def check_attackable_names(names: list[str]) -> None:
    """The class-level check of `check_attackable` (needs_grad is a class attribute of ODIN and MC dropout)."""
    from utils.detectors import DETECTORS

    refused = [name for name in names if getattr(DETECTORS[name], "needs_grad", False) is True]
    if refused:
        raise ValueError(f"--study gauc --detectors: {', '.join(refused)} need input gradients or several passes, so "
                         f"their scores cannot be attacked here; drop them from --detectors")


def _score(out: torch.Tensor) -> torch.Tensor:
    return out[:, 0]


def worst_case_score(scorer: DetectorScore, x_seed: torch.Tensor, eps: float, args: argparse.Namespace,
                     generator: torch.Generator) -> torch.Tensor:
    """(N,) highest score found in the ball: the clean point, APGD with restarts and ProoD's monotone PGD runs."""
    from utils.attacks import _keep_best, apgd_maximize, monotone_pgd_run, prood_pgd_starts

    best_x, best = apgd_maximize(scorer, x_seed, _score, eps, args.apgd_steps, args.apgd_restarts,
                                 generator=generator)
    if args.pgd_steps > 0:
        for start in prood_pgd_starts(x_seed, eps, getattr(args, "pgd_restarts", 3), generator):
            run = monotone_pgd_run(scorer, x_seed, start, _score, eps, args.pgd_steps, args.pgd_step_size)
            best_x, best = _keep_best(best_x, best, run.x, run.score)
    return best.detach()


@torch.no_grad()
def clean_scores(scorer: DetectorScore, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([scorer(chunk)[:, 0].double().cpu() for chunk in x.split(batch_size)])


def ood_detector_scores(scorer: DetectorScore, x_out: torch.Tensor, eps: float, args: argparse.Namespace,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Clean and attacked scores (N,) float64 of the OOD points; attacked >= clean per point."""
    clean, attacked = [], []
    for x in x_out.split(args.batch_size):
        clean.append(clean_scores(scorer, x, args.batch_size))
        attacked.append(worst_case_score(scorer, x, eps, args, generator).double().cpu())
    clean, attacked = torch.cat(clean), torch.cat(attacked)
    return {"clean": clean, "attacked": torch.maximum(attacked, clean)}


def detector_rows(label: str, run_dir: Path, model: nn.Module, checkpoint: str, x_in: torch.Tensor,
                  y_in: torch.Tensor, oods: dict, eps: float, args: argparse.Namespace) -> list[dict]:
    """One row per (detector of --detectors other than msp, OOD set): AUC and AAUC in both tie conventions, of the
    run in run_dir loaded as `model` (its model.pt hash `checkpoint`)."""
    from utils import runs
    from utils.studies.detector_runs import fitted_detectors
    from utils.studies.auc_conventions import CONVENTIONS, auroc

    names = [name for name in args.detectors if name != "msp"]
    detectors = fitted_detectors(model, names, run_dir, args.dataset, runs.resolve_data_root(args.data_root),
                                 args.batch_size)
    with torch.no_grad():
        acc = 100 * float((model(x_in.to(args.device)).argmax(1).cpu() == y_in).double().mean())
    rows = []
    for name, detector in detectors.items():
        check_attackable(name, detector)
        scorer = DetectorScore(detector)
        conf_in = clean_scores(scorer, x_in.to(args.device), args.batch_size)
        generator = torch.Generator().manual_seed(args.seed)
        for ood, x_out in oods.items():
            scores = ood_detector_scores(scorer, x_out.to(args.device), eps, args, generator)
            row = {"study": "gauc", "dataset": args.dataset, "label": label, "run": str(run_dir),
                   "checkpoint": checkpoint, "detector": name, "ood": ood, "acc": acc,
                   "eps": eps, "precision": "float32", "attack": ATTACK, "n_ood": len(x_out), "n_test": len(y_in),
                   "apgd_steps": args.apgd_steps, "apgd_restarts": args.apgd_restarts, "pgd_steps": args.pgd_steps,
                   "pgd_step_size": args.pgd_step_size, "pgd_restarts": getattr(args, "pgd_restarts", 3),
                   "seed": args.seed, "mean_clean": float(scores["clean"].mean()),
                   "mean_attacked": float(scores["attacked"].mean()),
                   **{f"{kind}_{convention}": 100 * auroc(conf_in, scores[which], convention)
                      for convention in CONVENTIONS for kind, which in (("auc", "clean"), ("aauc", "attacked"))},
                   "git_sha": runs.git_sha(), "date": runs.now(), **getattr(args, "row_tags", {})}
            print(f"{label:>14s} {name:>14s} {ood:>15s}: AUC {row['auc_conservative']:.1f}  "
                  f"AAUC {row['aauc_conservative']:.1f} (conservative, attacking the detector's score)")
            rows.append(row)
    return rows
