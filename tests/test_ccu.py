"""CCU: GMM densities, the CCU output, the certificate (vs brentq and under attack), the loss and the tools."""
from __future__ import annotations

import math
from argparse import Namespace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp
from torch import nn

from models.ccu import CCUModel, build_ccu
from models.gmm import GMM, PCAMetric
from utils.studies.ccu import pca_ball_attack
from utils.checkpoints import save_checkpoint
from utils.certify import asymptotic_check, bound_gap, bound_terms, certified_radius
from utils.methods.ccu import CCU_METHODS, ccu_loss, ccu_param_groups, clamp_out_variances

D, K = 16, 3          # 1 x 4 x 4 inputs, 3 classes
SHAPE = (1, 4, 4)


class TinyNet(nn.Module):
    """features/head backbone; the scaled output layer makes it confident almost everywhere."""

    def __init__(self, gain: float = 30.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU())
        self.fc = nn.Linear(32, K)
        with torch.no_grad():
            self.fc.weight.mul_(gain)

    def features(self, x):
        return self.body(x)

    def head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.head(self.features(x))


def in_data(n: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.linspace(0.05, 0.3, D) * torch.randn(n, D, generator=g)).clamp(0, 1)


def make_ccu(seed: int = 0, ccus: bool = False, out_factor: float = 4.0, dtype=torch.float32) -> CCUModel:
    """A small CCU model: in-means on data points, out-means uniform, variances ~ the whitened data scale."""
    torch.manual_seed(seed)
    data = in_data(seed=seed)
    metric = PCAMetric.fit(data)
    v_in = float(metric.whiten(data - data.mean(0)).var(0).mean())
    gmm_in = GMM(metric, 4, mu=data[:4], logvar=torch.log(v_in * (0.5 + torch.rand(4))))
    gmm_out = GMM(metric, 3, mu=torch.rand(3, D), logvar=torch.full((3,), math.log(v_in * out_factor)))
    return CCUModel(TinyNet(), gmm_in, gmm_out, metric, ccus=ccus).to(dtype)


# --- GMM and metric --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_fit", [300, 10])  # 10 < D: PCA basis completed to all of R^D
def test_gmm_log_density_equals_torch_distributions(n_fit):
    data = in_data(n_fit)
    metric = PCAMetric.fit(data, min_sv_factor=1e3).double()
    gmm = GMM(metric, 5, mu=torch.rand(5, D), logvar=torch.randn(5) * 0.3 - 2).double()
    x = torch.rand(20, D, dtype=torch.float64)
    V, s = metric.V, metric.s
    assert torch.allclose(V @ V.T, torch.eye(D, dtype=torch.float64), atol=1e-6)  # float32 buffers
    comps = []
    for k in range(5):
        cov = gmm.logvar[k].exp() * V.T @ torch.diag(s) @ V
        dist = torch.distributions.MultivariateNormal(gmm.mu[k].detach(), covariance_matrix=cov.detach())
        comps.append(dist.log_prob(x) - math.log(5))
    expected = torch.logsumexp(torch.stack(comps, 1), 1)
    got = gmm.log_density(x).detach()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5), (got - expected).abs().max()


def test_metric_whiten_roundtrip_and_distance():
    metric = PCAMetric.fit(in_data()).double()
    assert float(metric.s.min()) >= float(metric.s.max()) / 1e6 * (1 - 1e-12)
    x, y = torch.rand(7, *SHAPE, dtype=torch.float64), torch.rand(7, *SHAPE, dtype=torch.float64)
    assert torch.allclose(metric.unwhiten(metric.whiten(x)), x.reshape(7, -1), atol=1e-5)
    diff = (x - y).reshape(7, -1)
    precision = metric.V.T @ torch.diag(1 / metric.s) @ metric.V
    expected = torch.einsum("nd,de,ne->n", diff, precision, diff).sqrt()
    assert torch.allclose(metric.distance(x, y), expected, rtol=1e-9)


def test_pca_metric_matches_sklearn_singular_values():
    from sklearn.decomposition import PCA

    data = in_data().double().numpy()
    metric = PCAMetric.fit(data)
    pca = PCA().fit(data)
    assert np.allclose(metric.s.numpy(), np.maximum(pca.singular_values_, pca.singular_values_[0] / 1e6),
                       rtol=1e-5)


