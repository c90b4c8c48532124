"""Detectors far away and under attack: the exact far-away limits of every detector (audit --detectors), each
detector's own score attacked (gauc --detectors) and reproduce.py detector-stress at the tiny budget."""
import argparse
import json
import math

import pytest
import torch
from torch import nn

import data
import models
from utils import limits
from utils.checkpoints import save_checkpoint
from utils.detectors import DETECTORS
from utils.studies import audit, detector_stress
from utils.studies.detector_gauc import DetectorScore, ood_detector_scores
from utils.studies.detector_limits import RULES, detector_limits, feature_rays

CONFIG = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8],
          "arch_kwargs": {"widths": [32, 32]}, "dataset": "digits", "seed": 0}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A plain MLP trained on digits to ~90% test accuracy (about a second), saved as a run folder."""
    torch.manual_seed(0)
    train = data.get_dataset("digits", "train")
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=len(train))))
    model = models.build_model(CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    run_dir = tmp_path_factory.mktemp("runs") / "digits" / "plain-s0"
    save_checkpoint(run_dir / "model.pt", {"model": model.state_dict(), "config": CONFIG, "epoch": 1})
    (run_dir / "config.json").write_text(json.dumps(CONFIG))
    return run_dir, model.eval()


def _audit_rows(run_dir, results, names):
    parser = argparse.ArgumentParser()
    audit.add_args(parser)
    audit.main(parser.parse_args(["--runs", str(run_dir), "--dataset", "digits", "--n-directions", "40",
                                  "--sources", "noise", "gaussian", "--detectors", ",".join(names),
                                  "--results-root", str(results), "--device", "cpu", "--batch-size", "64"]))
    return [json.loads(line) for line in (results / "attacks/digits_audit.jsonl").read_text().splitlines()]


def test_audit_limits_agree_with_the_numeric_check_and_theory(plain_run, tmp_path):
    run_dir, _ = plain_run
    names = list(RULES)
    rows = _audit_rows(run_dir, tmp_path, names)
    msp_rows = [row for row in rows if "detector" not in row]
    assert len(msp_rows) == 2 and all(row["method"] == "exact" and row["far_accept"] >= 0 for row in msp_rows)
    by = {(row.get("detector") or "msp", row["source"]): row for row in rows}
    assert len(by) == 2 * len(names)
    for (name, source), row in by.items():
        if row["n_numeric"] < row["n"]:  # every exactly derived limit agrees with the score at alpha = 1e6
            assert row["limit_agreement"] == 1.0, (name, source)
        assert 0.0 <= row["far_accept"] <= 1.0
    for source in ("noise", "gaussian"):
        # theory: the max-softmax limit is 1 (or a tie) and energy -> +inf; Mahalanobis distances grow like a^2
        assert by[("msp", source)]["far_accept"] >= 0.9 and by[("energy", source)]["far_accept"] >= 0.9
        assert by[("energy", source)]["share_pos_inf"] >= 0.9
        assert by[("mahalanobis", source)]["far_accept"] == 0.0
        assert by[("mahalanobis", source)]["share_neg_inf"] == 1.0
        # the quadratic terms of RMDS differ clearly; they are no tie (a scale of max|pinv| |v|^2 called them so)
        assert by[("rmds", source)]["limit_kind"] == "exact"
        for name in ("knn", "mahalanobis++", "fdbd"):  # normalised / ratio scores have finite limits
            assert by[(name, source)]["share_pos_inf"] == by[(name, source)]["share_neg_inf"] == 0.0
    table = (tmp_path / "tables/digits_audit.md").read_text()
    assert "| plain-s0 | noise | mahalanobis | exact |" in table
    # the default (msp only) leaves today's row fields untouched
    parser = argparse.ArgumentParser()
    audit.add_args(parser)
    audit.main(parser.parse_args(["--runs", str(run_dir), "--dataset", "digits", "--n-directions", "10",
                                  "--sources", "noise", "--results-root", str(tmp_path / "plain"), "--device", "cpu"]))
    row = json.loads((tmp_path / "plain/attacks/digits_audit.jsonl").read_text())
    assert "far_accept" not in row and "detector" not in row and row["agreement"] == 1.0


class Affine(nn.Module):
    """features = the input itself, head = Linear(W, b): rays are z(a) = a d exactly."""

    def __init__(self, weight, bias) -> None:
        super().__init__()
        self.fc = nn.Linear(len(weight[0]), len(weight))
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight))
            self.fc.bias.copy_(torch.tensor(bias))

    def features(self, x):
        return x.flatten(1)

    def head(self, z):
        return self.fc(z)

    def forward(self, x):
        return self.head(self.features(x))


def test_limits_by_hand_react_fdbd_energy():
    model = Affine([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]], [0.5, -0.5])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    result = limits.limit_analysis(model, d)
    rays = feature_rays(model, d, result.alpha)
    assert torch.allclose(rays.v, d.double()) and torch.allclose(rays.u, torch.zeros(3, 3, dtype=torch.float64))
    react = DETECTORS["react"](model)
    react.threshold, react.fitted = torch.tensor(2.0), True
    limit, exact = detector_limits("react", react, rays)
    # clipped limits: (2, 0, 0), (0, 0, 2), (2, 2, 0) -> logits (2.5, -0.5), (0.5, -2.5), (2.5, 1.5)
    expected = [math.log(math.exp(2.5) + math.exp(-0.5)), math.log(math.exp(0.5) + math.exp(-2.5)),
                math.log(math.exp(2.5) + math.exp(1.5))]
    assert exact.all() and torch.allclose(limit, torch.tensor(expected, dtype=torch.float64))
    energy, _ = detector_limits("energy", DETECTORS["energy"](model), rays)
    # slopes W d: (1, 0) -> +inf; (0, -2): top slope 0, so the limit is class 0's intercept 0.5; (1, 1) -> +inf
    assert energy.tolist() == [math.inf, 0.5, math.inf]
    fdbd = DETECTORS["fdbd"](model).fit_outputs(torch.rand(20, 3), torch.zeros(20, 2), torch.zeros(20).long())
    limit, exact = detector_limits("fdbd", fdbd, rays)
    gap = math.sqrt(3.0)  # |w_0 - w_1|
    # ray 1: slopes (1, 0) -> 1 / gap / |d|; ray 2: slopes (0, -2) -> 2 / gap / 2; ray 3: tie, c decides -> 0
    assert exact.all() and torch.allclose(limit, torch.tensor([1 / gap, 1 / gap, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["energy", "react", "knn", "mahalanobis"])
def test_attacked_detector_score_never_below_clean(plain_run, name):
    run_dir, model = plain_run
    detector = DETECTORS[name](model)
    if name != "energy":
        detector.fit(torch.utils.data.DataLoader(data.get_dataset("digits", "train"), batch_size=512))
    x_out = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(batch_size=16, apgd_steps=5, apgd_restarts=1, pgd_steps=3, pgd_restarts=0,
                              pgd_step_size=0.1)
    scorer = DetectorScore(detector)
    scores = ood_detector_scores(scorer, x_out, 0.3, args, torch.Generator().manual_seed(0))
    clean = detector.confidence(x_out).double()
    assert torch.allclose(scores["clean"], clean, rtol=1e-5, atol=1e-5)
    assert (scores["attacked"] >= scores["clean"]).all()
    assert (scores["attacked"] > scores["clean"] + 1e-6).double().mean() >= 0.5  # the attack raises the score
    assert all(not module.training for module in model.modules())


def test_detectors_flag_refuses_unknown_and_float64(plain_run, tmp_path):
    import gen_attack_stats
    from utils import cli

    run_dir, _ = plain_run
    with pytest.raises(SystemExit) as exit_info:
        gen_attack_stats.get_args_parser("audit").parse_args(["--detectors", "msp,nope"])
    assert exit_info.value.code == 2
    argv = ["--study", "gauc", "--runs", str(run_dir), "--detectors", "energy", "--precision", "float64",
            "--ood", "uniform", "--results-root", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(gen_attack_stats.run_study, gen_attack_stats.get_args_parser("gauc"), argv)
    assert exit_info.value.code == 2
    argv[argv.index("float64")] = "float32"
    argv[argv.index("energy")] = "energy,odin"
    with pytest.raises(SystemExit) as exit_info:  # refused before any attack or row
        cli.run(gen_attack_stats.run_study, gen_attack_stats.get_args_parser("gauc"), argv)
    assert exit_info.value.code == 2 and not (tmp_path / "attacks").exists()


def test_reproduce_detector_stress_tiny(tmp_path, monkeypatch):
    import reproduce

    monkeypatch.setattr(detector_stress, "DETECTORS", ("msp", "energy", "mahalanobis", "knn"))
    argv = ["detector-stress", "--dataset", "digits", "--budget", "tiny", "--runs-root", str(tmp_path / "runs"),
            "--results-root", str(tmp_path / "results"), "--device", "cpu"]
    out = reproduce.main(reproduce.get_args_parser().parse_args(argv))
    text = out.read_text()
    results = tmp_path / "results" / "budget-tiny"
    ood_rows = [json.loads(line) for line in (results / "ood/digits_adhoc_detector-stress.jsonl").read_text()
                .splitlines()]
    audit_rows = [json.loads(line) for line in (results / "attacks/digits_audit.jsonl").read_text().splitlines()]
    gauc_rows = [json.loads(line) for line in (results / "attacks/digits_gauc.jsonl").read_text().splitlines()]
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for name in ("msp", "energy", "mahalanobis", "knn"):
        row = next(r for r in ood_rows if r["detector"] == name and r["ood"] == "uniform")
        far = next(r for r in audit_rows if (r.get("detector") or "msp") == name)
        aauc = next(r for r in gauc_rows if (r.get("detector") or "msp") == name)
        cells = [cell.strip() for cell in lines[name].strip("|").split("|")]
        assert cells[1] == f"{100 * row['auroc']:.1f}"  # AUROC uniform, the first OOD set of digits
        assert cells[-2] == f"{aauc['aauc_conservative']:.1f}" and cells[-1].startswith(f"{100 * far['far_accept']:.1f}")
        assert aauc["aauc_conservative"] <= aauc["auc_conservative"]
    assert next(r for r in audit_rows if r.get("detector") == "mahalanobis")["far_accept"] == 0.0


def test_rmds_limit_is_exact_beside_a_direction_of_tiny_training_variance():
    """Feature 2 barely varies in training, so pinv(Sigma) has entries ~1e12; along feature 0 the class and background
    quadratic terms are 1 and ~1/2 (between-class spread), so the limit is -inf, exactly, not a tie."""
    model = Affine([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], [0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    features = torch.randn(400, 3, generator=generator, dtype=torch.float64)
    features[:, 0] += 2.0 * labels
    features[:, 2] *= 1e-6
    rmds = DETECTORS["rmds"](model).fit_outputs(features, torch.zeros(400, 2), labels)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rays = feature_rays(model, d, limits.limit_analysis(model, d).alpha)
    limit, exact = detector_limits("rmds", rmds, rays)
    assert bool(exact[0]) and limit[0] == -math.inf
    numeric = rmds.from_outputs(1e6 * d.double(), torch.zeros(2, 2)).double()
    assert numeric[0] < -1e11
