"""A method is one file: train.py's flags, ranges and defaults come from `utils.methods.METHODS`; a new method
registered from a test trains through train.py. Detectors declare what evaluation needs to know about them."""
import json
from argparse import ArgumentParser, Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import models
import train
from model_paths import TableEntry
from utils import cli, evaluation
from utils.cli import POSITIVE
from utils.detectors import DETECTORS, get_detector_class
from utils.detectors.base import Detector
from utils.detectors.bayes import MCDropout
from utils.methods import METHODS, flag_groups, method_ranges
from utils.methods.base import FlagGroup, Method
from utils.methods.shared import ATTACK, OUT_DATA
from utils.studies.ccu_targets import EntryModel

# The resolved configurations of train.py before methods carried their own flags (main at c717c0c), without the
# keys that depend on the machine or are random: every method on digits, the methods with their own per-dataset
# defaults on MNIST and CIFAR-10, and two recipes. Changed since only where a default changed on purpose: GOOD's
# epochs on digits (60) and its arch / out-data elsewhere (good_cnn, natural_patches), utils.methods.certified.GOOD_PARAMS.
FIXTURE = Path(__file__).with_name("resolved_configs.json")
VOLATILE = ("run_id", "data_root", "device")
FAST = ["--epochs", "1", "--max-batches", "2", "--no-progress"]


def _resolved(case: str) -> dict:
    dataset, method, *extra = case.split()
    opts = train.resolve(train.get_args_parser().parse_args(["--dataset", dataset, "--method", method, *extra]))
    return json.loads(json.dumps({k: v for k, v in vars(opts).items() if k not in VOLATILE}, default=str))


def test_every_method_resolves_the_configuration_it_resolved_before_the_registry():
    before = json.loads(FIXTURE.read_text())
    assert {f"digits {name}" for name in METHODS} <= set(before["configs"])  # every method, on digits
    for case, config in before["configs"].items():
        assert _resolved(case) == config, case
    defaults = {k: v for k, v in train.parser_defaults().items() if k not in VOLATILE}
    assert json.loads(json.dumps(defaults)) == before["parser_defaults"]


def test_each_flag_group_declares_ranges_of_its_own_flags_only_and_out_methods_read_out_data():
    for group, users in flag_groups().items():
        parser = ArgumentParser()
        group.add(parser.add_argument_group(group.title))
        dests = {action.dest for action in parser._actions} - {"help"}
        assert set(group.ranges) <= dests, (group.title, set(group.ranges) - dests)
    for name, method in METHODS.items():
        assert (OUT_DATA in method.flags) == method.uses_out_data, name
    assert flag_groups()[ATTACK] == ["acet"] and len(flag_groups()[OUT_DATA]) >= 7
    assert method_ranges()["attack_steps"].contains(40) and not method_ranges()["gan_lr"].contains(0.0)


def test_help_has_one_group_per_flag_group_titled_with_its_methods():
    text = train.get_args_parser().format_help()
    assert "out-distribution (--method ceda, acet, oe, ccu, ccus, good, prood):" in text
    assert "confident-classifier GAN (--method gan):" in text
    assert "certified out-distribution training (--method good, prood):" in text


# ----------------------------------------------------------------------------------- a method from scratch

SEEN: list[float] = []


def toy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out, opts: Namespace):
    """A toy objective: the clean cross-entropy times `--toy-weight`, which it records."""
    SEEN.append(opts.toy_weight)
    logits = model(x)
    return opts.toy_weight * F.cross_entropy(logits, y), logits


def _add_toy(group) -> None:
    group.add_argument("--toy-weight", type=float, default=0.5, help="scale of the toy loss")


TOY = Method(loss=toy_loss, flags=(FlagGroup("toy objective", _add_toy, ranges={"toy_weight": POSITIVE}),))


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)  # the one registry line
    SEEN.clear()
    return TOY


def test_a_new_method_trains_through_train_py_with_its_own_flag_and_range(toy_method, tmp_path, capsys):
    assert "toy objective (--method toy):" in train.get_args_parser().format_help()
    argv = ["--dataset", "digits", "--method", "toy", "--runs-root", str(tmp_path), *FAST]
    run_dir = cli.run(train.main, train.get_args_parser(), [*argv, "--toy-weight", "2.5"])
    assert SEEN == [2.5, 2.5]  # both steps' losses read the flag
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "toy" and config["toy_weight"] == 2.5
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 1
    # resumed without the flag, the run keeps its saved value
    cli.run(train.main, train.get_args_parser(), [*argv, "--resume", "--epochs", "2"])
    assert SEEN == [2.5] * 4
    # its range is enforced before any folder is made, with one line and exit status 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, train.get_args_parser(), [*argv, "--toy-weight", "-1", "--name", "bad"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--toy-weight must be" in err and "got -1.0" in err
    assert not (tmp_path / "digits" / "bad").exists()