# --- CCU output ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ccus", [False, True])
def test_ccu_output_is_normalised_and_matches_formula(ccus):
    model = make_ccu(ccus=ccus, dtype=torch.float64)
    model.loglam.fill_(math.log(2.0))
    x = torch.cat([in_data(10, seed=3), torch.rand(10, D, dtype=torch.float64).float()]).double().view(-1, *SHAPE)
    log_probs = model(x)
    assert torch.allclose(torch.logsumexp(log_probs, 1), torch.zeros(20, dtype=torch.float64), atol=1e-12)
    # the linear-space formula, with densities rescaled per row so that exp() is safe
    lpi, lpo = model.log_densities(x)
    shift = torch.maximum(lpi, lpo)
    p_i, p_o = (lpi - shift).exp()[:, None], (lpo - shift).exp()[:, None]
    p_hat = model.base(x).softmax(1)
    expected = (p_hat * p_i + 2.0 / K * p_o) / (p_i + 2.0 * p_o)
    assert torch.allclose(log_probs.exp(), expected, atol=1e-12)
    if ccus:
        assert torch.equal(lpo, torch.zeros_like(lpo))


@pytest.mark.parametrize("ccus", [False, True])
def test_ccu_tends_to_uniform_far_away(ccus):
    model = make_ccu(ccus=ccus, out_factor=0.5)  # out-variances too small before the clamp
    if not ccus:
        assert not asymptotic_check(model)["holds"]
        clamp_out_variances(model)
    check = asymptotic_check(model)
    assert check["holds"] and (ccus or check["ratio"] >= 4.0 * (1 - 1e-6))
    x = torch.rand(8, *SHAPE) * 1e3
    with torch.no_grad():
        probs, base_probs = model(x).exp(), model.base(x).softmax(1)
    assert float(base_probs.max(1).values.min()) > 0.99        # the classifier alone is certain
    assert torch.allclose(probs, torch.full_like(probs, 1 / K), atol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)


def test_forward_with_features_and_head_delegation():
    model = make_ccu()
    x = torch.rand(5, *SHAPE)
    features, log_probs = model.forward_with_features(x)
    assert torch.allclose(log_probs, model(x), atol=1e-6)
    assert torch.allclose(model.head(model.features(x)), model.base(x))


def test_detectors_score_the_ccu_models_own_output():
    from utils.detectors import DETECTORS

    model = make_ccu().eval()
    x = torch.cat([in_data(20, seed=3).view(-1, *SHAPE), torch.rand(20, *SHAPE)])   # near and far from the data
    log_probs = model(x)
    base_msp = model.base(x).softmax(1).amax(1)
    ccu_msp = log_probs.exp().amax(1)
    assert float((base_msp - ccu_msp).abs().max()) > 0.1   # the two models disagree here
    torch.testing.assert_close(DETECTORS["msp"](model).confidence(x), ccu_msp)
    torch.testing.assert_close(DETECTORS["energy"](model).confidence(x), log_probs.logsumexp(1))
    torch.testing.assert_close(DETECTORS["entropy"](model).confidence(x), (log_probs.exp() * log_probs).sum(1))


# --- certificate -----------------------------------------------------------------------------------------------

def brentq_radii(terms, f_log_b, r_max=1e4) -> np.ndarray:
    """The original's per-point scipy root finding on the same g (float64 numpy)."""
    di, ci, vi = terms.dist_in.numpy(), terms.const_in.numpy(), terms.var_in.numpy()
    out = terms.dist_out is not None
    radii = []
    for n in range(di.shape[0]):
        def g(r):
            val = logsumexp(ci - np.maximum(di[n] - r, 0) ** 2 / (2 * vi)) - f_log_b
            if out:
                val -= logsumexp(terms.const_out.numpy() - (terms.dist_out[n].numpy() + r) ** 2
                                 / (2 * terms.var_out.numpy()))
            return val
        radii.append(0.0 if g(0.0) >= 0 else brentq(g, 0.0, r_max, maxiter=10000, xtol=1e-14))
    return np.array(radii)


