"""Know your limits (Ulmer & Cina, arXiv 2012.05329) and Theorem 3.1 of Hein et al. (arXiv 1812.05720):
toy models fit the moons, uncertainty scores, exact limit confidences, far-away curves, linear regions."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import limits
from utils.studies import regions, toy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def moons() -> toy.MoonsData:
    return toy.moons_data()


def test_moons_split(moons):
    assert moons.x_train.shape == (500, 2) and moons.x_val.shape == (250, 2)
    assert set(moons.y_train.unique().tolist()) == {0.0, 1.0}
    assert moons.x_train[:, 0].min() < -0.8 and moons.x_train[:, 0].max() > 1.8  # raw make_moons coordinates


@pytest.mark.parametrize("name", list(toy.TOY_MODELS))
def test_toy_model_fits_moons(name, moons):
    kwargs = {"n_members": 3} if "Ensemble" in name else {}  # 3 members keep the test fast; default is 10
    model = toy.train_toy(name, moons, seed=0, **kwargs)
    assert model.accuracy(moons.x_val, moons.y_val) > 0.95
    probs = model.predict_samples(moons.x_val[:7])
    assert probs.shape == (model.n_samples, 7, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(model.n_samples, 7))


def test_mc_dropout_is_active_at_inference(moons):
    model = toy.build_toy("MCDropout")
    probs = model.predict_samples(moons.x_val[:50])
    assert probs.shape[0] == 50 and float(toy.class_variance(probs.detach()).mean()) > 1e-6
    assert torch.equal(probs, model.predict_samples(moons.x_val[:50]))  # seeded masks: a fixed function of x


def test_scores_known_values():
    uniform = torch.full((4, 3, 2), 0.5)
    assert torch.allclose(toy.entropy(uniform), torch.ones(3), atol=1e-6)
    assert torch.allclose(toy.max_prob(uniform), torch.full((3,), 0.5))
    opposite = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two members, certain of different classes
    assert toy.mutual_information(opposite).item() == pytest.approx(1.0, abs=1e-6)
    assert toy.class_variance(opposite).item() == pytest.approx(0.25)
    random = torch.softmax(torch.randn(10, 20, 2, generator=torch.Generator().manual_seed(0)), -1)
    expected = 5.0 - (-(random * torch.log2(random + 1e-8)).sum(-1)).mean(0)  # the original's bug: S/2 - mean entropy
    assert torch.allclose(toy.mutual_information_original(random), expected, atol=1e-5)


def test_mutual_information_nonnegative_and_zero_for_identical_members():
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(10, 200, 4, generator=generator), -1)
    assert bool((toy.mutual_information(probs) >= 0).all())
    assert float(toy.mutual_information(probs).max()) > 0.1
    identical = probs[:1].expand(10, -1, -1)
    assert torch.allclose(toy.mutual_information(identical), torch.zeros(200), atol=1e-6)
    assert torch.allclose(toy.class_variance(identical), torch.zeros(200), atol=1e-12)


def _mlp(seed: int, act=nn.ReLU, sizes=(8, 32, 32, 5)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).eval()


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _assert_exact_matches_numeric(net: nn.Module, directions: torch.Tensor) -> limits.LimitResult:
    result = limits.limit_analysis(net, directions)
    numeric = limits.numeric_confidence(net, directions, alpha=1e6)
    assert bool(result.certified.all())
    assert float((result.confidence - numeric).abs().max()) < 1e-4
    # the certificate: the activation pattern at alpha is the one at 2 alpha and 64 alpha as well
    scale = result.alpha.view(-1, *([1] * (directions.dim() - 1)))
    net64 = net.double()
    at = [limits.activation_pattern(net64, k * scale * directions.double()) for k in (1, 2, 64)]
    assert torch.equal(at[0], at[1]) and torch.equal(at[0], at[2])
    net.float()
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_limit_equals_numeric_relu_mlp(seed):
    directions = torch.randn(400, 8, generator=torch.Generator().manual_seed(seed))
    result = _assert_exact_matches_numeric(_mlp(seed), directions)
    # Theorem 3.1: no tied top slopes -> every limit confidence is exactly 1
    untied = result.n_tied == 1
    assert bool((result.confidence[untied] == 1.0).all()) and float(untied.double().mean()) > 0.9


def test_exact_limit_leaky_relu():
    directions = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    _assert_exact_matches_numeric(_mlp(3, act=lambda: nn.LeakyReLU(0.2)), directions)


def test_exact_limit_convnet():
    directions = torch.randn(200, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    _assert_exact_matches_numeric(_convnet(4), directions)


def test_tied_slopes_give_softmax_of_intercepts():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[2].weight[1] = net[2].weight[0]  # classes 0 and 1 share a slope everywhere
        net[2].bias.copy_(torch.tensor([0.3, -0.4, 0.0]))
        net[2].weight[2] = -net[2].weight[0].abs() - 1.0  # never on top when the hidden units are active
        net[0].weight.abs_()
        net[0].bias.zero_()
    directions = torch.rand(50, 3) + 0.1  # positive directions keep every hidden unit active
    result = limits.limit_analysis(net, directions)
    expected = torch.softmax(torch.tensor([0.3, -0.4]), 0).double()
    assert bool((result.n_tied == 2).all())
    assert torch.allclose(result.probs[:, :2], expected.expand(50, 2), atol=1e-9)
    constant = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 3)).eval()
    with torch.no_grad():
        constant[0].weight.zero_()
        constant[0].bias.fill_(-1.0)  # every hidden unit dead: the network is constant
    result = limits.limit_analysis(constant, directions)
    assert torch.allclose(result.probs, torch.softmax(constant[2].bias.double(), 0).expand(50, 3), atol=1e-9)


def test_non_piecewise_affine_models_are_flagged():
    smooth = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    directions = torch.randn(20, 4)
    with pytest.raises(limits.NotPiecewiseAffineError, match="tanh"):
        limits.limit_confidence(smooth, directions)
    with pytest.warns(UserWarning):
        numeric = limits.limit_analysis(smooth, directions, on_non_pa="numeric")
    assert numeric.method == "numeric"
    assert torch.allclose(numeric.confidence, limits.numeric_confidence(smooth, directions, 1e6))

    class Squares(nn.Module):  # a quadratic (GMM-like) score inside: x * x
        def forward(self, x):
            return torch.stack([(x * x).sum(1), x.sum(1)], 1)

    with pytest.warns(UserWarning):
        assert bool(limits.limit_analysis(Squares(), directions, on_non_pa="nan").confidence.isnan().all())


class _Inner(nn.Module):
    """Linear -> op -> Linear: the op sees an input-dependent tensor."""

    def __init__(self, op) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        return self.second(self.op(self.first(x)))


@pytest.mark.parametrize("name,op", [
    ("clamp_min", lambda h: h.clamp_min(0.0)), ("clamp_max", lambda h: h.clamp_max(0.0)),
    ("threshold", lambda h: F.threshold(h, 0.5, 0.0)), ("sign", torch.sign), ("floor", torch.floor),
    ("reciprocal division", lambda h: 1.0 / (h + 10.0)), ("rounding division", lambda h: h // 2),
    ("rounding div", lambda h: torch.div(h, 2, rounding_mode="floor")),
    ("division by the input", lambda h: h / (h + 5.0)),
])
def test_operations_off_the_allow_list_are_refused_not_certified(name, op):
    directions = torch.randn(30, 4, generator=torch.Generator().manual_seed(8))
    with pytest.raises(limits.NotPiecewiseAffineError):
        limits.limit_analysis(_Inner(op), directions)
    with pytest.warns(UserWarning):
        fallback = limits.limit_analysis(_Inner(op), directions, on_non_pa="numeric")
    assert fallback.method == "numeric" and not bool(fallback.certified.any())
    # constant divisors and eval-mode layers stay allowed
    _assert_exact_matches_numeric(_Inner(lambda h: torch.relu(h) / 3.0), directions)


def test_ray_curve_converges_to_limit_and_gradient_vanishes():
    net = _mlp(5)
    directions = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    alphas = torch.logspace(0, 5, 11)
    scores, grad_norms = limits.ray_curve(net, directions, alphas)
    assert scores.shape == grad_norms.shape == (11, 64)
    limit = limits.limit_confidence(net, directions).float()
    assert float((scores[-1] - limit).abs().max()) < 1e-4
    assert float(grad_norms[-1].max()) < 1e-6 < float(grad_norms[0].median())


def test_linear_regions_match_brute_force():
    torch.manual_seed(7)
    net = regions.make_plnn((2, 4, 4, 3)).eval()
    _, _, points = regions.grid_points((-3, 3, 0.2), (-3, 3, 0.2))
    ids, count = regions.linear_regions(net, points)
    patterns = set()
    for point in points:  # brute force: the pattern of each point by hand
        h, bits = point, []
        for layer in net:
            h = layer(h)
            if isinstance(layer, nn.Linear) and layer is not net[-1]:
                bits += (h > 0).tolist()
        patterns.add(tuple(bits))
    assert count == len(patterns) > 3
    first = {int(i): n for n, i in reversed(list(enumerate(ids)))}
    pattern = limits.activation_pattern(net, points)
    assert all(torch.equal(pattern[n], pattern[first[int(i)]]) for n, i in enumerate(ids))


def test_nine_clusters():
    x, y = regions.nine_clusters()
    assert x.shape == (450, 2) and torch.equal(torch.bincount(y), torch.full((9,), 50))
    means = torch.stack([x[y == k].mean(0) for k in range(9)])
    assert torch.allclose(means, torch.tensor(regions.NINE_CENTRES), atol=0.15)


def test_audit_main_writes_rows(tmp_path):
    import models
    from utils import checkpoints

    config = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8],
              "arch_kwargs": {"widths": [32, 32]}, "dataset": "digits"}
    torch.manual_seed(0)
    model = models.build_model(config)
    run_dir = tmp_path / "runs" / "digits" / "plain-s0"
    checkpoints.save_checkpoint(run_dir / "model.pt", {"model": model.state_dict(), "config": config, "epoch": 0})
    from utils.studies import audit

    parser = argparse.ArgumentParser()
    audit.add_args(parser)
    args = parser.parse_args(["--runs", str(run_dir), "--dataset", "digits", "--n-directions", "40",
                              "--results-root", str(tmp_path / "results"), "--device", "cpu"])
    audit.main(args)
    rows = [json.loads(line) for line in (tmp_path / "results/attacks/digits_audit.jsonl").read_text().splitlines()]
    assert {row["source"] for row in rows} == {"gaussian", "test", "noise"}
    for row in rows:
        assert row["method"] == "exact" and row["n"] == 40 and row["certified"] == 1.0
        assert row["agreement"] == 1.0 and 0.0 <= row["share_confident"] <= 1.0
    assert "plain-s0" in (tmp_path / "results/tables/digits_audit.md").read_text()
    assert next(row for row in rows if row["source"] == "noise")["noise"] == "uniform"
    # the noise directions from the user's own images (NAME=PATH): their rows sit beside the uniform ones
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(0).integers(0, 256, (60, 12, 12), dtype=np.uint8))
    audit.main(parser.parse_args(["--runs", str(run_dir), "--dataset", "digits", "--n-directions", "40",
                                  "--sources", "noise", "--noise", f"mine={tmp_path / 'mine.npz'}",
                                  "--results-root", str(tmp_path / "results"), "--device", "cpu"]))
    rows = [json.loads(line) for line in (tmp_path / "results/attacks/digits_audit.jsonl").read_text().splitlines()]
    assert sorted(row.get("noise", "") for row in rows) == ["", "", "mine", "uniform"]
    with pytest.raises(SystemExit):  # a malformed key is refused by argparse, before anything runs
        parser.parse_args(["--runs", str(run_dir), "--noise", "mine="])
