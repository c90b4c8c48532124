"""Bring your own model: a network defined here (not in models/), trained for seconds on digits, scored, attacked,
audited and certified through the CLI (`--model tests/test_byom.py:build_net`) and from Python."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

import data
import evaluate
import gen_attack_stats
from tests.conftest import ROOT
from utils import cli
from utils.detectors import DETECTORS
from utils.ibp import UnsupportedLayerError, confidence_upper_bound

FAST = ["--ood", "uniform", "--n-ood", "200", "--no-progress", "--no-print", "--seed", "0"]
NET = "tests/test_byom.py:build_net"


class DigitsNet(nn.Module):
    """A ReLU chain with names of its own and functional calls: no features()/head(), no models/ base class."""

    def __init__(self, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.hidden_a = nn.Linear(64, hidden)
        self.hidden_b = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden_b(F.relu(self.hidden_a(x.view(x.size(0), -1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.penultimate(x))


def build_net() -> nn.Module:
    return DigitsNet()


def build_three_classes() -> nn.Module:
    return DigitsNet(classes=3)


def build_tanh() -> nn.Module:
    class TanhNet(DigitsNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.tanh(self.hidden_b(F.relu(self.hidden_a(x.flatten(1))))))

    return TanhNet()


def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = data.get_dataset("digits", split)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    return x, y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(network, weights file): full-batch Adam on digits for 150 steps (about a second)."""
    torch.manual_seed(0)
    net = build_net()
    x, y = digits_tensors("train")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("byom") / "net.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def rows_of(results, dataset="digits"):
    [path] = (results / "ood").glob(f"{dataset}_adhoc_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(rows):
    return [{k: v for k, v in row.items() if k != "date"} for row in rows]


def test_cli_and_python_give_equal_rows_and_msp_auroc_is_sklearns(trained, tmp_path, monkeypatch):
    net, weights = trained
    monkeypatch.chdir(ROOT)
    argv = [*FAST, "--dataset", "digits", "--model", NET, "--weights", str(weights), "--name", "mine",
            "--detectors", "msp,mahalanobis,vim", "--adv-sets", "adv_noise", "--n-adv", "40", "--attack-steps", "5",
            "--results-root", str(tmp_path / "cli")]
    evaluate.main(evaluate.get_args_parser().parse_args(argv))
    cli_rows = rows_of(tmp_path / "cli")
    py_rows = evaluate.evaluate_model(build_loaded(weights), "digits", ood=["uniform"], n_ood=200,
                                      detectors=["msp", "mahalanobis", "vim"], adv_sets=["adv_noise"], n_adv=40,
                                      attack_steps=5, name="mine", results_root=str(tmp_path / "py"), progress=False)
    assert len(cli_rows) == 6 and comparable(cli_rows) == comparable(py_rows) == comparable(rows_of(tmp_path / "py"))
    assert {row["label"] for row in cli_rows} == {"mine:msp", "mine:mahalanobis", "mine:vim"}
    assert cli_rows[0]["accuracy"] > 0.9  # trained, not chance
    # MSP AUROC is scikit-learn's on the network's own softmax (in = positive class)
    x_in, _ = digits_tensors("test")
    x_out = next(iter(torch.utils.data.DataLoader(
        data.get_dataset("uniform", "test", like="digits", n=200, seed=0), batch_size=200)))[0]
    with torch.no_grad():
        conf = torch.cat([net(x_in), net(x_out)]).softmax(1).amax(1).numpy()
    expected = roc_auc_score(np.r_[np.ones(len(x_in)), np.zeros(len(x_out))], conf)
    [msp] = [r for r in cli_rows if r["label"] == "mine:msp" and r["ood"] == "uniform"]
    assert msp["auroc"] == pytest.approx(expected, abs=1e-12)


def build_loaded(weights):
    net = build_net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net


def test_hooked_features_are_the_penultimate_activations_and_detectors_take_any_network(trained):
    net, _ = trained
    x, y = digits_tensors("test")
    detector = DETECTORS["mahalanobis"](net)
    with torch.no_grad():
        assert torch.equal(detector.model.features(x), net.penultimate(x))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=200)
    detector.fit(loader)

    class Contract(nn.Module):  # the hand-written adapter a user needed before: the same scores
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return net(x)

        def features(self, x):
            return net.penultimate(x)

        def head(self, z):
            return net.classifier(z)

    reference = DETECTORS["mahalanobis"](Contract()).fit(loader)
    assert torch.allclose(detector(x[:50]), reference(x[:50]), rtol=1e-6, atol=1e-6)
    assert torch.equal(DETECTORS["msp"](net)(x[:5]), net(x[:5]).softmax(1).amax(1))


def test_a_named_features_layer_and_an_unknown_one(trained):
    net, _ = trained
    x, _ = digits_tensors("test")
    from models.hooked import with_features

    hooked = with_features(net, "hidden_a")
    assert torch.equal(hooked.features(x[:4]), net.hidden_a(x[:4].flatten(1)))
    with pytest.raises(ValueError, match=r"not its last nn.Linear \('classifier'\) applied to its features \(the "
                                         r"output of 'hidden_a'\)"):
        hooked.head(hooked.features(x[:4]))
    with pytest.raises(ValueError, match="'nope' is not a module of DigitsNet; valid: hidden_a, hidden_b"):
        with_features(net, "nope")


def test_an_unsupported_operation_is_refused_by_the_bound_naming_it():
    with pytest.raises(UnsupportedLayerError, match=r"TanhNet: cannot bound function tanh"):
        confidence_upper_bound(build_tanh().eval(), torch.rand(3, 1, 8, 8), 0.1)