@pytest.mark.parametrize("ccus", [False, True])
def test_batched_radius_equals_brentq(ccus):
    model = make_ccu(seed=1, ccus=ccus)
    clamp_out_variances(model)
    x = torch.cat([torch.rand(60, *SHAPE), in_data(5, seed=4).view(-1, *SHAPE)])  # data points: R = 0
    radius = certified_radius(model, x)
    terms = bound_terms(model, x)
    expected = brentq_radii(terms, terms.log_b)
    assert (expected == 0).sum() >= 1 and (expected > 0).sum() >= 30
    assert np.allclose(radius.numpy(), expected, rtol=0, atol=1e-6), np.abs(radius.numpy() - expected).max()
    assert torch.equal(radius == 0, torch.from_numpy(expected == 0))


def test_certificate_holds_under_attack_and_is_maximal():
    f = 1.1
    for seed in (0, 1):
        model = make_ccu(seed=seed)
        clamp_out_variances(model)
        x = torch.rand(48, *SHAPE, generator=torch.Generator().manual_seed(seed))
        radius = certified_radius(model, x, f=f)
        cert = radius > 0
        assert int(cert.sum()) >= 20
        xs, rs = x[cert], radius[cert].float()
        gen = torch.Generator().manual_seed(seed)
        adv, score = pca_ball_attack(model, xs, rs, model.metric, restarts=8, steps=40, generator=gen)
        assert float(score.exp().max()) <= f / K + 1e-6
        assert bool((model.metric.distance(adv, xs) <= rs * (1 + 1e-5) + 1e-6).all())  # float32 rounding
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        # the same attack on the bare classifier finds confident points in these balls: the radii matter
        _, base_score = pca_ball_attack(model.base, xs, rs, model.metric, restarts=2, steps=20, generator=gen)
        assert float((base_score.exp() > f / K).double().mean()) > 0.8
        # maximal: just beyond R the bound no longer certifies, at R it does
        terms = bound_terms(model, xs, f)
        assert float(bound_gap(terms, radius[cert]).max()) <= 1e-9
        assert float(bound_gap(terms, radius[cert] * (1 + 1e-2) + 1e-9).min()) > 0


def test_radius_zero_and_cap():
    model = make_ccu()
    clamp_out_variances(model)
    at_mean = model.gmm_in.mu.detach()[:2].view(-1, *SHAPE)
    assert torch.equal(certified_radius(model, at_mean), torch.zeros(2, dtype=torch.float64))
    assert float(certified_radius(model, torch.rand(3, *SHAPE), r_max=1e-6).min()) == 1e-6


# --- training method -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ccu", "ccus"])
def test_ccu_loss_trains_and_clamp_holds(name):
    model = make_ccu(ccus=name == "ccus", out_factor=0.5)
    opts = Namespace(lr=1e-2, weight_decay=0.0, gmm_lr=1e-3, loglam=0.0)
    method = CCU_METHODS[name]
    optimizer = torch.optim.Adam(method.param_groups(model, opts))
    x, y = in_data(64, seed=5).view(-1, *SHAPE), torch.randint(0, K, (64,))
    x_out = torch.rand(64, *SHAPE)
    losses = []
    for step in range(15):
        loss, log_probs = method.loss(model, x, y, x_out, opts)
        assert torch.isfinite(loss) and log_probs.shape == (64, K)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for p in [model.base.fc.weight, model.gmm_in.mu, model.gmm_in.logvar]:
                assert p.grad is not None and float(p.grad.abs().sum()) > 0
            assert model.gmm_in.logweight.grad is None and not model.loglam.requires_grad
        optimizer.step()
        method.after_step(model, opts)
        losses.append(float(loss.detach()))
        if name == "ccu":
            bound = float(model.gmm_in.logvar.detach().max()) + math.log(4)
            assert float(model.gmm_out.logvar.detach().min()) >= bound - 1e-6
    assert losses[-1] < losses[0] - 0.1


def test_ccu_loss_keeps_every_out_sample():
    """The original sliced [B+1:]; here changing the first out sample must change the loss."""
    model = make_ccu()
    x, y, x_out = torch.rand(4, *SHAPE), torch.zeros(4, dtype=torch.long), torch.rand(3, *SHAPE)
    opts = Namespace()
    loss_a, _ = ccu_loss(model, x, y, x_out, opts)
    x_out[0] = 1.0 - x_out[0]
    loss_b, _ = ccu_loss(model, x, y, x_out, opts)
    assert abs(float(loss_a.detach()) - float(loss_b.detach())) > 1e-6