def test_a_method_that_is_not_registered_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'toy'; valid: .*acet.*plain"):
        train.resolve(Namespace(**{**train.parser_defaults(), "method": "toy"}))


# ----------------------------------------------------------------------------------- detectors

OPTIONS = {"mcdropout": {"samples": 3}, "knn": {"k": 5}, "nnguide": {"k": 5}}


class NaNFeatures(nn.Module):
    """A network whose penultimate features read as NaN while its logits are the real ones."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(self.net.features(x), float("nan"))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.head(features)

    def forward_with_features(self, x: torch.Tensor):
        return self.features(x), self.net(x)


def _confidence(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cls = get_detector_class(name)
    detector = cls([model, model] if cls.ensemble else model, **OPTIONS.get(name, {}))
    detector.fit([(x[:20], y[:20]), (x[20:], y[20:])])
    torch.manual_seed(3)
    return detector.confidence(x).detach().double()


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    net = models.build_model({"arch": "lenet", "num_classes": 4, "in_channels": 1, "input_size": 8, "dropout": 0.3})
    return net.eval()


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_each_detector_declares_truly_what_evaluation_needs(name, lenet):
    cls = DETECTORS[name]
    for attribute in ("tunable", "returns_probability", "needs_features", "ensemble", "needs_grad"):
        assert isinstance(getattr(cls, attribute), bool), (name, attribute)
    assert cls.tunable == callable(getattr(cls, "tune", None)), name
    torch.manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 4, (40,))
    real = _confidence(name, lenet, x, y)
    if cls.returns_probability:
        assert ((real >= 0) & (real <= 1)).all(), name
    try:
        blind = _confidence(name, NaNFeatures(lenet), x, y)
    except (RuntimeError, ValueError):  # a fit on NaN features may refuse them
        blind = None
    if cls.needs_features:  # unreadable features change (or stop) the scores
        assert blind is None or not torch.allclose(blind, real, atol=1e-6), name
    else:
        assert blind is not None and torch.allclose(blind, real, atol=1e-6), name


def test_detectors_whose_option_changes_what_they_return_say_so_per_instance(lenet):
    assert MCDropout(lenet, score="max_prob").returns_probability
    assert not MCDropout(lenet, score="variance").returns_probability
    assert not DETECTORS["ddu"](lenet, score="softmax_entropy").needs_features
    assert not DETECTORS["edl"](lenet, score="uncertainty").returns_probability


def test_ccu_table_reports_the_log_of_every_probability_confidence(lenet):
    """MC dropout's max-prob confidence is a probability: its MMC is the mean of p, not of exp(p)."""
    x = torch.rand(6, 1, 8, 8)
    for detector, log_space in ((MCDropout(lenet, samples=2, score="max_prob"), True),
                                (MCDropout(lenet, samples=2, score="variance"), False),
                                (DETECTORS["msp"](lenet), True), (DETECTORS["energy"](lenet), False)):
        entry = EntryModel(lenet, detector)
        assert entry.log_space == log_space
        if log_space:
            torch.manual_seed(4)
            p = detector.confidence(x).double()
            torch.manual_seed(4)
            torch.testing.assert_close(entry.score(x).double().exp(), p, rtol=1e-5, atol=1e-7)


class ToyTunable(Detector):
    """MSP scaled by a factor that `tune` picks: a tunable detector registered from a test."""

    tunable = True
    returns_probability = False
    calls: list[str] = []

    def __init__(self, model: nn.Module, scale: float = 1.0) -> None:
        super().__init__(model)
        self.scale = scale

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * logits.softmax(1).amax(1)

    def tune(self, loader_in, loader_out, criterion: str = "fpr95", fpr_convention: str = "id") -> dict:
        self.calls.append(criterion)
        self.scale = 2.0
        return {"scale": 2.0}


def test_a_new_tunable_detector_is_tuned_without_editing_evaluation(monkeypatch, lenet):
    monkeypatch.setitem(DETECTORS, "toy-tunable", ToyTunable)
    ToyTunable.calls.clear()
    sets = {"in": TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)),
            "uniform": TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))}
    args = Namespace(tune_ood="uniform", tune_criterion="auroc", batch_size=4, fpr_convention="id")
    entry = TableEntry("T", ("plain-s0",), "toy-tunable")
    detector, recorded = evaluation.build_detector(entry, [lenet], sets["in"], sets, args)
    assert ToyTunable.calls == ["auroc"] and detector.scale == 2.0
    assert recorded == {"tune_ood": "uniform", "tuned": {"scale": 2.0}}
    untuned, recorded = evaluation.build_detector(TableEntry("B", ("plain-s0",), "msp"), [lenet], sets["in"], sets,
                                                  args)
    assert recorded == {} and ToyTunable.calls == ["auroc"]
