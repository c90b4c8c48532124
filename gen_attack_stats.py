"""Worst-case confidence statistics of trained models.

Four studies, one per `--study`:
  ccu    CCU Table 1: adversarial noise inside CCU's certified balls, attacking every model of a table
         (`utils/studies/ccu.py`).
  alpha  The ACET paper's alpha-scaling experiment: how far uniform noise must be scaled before a model is
         99.9% confident, and how often clipped scaled noise is predicted with > 95% confidence
         (`utils/studies/alpha.py`).
  gauc   GOOD / ProoD's AUC, AAUC (under APGD + PGD) and GAUC (certified bounds) in an eps-ball around each OOD
         point, for every model of a table (`utils/studies/gauc.py`).
  audit  The far-away confidence audit: the exact limit of a ReLU network's confidence along rays
         alpha * d as alpha -> infinity (Theorem 3.1 of the ACET paper; `utils/limits.py`); with
         --detectors LIST the limit of each detector's score and its far_accept at 95% TPR.

gauc --detectors LIST attacks each detector's own score (AUC / AAUC; GAUC only for msp).

Each study adds its own flags; `python gen_attack_stats.py --study NAME --help` lists them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from utils import cli
from utils.amp import AMP_DTYPES, check_amp, default_amp, set_attack_amp
from utils.progress import add_progress_flag

# study name -> module that provides add_args(parser) and main(args)
STUDIES = {"ccu": "utils.studies.ccu", "alpha": "utils.studies.alpha", "audit": "utils.studies.audit",
           "gauc": "utils.studies.gauc"}


def get_args_parser(study: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), default=study)
    parser.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                        help="precision of the attack steps (default: bf16 on CUDA where supported, else off); "
                             "certificates, limits and reported confidences stay float32/float64")
    importlib.import_module(STUDIES[study]).add_args(parser)
    add_progress_flag(parser)
    cli.add_alias(parser, "--results", "--results-root", dest="results_root")
    cli.add_debug_flag(parser)
    return parser


def study_of(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--study", choices=sorted(STUDIES), default="ccu")
    return pre.parse_known_args(argv)[0].study


def run_study(args: argparse.Namespace) -> None:
    """Check the study's numbers (its RANGES), then run it."""
    study = importlib.import_module(STUDIES[args.study])
    cli.check_ranges(args, getattr(study, "RANGES", {}))
    torch.set_flush_denormal(True)  # denormal floats make CPU attacks and passes several times slower
    device = getattr(args, "device", "cpu")
    args.amp = args.amp or default_amp(device)
    check_amp(args.amp, device)
    set_attack_amp(args.amp)
    study.main(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run_study(get_args_parser(study_of(argv)).parse_args(argv))


if __name__ == "__main__":
    cli.run(run_study, get_args_parser(study_of(sys.argv[1:])))