def test_param_groups():
    model = make_ccu()
    groups = ccu_param_groups(model, Namespace(lr=0.1, weight_decay=5e-4, gmm_lr=1e-5))
    assert [g["lr"] for g in groups] == [0.1, 1e-5, 1e-5]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def _write_gmm_run(path, model: CCUModel) -> None:
    def plain(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("metric.")}

    save_checkpoint(path / "gmm.pt", {"metric": plain(model.metric), "gmm_in": plain(model.gmm_in),
                                      "gmm_out": plain(model.gmm_out), "config": {}})


@pytest.mark.parametrize("name", ["ccu", "ccus"])
def test_wrap_model_init_and_reload(tmp_path, name):
    reference = make_ccu()
    _write_gmm_run(tmp_path, reference)
    opts = Namespace(gmm=str(tmp_path), loglam=0.5, dataset="digits-like")
    method = CCU_METHODS[name]
    model = method.wrap_model(TinyNet(), opts, init=True)
    assert opts.input_dim == D and opts.gmm_components == [4, 3]
    assert torch.equal(model.gmm_in.mu, reference.gmm_in.mu) and torch.equal(model.metric.V, reference.metric.V)
    assert model.ccus == (name == "ccus") and float(model.loglam) == 0.5
    # a checkpoint round trip through the init=False structure (what utils.methods.load_run does)
    reloaded = method.wrap_model(TinyNet(), Namespace(**{**vars(opts), "gmm": "gone"}), init=False)
    reloaded.load_state_dict(model.state_dict())
    x = torch.rand(6, *SHAPE)
    assert torch.allclose(reloaded(x), model(x))


def test_build_ccu_resizes_on_load():
    model = make_ccu()
    blank = build_ccu(TinyNet(), 1, 100, 100)
    blank.load_state_dict(model.state_dict())
    x = torch.rand(4, *SHAPE)
    assert torch.allclose(blank(x), model(x))


# --- scripts ---------------------------------------------------------------------------------------------------

def test_gen_gmm_on_digits(tmp_path):
    import json

    import gen_gmm

    argv = ["--dataset", "digits", "--n-components", "3", "--n-in", "300", "--n-out", "300", "--max-iter", "20",
            "--runs-root", str(tmp_path), "--device", "cpu"]
    gen_gmm.main(gen_gmm.get_args_parser().parse_args(argv))
    run = tmp_path / "digits" / "gmm-s0"
    config = json.loads((run / "config.json").read_text())
    assert config["input_dim"] == 64 and config["out_data"] == "natural_patches"
    assert config["in_data_mean_log_p_in"] > config["in_data_mean_log_p_out"]
    assert config["out_data_mean_log_p_out"] > config["out_data_mean_log_p_in"]
    state = torch.load(run / "gmm.pt", weights_only=True)
    assert state["gmm_in"]["mu"].shape == (3, 64) and torch.unique(state["gmm_in"]["logvar"]).numel() == 1
    assert torch.allclose(state["gmm_in"]["logweight"], torch.full((3,), -math.log(3)))
    with pytest.raises(FileExistsError):
        gen_gmm.main(gen_gmm.get_args_parser().parse_args(argv))


