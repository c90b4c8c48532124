"""Code that used to be written twice now lives once (issue 20, "mend what is written twice or dead"): the
uncertainty scores of the toy study and of the detectors, the building and fitting of a table entry's detector,
and the detector helpers that ODIN, Mahalanobis, EDL, MC dropout and ensembles share."""
from __future__ import annotations

import ast
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import models
from model_paths import TableEntry
from utils import methods
from utils.checkpoints import save_checkpoint
from utils.detectors import bayes, fitted_detector
from utils.detectors.base import Detector
from utils.studies import toy

REPO = Path(__file__).resolve().parents[1]


def _probs(seed: int = 0, samples: int = 8, n: int = 50, classes: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n, classes, generator=generator, dtype=torch.float64).mul(2).softmax(-1)


def test_toy_scores_are_the_detector_scores_in_bits():
    """The toy study's uncertainties (bits, 1 - max, class-mean variance) and the detectors' confidences (nats,
    max, class-summed variance) are one computation: each pair differs by the unit and the sign only."""
    probs = _probs()
    classes = probs.shape[-1]
    torch.testing.assert_close(1.0 - toy.max_prob(probs), bayes.predictive_confidence(probs, "max_prob"))
    torch.testing.assert_close(toy.class_variance(probs) * classes, -bayes.predictive_confidence(probs, "variance"))
    # entropy and MI: bits = nats / ln 2; the eps inside the logs (1e-8 vs 1e-12) moves them by < 1e-7
    torch.testing.assert_close(toy.entropy(probs) * math.log(2), -bayes.predictive_confidence(probs, "entropy"),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(toy.mutual_information(probs) * math.log(2),
                               -bayes.predictive_confidence(probs, "mutual_info"), atol=1e-7, rtol=0)
    uniform = torch.full((3, 5, 4), 0.25)
    assert torch.allclose(bayes.entropy(uniform[0], bits=True), torch.full((5,), 2.0))
    assert torch.allclose(bayes.entropy(uniform[0]), torch.full((5,), math.log(4)))
    with pytest.raises(ValueError, match="valid: sum, mean"):
        bayes.class_variance(probs, reduce="max")


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_shared_detector_helpers_live_in_one_module():
    """Only ODIN's own code imports utils.detectors.odin; the shared helpers are defined once, in common.py."""
    detectors = sorted((REPO / "utils" / "detectors").glob("*.py"))
    importers = [p.name for p in detectors if "utils.detectors.odin" in _imports(p)]
    assert importers == ["posthoc.py"]                  # the registry of post-hoc detectors, for the class itself
    for name in ("check_choice", "model_device", "input_gradient", "step_direction", "perturb", "select_setting",
                 "sweep_loader"):
        defined = [p.name for p in detectors for node in ast.parse(p.read_text()).body
                   if isinstance(node, ast.FunctionDef) and node.name == name]
        assert defined == ["common.py"], (name, defined)


def test_dead_functions_are_gone():
    import utils.calibration

    assert not hasattr(utils.calibration, "fit_temperature_on_loader") and not hasattr(toy, "get_score")


class _Counting:
    """A train_set factory that counts its calls (fitted_detector must call it only for detectors that fit)."""

    def __init__(self, dataset) -> None:
        self.dataset, self.calls = dataset, 0

    def __call__(self):
        self.calls += 1
        return self.dataset


def _run(tmp_path: Path, name: str, seed: int) -> Path:
    config = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8], "dataset": "digits",
              "arch_kwargs": {"widths": [16]}, "seed": seed}
    torch.manual_seed(seed)
    folder = tmp_path / "digits" / name
    save_checkpoint(folder / "model.pt", {"model": models.build_model(config).state_dict(), "config": config,
                                                "epoch": 0})
    return folder


def test_one_builder_gives_evaluation_and_the_ccu_study_the_same_detector(tmp_path):
    import data
    from utils.evaluation import build_detector, run_train_split
    from utils.studies.ccu_targets import entry_model

    run = _run(tmp_path, "plain-s0", 0)
    loaded = [methods.load_run(run)]
    train = run_train_split(loaded[0].run_config, "digits", None)
    assert len(train) == len(data.get_dataset("digits", "train"))    # no validation part held out by this run
    counting = _Counting(train)
    msp = fitted_detector("msp", loaded, {}, counting, 100)
    assert counting.calls == 0 and type(msp).fit is Detector.fit    # nothing to fit: the set is never loaded
    maha = fitted_detector("mahalanobis", loaded, {}, counting, 100)
    assert counting.calls == 1

    args = Namespace(tune_ood=None, tune_criterion="fpr95", batch_size=100, fpr_convention="id")
    evaluated, recorded = build_detector(TableEntry("Maha", ("plain-s0",), "mahalanobis"), loaded, train, {}, args)
    column = entry_model([run], "mahalanobis", {"tune_ood": "uniform"}, "digits", None, "cpu", batch_size=100)
    x = data.get_dataset("digits", "test")[0][0][None]
    expected = maha.confidence(x)
    assert recorded == {} and float(expected) < 0                 # minus a squared distance
    torch.testing.assert_close(evaluated.confidence(x), expected)
    torch.testing.assert_close(column.detector.confidence(x), expected)

    members = loaded + [methods.load_run(_run(tmp_path, "plain-s1", 1))]
    ensemble = fitted_detector("ensemble", members, {}, counting, 100)
    assert ensemble.models == members and counting.calls == 1
