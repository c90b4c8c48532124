"""What the audit and gauc studies need to score a run with any detector: the `--detectors` flag, detectors
fitted on the run's own training split, and the in-distribution threshold at 95% true positives."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.detectors import DETECTORS, fitted_detector
from utils.detectors.base import Detector


def detector_list(text: str) -> list[str]:
    """argparse type of --detectors: a comma list of DETECTORS keys, each once."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    valid = sorted(name for name, cls in DETECTORS.items() if not cls.ensemble)  # the studies score one network
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown detector {unknown[0]!r}; valid: {', '.join(valid)}" if unknown
                                         else f"name at least one detector: {', '.join(valid)}")
    return names


def add_detectors_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--detectors", type=detector_list, default=None, metavar="LIST",
                        help=f"comma list of detectors whose {what} (default: msp only, today's rows)")


def fitted_detectors(model: nn.Module, names: list[str], run_dir: Path, dataset: str, data_root: str,
                     batch_size: int = 256) -> dict[str, Detector]:
    """Each detector with its default options, fitted on the run's own training split (as evaluate.py does)."""
    from utils.evaluation import run_train_split

    config_path = Path(run_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    train_set = run_train_split(config, dataset, data_root)  # one object: the detectors share one training pass
    return {name: fitted_detector(name, [model], {}, lambda: train_set, batch_size) for name in names}


def detector_scores(detector: Detector, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """detector.confidence on x in batches, float64 on the CPU."""
    device = next(detector.model.parameters()).device
    return torch.cat([detector.confidence(chunk.to(device)).double().cpu() for chunk in x.split(batch_size)])


def threshold_95(conf_in: torch.Tensor) -> float:
    """The score that keeps 95% of the in-distribution samples: their 5th percentile (linear interpolation), the
    threshold of `utils.metrics.fpr_at_95_tpr(..., convention="id")`."""
    return float(np.percentile(conf_in.double().numpy(), 5))