def test_attack_study_end_to_end(tmp_path, monkeypatch):
    """gen_attack_stats --study ccu on digits: CCU's adversarial confidence stays under f/K where certified."""
    import gen_attack_stats
    from utils import methods
    from utils.plots.ccu import save_all

    monkeypatch.setitem(methods.METHODS, "ccu", CCU_METHODS["ccu"])
    base_config = {"arch": "mlp", "num_classes": 10, "in_channels": 1, "input_size": [1, 8, 8],
                   "arch_kwargs": {"widths": [16]}, "dataset": "digits"}
    import models

    plain = models.build_model(base_config)
    save_checkpoint(tmp_path / "runs" / "plain" / "model.pt", {"model": plain.state_dict(), "config": base_config,
                                                               "epoch": 0})
    gen_dir = tmp_path / "gmm"
    import gen_gmm

    gen_gmm.main(gen_gmm.get_args_parser().parse_args(
        ["--dataset", "digits", "--n-components", "3", "--n-in", "300", "--n-out", "300", "--max-iter", "40",
         "--runs-root", str(gen_dir), "--device", "cpu"]))
    opts = Namespace(**base_config, method="ccu", gmm=str(gen_dir / "digits" / "gmm-s0"))
    ccu = CCU_METHODS["ccu"].wrap_model(models.build_model(base_config), opts, init=True)
    clamp_out_variances(ccu)
    save_checkpoint(tmp_path / "runs" / "ccu" / "model.pt", {"model": ccu.state_dict(), "config": vars(opts),
                                                             "epoch": 0})
    results = tmp_path / "results"
    gen_attack_stats.main(["--study", "ccu", "--ccu-run", str(tmp_path / "runs" / "ccu"), "--runs",
                           str(tmp_path / "runs" / "plain"), "--n-seeds", "12", "--restarts", "2", "--steps", "5",
                           "--n-test", "100", "--results-root", str(results), "--device", "cpu"])
    rows = [__import__("json").loads(line) for line in (results / "attacks" / "digits.jsonl").read_text().split("\n")
            if line]
    assert [r["label"] for r in rows] == ["plain", "CCU"]
    dump = np.load(results / "scores" / "digits_ccu_attack.npz")
    certified = dump["radii"] > 0
    assert certified.any()
    assert np.exp(dump["adv_log_conf"][1][certified]).max() <= 1.1 / 10 + 1e-6
    assert (results / "tables" / "digits_ccu_attack.md").read_text().count("| AUC |") == 1
    assert all(p.exists() for p in save_all(results / "scores" / "digits_ccu_attack.npz", tmp_path / "fig"))
    # seeds from the user's own images (NAME=PATH): rows name the set, beside the uniform-noise rows
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(0).integers(0, 256, (20, 12, 12), dtype=np.uint8))
    gen_attack_stats.main(["--study", "ccu", "--ccu-run", str(tmp_path / "runs" / "ccu"), "--runs",
                           str(tmp_path / "runs" / "plain"), "--seeds", f"mine={tmp_path / 'mine.npz'}",
                           "--n-seeds", "6", "--restarts", "1", "--steps", "2", "--n-test", "100",
                           "--results-root", str(results), "--device", "cpu"])
    rows = [__import__("json").loads(line) for line in (results / "attacks" / "digits.jsonl").read_text().split("\n")
            if line]
    assert sorted(r["seeds"] for r in rows) == ["mine", "mine", "uniform", "uniform"]
    assert all(r["n_seeds"] == 6 for r in rows if r["seeds"] == "mine")
    # a network from elsewhere (--model): attacked inside CCU's balls beside CCU, keyed by its weights' hash
    from tests.conftest import ROOT
    from tests.test_byom import build_net
    from utils.byom import prepare_network, weights_hash

    net = build_net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    gen_attack_stats.main(["--study", "ccu", "--ccu-run", str(tmp_path / "runs" / "ccu"), "--model",
                           f"{ROOT / 'tests' / 'test_byom.py'}:build_net", "--weights", str(tmp_path / "net.pt"),
                           "--name", "mine", "--n-seeds", "6", "--restarts", "1", "--steps", "2", "--n-test", "100",
                           "--results-root", str(tmp_path / "byom"), "--device", "cpu"])
    rows = [__import__("json").loads(line) for line in (tmp_path / "byom" / "attacks" / "digits.jsonl").read_text()
            .splitlines()]
    assert [r["label"] for r in rows] == ["CCU", "mine"]
    assert rows[1]["checkpoints"] == [weights_hash(prepare_network(net))] and 0 <= rows[1]["te"] <= 100


def test_attack_table_has_no_mmc_for_scores_that_are_not_probabilities():
    """A density (DDU) or a Mahalanobis score has no mean confidence: exp of a log-density overflowed to inf."""
    from utils.studies.ccu import attack_row, attack_table

    in_scores, adv_scores = torch.tensor([800.0, 900.0]), torch.tensor([750.0, 950.0])
    density = attack_row("DDU", in_scores, 0.01, adv_scores, probability=False)
    msp = attack_row("Base", torch.log(torch.tensor([0.9, 0.99])), 0.01, torch.log(torch.tensor([0.5, 1.0])))
    assert density["mmc"] is None and msp["mmc"] == pytest.approx(75.0)
    common = {"study": "ccu_attack", "dataset": "digits", "n_seeds": 2, "seeds": "uniform", "radius_median": 1.0,
              "certified_pct": 100.0, "f": 1.1, "restarts": 1, "steps": 1}
    table = attack_table([{**common, **density}, {**common, **msp}])
    assert "| MMC | n/a | 75.0 |" in table and "inf" not in table