def gen(argv):
    gen_attack_stats.run_study(gen_attack_stats.get_args_parser(argv[1]).parse_args(argv))


def test_gauc_bound_of_the_external_relu_chain_holds_under_the_studys_attacks(trained, tmp_path, monkeypatch):
    net, weights = trained
    monkeypatch.chdir(ROOT)
    gen(["--study", "gauc", "--dataset", "digits", "--model", NET, "--weights", str(weights), "--eps", "0.01",
         "--ood", "uniform", "--n-ood", "30", "--n-test", "100", "--apgd-steps", "20", "--apgd-restarts", "1",
         "--pgd-steps", "20", "--pgd-restarts", "0", "--results-root", str(tmp_path), "--no-progress"])
    [row] = [json.loads(line) for line in (tmp_path / "attacks" / "digits_gauc.jsonl").read_text().splitlines()]
    assert row["label"] == "test_byom:build_net" and row["mean_bound"] < 1  # a certificate, not "none"
    assert row["gauc_conservative"] <= row["aauc_conservative"] <= row["auc_conservative"]
    # per point: the bound is at least the confidence the study's attacks reach
    from utils.studies.gauc import ood_scores

    args = gen_attack_stats.get_args_parser("gauc").parse_args(
        ["--apgd-steps", "20", "--apgd-restarts", "1", "--pgd-steps", "20", "--pgd-restarts", "0"])
    x_out = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scores = ood_scores(net, x_out, 0.01, args, torch.Generator().manual_seed(0))
    assert (scores["bound"] >= scores["attacked"] - 1e-6).all() and (scores["bound"] < 1).any()
    assert (scores["attacked"] > scores["clean"]).any()  # the attacks moved something


def test_audit_of_the_external_network_through_the_cli(trained, tmp_path, monkeypatch):
    _, weights = trained
    monkeypatch.chdir(ROOT)
    gen(["--study", "audit", "--dataset", "digits", "--model", NET, "--weights", str(weights), "--name", "mine",
         "--n-directions", "50", "--sources", "gaussian", "--results-root", str(tmp_path), "--no-progress"])
    [row] = [json.loads(line) for line in (tmp_path / "attacks" / "digits_audit.jsonl").read_text().splitlines()]
    assert row["label"] == "mine" and row["method"] == "exact" and row["agreement"] == 1.0
    assert 0.1 <= row["q50"] <= 1.0 and row["n"] == 50


@pytest.mark.parametrize("model, weights, message", [
    ("tests/nothere.py:build_net", "{w}", "tests/nothere.py is not a Python file"),
    ("tests/test_byom.py:nothing", "{w}", "defines no callable 'nothing'; callables defined there: "),
    ("tests/test_byom.py:digits_tensors", "{w}", "digits_tensors() of tests/test_byom.py raised TypeError"),
    ("tests/test_byom.py:build_three_classes", "{w}", "classifier.weight has shape (10, 32), the network of "
                                                      "--model wants (3, 32)"),
    ("tests/test_byom.py:build_net", "{bad_keys}", "does not fit the network of --model: missing hidden_a.weight"),
    ("tests/test_byom.py:build_three_classes", "{three}", "expected logits of shape (1, 10) (digits has 10 classes)"),
    ("tests/test_byom.py:build_net", "{pickled}", "is not a state_dict torch.load(..., weights_only=True) can read"),
])
def test_every_check_is_one_line_and_exit_2(trained, tmp_path, monkeypatch, capsys, model, weights, message):
    _, good = trained
    three = tmp_path / "three.pt"
    torch.save(build_three_classes().state_dict(), three)
    bad_keys = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(2)}, bad_keys)
    pickled = tmp_path / "pickled.pt"
    torch.save({"net": build_net()}, pickled)  # a whole pickled module: refused, never unpickled
    path = weights.format(w=good, bad_keys=bad_keys, three=three, pickled=pickled)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:  # what `python evaluate.py ...` runs (utils.cli.run)
        cli.run(evaluate.main, evaluate.get_args_parser(), [*FAST, "--dataset", "digits", "--model", model,
                                                            "--weights", path, "--results-root", str(tmp_path / "r")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "r" / "ood").exists()  # nothing scored or written


def test_model_flags_without_model_and_model_with_runs_are_refused(trained, tmp_path, monkeypatch, capsys):
    _, weights = trained
    monkeypatch.chdir(ROOT)
    for argv, message in ([["--weights", str(weights)], "--weights applies to a network given with --model"],
                          [["--model", NET], "--model needs --weights W.pt"],
                          [["--model", NET, "--weights", str(weights), "--runs", "x"], "--model and --runs"],
                          [["--model", NET, "--weights", str(weights), "--features-layer", "fc"],
                           "'fc' is not a module of DigitsNet"]):
        with pytest.raises(SystemExit):
            cli.run(evaluate.main, evaluate.get_args_parser(), [*FAST, "--dataset", "digits", *argv,
                                                                "--results-root", str(tmp_path)])
        assert message in capsys.readouterr().err


def test_a_features_submodule_is_not_the_contract():
    """torchvision's VGG has `features` (a submodule giving conv maps) and no head: it gets features by hook."""

    class VGGLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    net = VGGLike().eval()
    x = torch.rand(4, 1, 8, 8)
    detector = DETECTORS["vim"](net)
    with torch.no_grad():
        assert torch.equal(detector.model.features(x), net.classifier[1](net.classifier[0](net.features(x))))
        assert torch.equal(detector.model.head(detector.model.features(x)), net(x))
