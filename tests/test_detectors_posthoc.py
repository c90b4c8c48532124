"""ODIN, Mahalanobis, MC dropout, deep ensembles and EDL: formulas, sign convention, shared-pass sweeps."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.common import Normalize
from utils.detectors.base import Detector
from utils.detectors.bayes import Ensemble, MCDropout, predictive_confidence
from utils.detectors.edl import EDL
from utils.detectors.mahalanobis import Mahalanobis
from utils.detectors.odin import ODIN
from utils.detectors.posthoc import POSTHOC_DETECTORS
from utils.methods.edl import EDL_METHODS, EDLModel, edl_loss
from utils.metrics import auroc, ood_metrics
from tests.conftest import FlatLinear

SHAPE = (3, 2, 2)  # tiny 3-channel "images", so the per-channel normalisation is non-trivial
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.1, 0.5)
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Normalize -> MLP; features = last hidden layer, head = (dropout ->) linear; optional BatchNorm."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False, normalize: bool = True) -> None:
        super().__init__()
        dim = int(np.prod(SHAPE))
        self.normalize = Normalize(MEAN, STD) if normalize else nn.Identity()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(dim, 32), nn.BatchNorm1d(32) if batch_norm
                                  else nn.Identity(), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def IdentityFeatures(dim: int) -> FlatLinear:
    """features = the flattened input (exactly controlled features), head = a fresh linear map to NUM_CLASSES."""
    return FlatLinear(dim, NUM_CLASSES)


def _toy(n_per_class: int = 60, seed: int = 0):
    """In: 3 tight blobs in [0,1]^12. Out: midpoints between two blobs (where a classifier is unsure)."""
    gen = torch.Generator().manual_seed(seed)
    centres = 0.2 + 0.6 * torch.rand(NUM_CLASSES, *SHAPE, generator=gen)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x_in = (centres[y] + 0.03 * torch.randn(len(y), *SHAPE, generator=gen)).clamp(0, 1)
    pairs = torch.tensor([[0, 1], [1, 2], [0, 2]]).repeat(n_per_class // 3 + 1, 1)[:n_per_class]
    x_out = ((centres[pairs[:, 0]] + centres[pairs[:, 1]]) / 2
             + 0.03 * torch.randn(n_per_class, *SHAPE, generator=gen)).clamp(0, 1)
    return x_in, y, x_out


def _train(model: nn.Module, x, y, loss_fn=None, steps: int = 150, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = loss_fn(model, x, y) if loss_fn else F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def toy():
    return _toy()


@pytest.fixture(scope="module")
def trained(toy):
    x_in, y, _ = toy
    torch.manual_seed(0)
    return {
        "plain": _train(TinyNet(), x_in, y),
        "dropout": _train(TinyNet(dropout=0.3), x_in, y, seed=1),
        "members": [_train(TinyNet(), x_in, y, seed=s) for s in (2, 3, 4)],
        "edl": _train(EDLModel(TinyNet()), x_in, y, seed=5,
                      loss_fn=lambda m, x, y: edl_loss(m, x, y, None, Namespace())[0]),
    }


def _build(name: str, trained, toy, **options) -> Detector:
    model = {"mcdropout": trained["dropout"], "edl": trained["edl"]}.get(name, trained["plain"])
    if name == "ensemble":
        return Ensemble(trained["members"], **options)
    detector = POSTHOC_DETECTORS[name](model, **options)
    if name == "mahalanobis":
        x_in, y, _ = toy
        detector.fit(DataLoader(TensorDataset(x_in, y), batch_size=64))
    return detector


@pytest.mark.parametrize("name", sorted(POSTHOC_DETECTORS))
def test_registry_shapes_determinism_and_sign(name, trained, toy):
    x_in, _, x_out = toy
    detector = _build(name, trained, toy)
    assert isinstance(detector, Detector)
    torch.manual_seed(7)
    conf_in = detector.confidence(x_in)
    torch.manual_seed(7)
    again = detector.confidence(x_in)
    conf_out = detector.confidence(x_out)
    assert conf_in.shape == (len(x_in),) and conf_out.shape == (len(x_out),)
    assert torch.isfinite(conf_in).all() and torch.isfinite(conf_out).all()
    torch.testing.assert_close(conf_in, again, rtol=0, atol=0)
    assert conf_in.mean() > conf_out.mean()
    assert auroc(conf_in, conf_out) > 0.9, name


@pytest.mark.parametrize("name", sorted(POSTHOC_DETECTORS))
def test_unknown_option_value_raises(name, trained, toy):
    option = {"odin": "gradient", "mahalanobis": "gradient"}.get(name, "score")
    with pytest.raises(ValueError, match="valid"):
        _build(name, trained, toy, **{option: "nope"})


# ----------------------------------------------------------------------------------------------------- ODIN

def test_odin_with_t1_eps0_is_msp(trained, toy):
    x_in, _, x_out = toy
    model = trained["plain"]
    x = torch.cat([x_in, x_out])
    expected = model(x).softmax(dim=1).amax(dim=1).double()
    torch.testing.assert_close(ODIN(model, temperature=1.0, eps=0.0).confidence(x), expected)


def test_odin_step_is_exactly_eps_in_pixels_and_equals_the_original_normalised_step(trained, toy):
    """The original steps the normalised input by eps*sign(g)/std_c; in pixels that must be exactly eps."""
    x_in, _, _ = toy
    model, eps, temperature = trained["plain"], 0.0014, 1000.0
    x_tilde = ODIN(model, temperature=temperature, eps=eps).perturb(x_in)
    torch.testing.assert_close((x_tilde - x_in).abs(), torch.full_like(x_in, eps), rtol=0, atol=1e-7)
    # the original's recipe: normalise outside, CE(f(x_norm)/T, yhat), x_norm - eps * sign(g) / std, sign(0)=+1
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x_norm = ((x_in - mean) / std).requires_grad_(True)
    logits = model.head(model.body(x_norm))
    loss = F.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_norm)
    sign = (grad >= 0).float() * 2 - 1
    original = (x_norm.detach() - eps * sign / std) * std + mean
    torch.testing.assert_close(x_tilde, original, rtol=0, atol=1e-6)
    # and the step raises the tempered confidence of (nearly) every sample
    detector = ODIN(model, temperature=temperature, eps=eps)
    before, after = detector.confidence_sweep(x_in, [0.0, eps])
    assert (after > before).float().mean() > 0.95


def test_gradient_detectors_work_under_no_grad_and_inference_mode(trained, toy):
    x_in, y, _ = toy
    odin = ODIN(trained["plain"], temperature=10.0, eps=0.002)
    maha = Mahalanobis(trained["plain"], eps=0.002).fit(DataLoader(TensorDataset(x_in, y), batch_size=64))
    for detector in (odin, maha):
        expected = detector.confidence(x_in)
        with torch.no_grad():
            torch.testing.assert_close(detector.confidence(x_in), expected)
        with torch.inference_mode():
            torch.testing.assert_close(detector.confidence(x_in.clone()), expected)


def test_odin_zero_gradient_steps_by_minus_eps():
    model = TinyNet(normalize=False)
    with torch.no_grad():
        model.body[1].weight[:, :4] = 0.0  # the first channel (4 pixels) does not affect the output
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    x_tilde = ODIN(model.eval(), temperature=10.0, eps=0.01).perturb(x)
    torch.testing.assert_close(x_tilde[:, 0], x[:, 0] - 0.01)


def test_odin_raw_gradient_is_ccus_clipped_ascent(trained, toy):
    x_in, _, _ = toy
    model, eps, temperature = trained["plain"], 0.5, 5.0
    x = x_in.clone().requires_grad_(True)
    log_conf = (model(x) / temperature).log_softmax(dim=1).amax(dim=1).sum()
    (grad,) = torch.autograd.grad(log_conf, x)
    expected = (x_in + eps * grad).clamp(0, 1)
    detector = ODIN(model, temperature=temperature, eps=eps, gradient="raw")
    assert detector.clip
    torch.testing.assert_close(detector.perturb(x_in), expected)
    torch.testing.assert_close(detector.confidence(x_in),
                               (model(expected) / temperature).double().softmax(1).amax(1))


def test_odin_sweep_equals_separate_runs(trained, toy):
    x_in, _, x_out = toy
    x = torch.cat([x_in, x_out])
    eps_list = [0.0, 0.001, 0.0014, 0.004, 0.02]
    for gradient in ("sign", "raw"):
        sweep = ODIN(trained["plain"], temperature=20.0, gradient=gradient).confidence_sweep(x, eps_list)
        assert sweep.shape == (len(eps_list), len(x))
        for row, eps in zip(sweep, eps_list):
            single = ODIN(trained["plain"], temperature=20.0, eps=eps, gradient=gradient).confidence(x)
            torch.testing.assert_close(row, single, rtol=0, atol=1e-12)


def test_odin_tune_picks_the_grid_optimum_and_sets_it(trained, toy):
    x_in, y, x_out = toy
    loader_in = DataLoader(TensorDataset(x_in, y), batch_size=50)
    loader_out = DataLoader(TensorDataset(x_out, torch.full((len(x_out),), -1)), batch_size=50)
    temperatures, eps_grid = (1.0, 10.0, 1000.0), (0.0, 0.002, 0.05)
    detector = ODIN(trained["plain"])
    choice = detector.tune(loader_in, loader_out, temperatures, eps_grid, criterion="auroc")
    assert (detector.temperature, detector.eps) == (choice["temperature"], choice["eps"])
    grid = {(t, e): auroc(ODIN(trained["plain"], t, e).confidence(x_in), ODIN(trained["plain"], t, e)
                          .confidence(x_out)) for t in temperatures for e in eps_grid}
    assert choice["val_auroc"] == pytest.approx(max(grid.values()), abs=1e-12)
    assert grid[(choice["temperature"], choice["eps"])] == pytest.approx(choice["val_auroc"], abs=1e-12)
    by_fpr = ODIN(trained["plain"]).tune(loader_in, loader_out, temperatures, eps_grid, criterion="fpr95")
    fprs = {k: ood_metrics(ODIN(trained["plain"], *k).confidence(x_in), ODIN(trained["plain"], *k)
                           .confidence(x_out))["fpr95"] for k in grid}
    assert by_fpr["val_fpr95"] == pytest.approx(min(fprs.values()), abs=1e-12)


# ------------------------------------------------------------------------------------------------ Mahalanobis

def test_mahalanobis_equals_numpy_and_sklearn():
    x_in, y, x_out = _toy(n_per_class=80, seed=3)
    model = IdentityFeatures(int(np.prod(SHAPE)))
    detector = Mahalanobis(model).fit(DataLoader(TensorDataset(x_in, y), batch_size=37))
    z = x_in.flatten(1).double().numpy()
    means = np.stack([z[y.numpy() == c].mean(0) for c in range(NUM_CLASSES)])
    centred = z - means[y.numpy()]
    precision = np.linalg.pinv(centred.T @ centred / len(z))
    np.testing.assert_allclose(detector.means.numpy(), means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(detector.precision.numpy(), precision, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(detector.precision.numpy(), EmpiricalCovariance().fit(centred).precision_,
                               rtol=1e-7, atol=1e-6)
    queries = torch.cat([x_in, x_out])
    q = queries.flatten(1).double().numpy()
    diff = q[:, None, :] - means[None]  # (N, K, F)
    expected = -np.einsum("nkf,fg,nkg->nk", diff, precision, diff).min(axis=1)
    np.testing.assert_allclose(detector.confidence(queries).numpy(), expected, rtol=1e-8)
    with torch.no_grad():
        shared = detector.from_outputs(model.features(queries), model(queries))
    np.testing.assert_allclose(shared.numpy(), expected, rtol=1e-8)
    assert detector.needs_grad is False
    ridged = Mahalanobis(model, ridge=0.05).fit(DataLoader(TensorDataset(x_in, y), batch_size=500))
    np.testing.assert_allclose(ridged.precision.numpy(),
                               np.linalg.inv(centred.T @ centred / len(z) + 0.05 * np.eye(z.shape[1])), rtol=1e-8)


def test_mahalanobis_constant_features_get_pinv_semantics():
    """A feature that never varies in training (a dead ReLU) gets a zero row/column in P, as pinv gives."""
    x_in, y, _ = _toy(n_per_class=40, seed=4)
    x_in = x_in.flatten(1)
    x_in[:, [2, 7]] = 0.0
    detector = Mahalanobis(IdentityFeatures(x_in.shape[1])).fit(DataLoader(TensorDataset(x_in, y), batch_size=50))
    z = x_in.double().numpy()
    centred = z - np.stack([z[y.numpy() == c].mean(0) for c in range(NUM_CLASSES)])[y.numpy()]
    expected = np.linalg.pinv(centred.T @ centred / len(z), hermitian=True)
    np.testing.assert_allclose(detector.precision.numpy(), expected, rtol=1e-6, atol=1e-8)
    assert detector.support.tolist() == [i for i in range(12) if i not in (2, 7)]
    moved = x_in.clone()
    moved[:, 2] = 1.0  # moving along a dead feature does not change the pinv distance
    torch.testing.assert_close(detector.confidence(moved), detector.confidence(x_in))


def test_mahalanobis_preprocessing_sweep_and_tune(trained, toy):
    x_in, y, x_out = toy
    loader_in = DataLoader(TensorDataset(x_in, y), batch_size=64)
    detector = Mahalanobis(trained["plain"], eps=0.002).fit(loader_in)
    assert detector.needs_grad is True
    with pytest.raises(RuntimeError, match="confidence"):
        detector.from_outputs(torch.zeros(1, 16), torch.zeros(1, 3))
    eps_list = [0.0, 0.0014, 0.002, 0.01]
    sweep = detector.confidence_sweep(x_in, eps_list)
    for row, eps in zip(sweep, eps_list):
        detector.eps = eps
        assert detector.needs_grad == (eps > 0)  # eps = 0: the shared forward pass suffices
        torch.testing.assert_close(row, detector.confidence(x_in), rtol=0, atol=1e-9)
    assert (sweep[1] > sweep[0]).float().mean() > 0.95  # the step decreases the distance
    loader_out = DataLoader(TensorDataset(x_out, torch.full((len(x_out),), -1)), batch_size=64)
    choice = detector.tune(loader_in, loader_out, eps_grid=(0.0, 0.002, 0.01), criterion="auroc")
    assert detector.eps == choice["eps"] and detector.needs_grad == (choice["eps"] > 0)


# --------------------------------------------------------------------------------- MC dropout and ensembles

def test_mc_dropout_mutual_information_and_dropout_off(trained, toy):
    x_in, _, x_out = toy
    x = torch.cat([x_in, x_out])
    mi = -MCDropout(trained["dropout"], samples=8, score="mutual_info").confidence(x)
    assert (mi >= -1e-12).all() and mi.max() > 1e-3
    off = TinyNet(dropout=0.0).eval()
    assert isinstance(off.dropout, nn.Dropout)
    for score, value in (("mutual_info", 0.0), ("variance", 0.0)):
        torch.testing.assert_close(MCDropout(off, samples=5, score=score).confidence(x),
                                   torch.full((len(x),), value, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(MCDropout(off, samples=5).confidence(x), off(x).softmax(1).amax(1).double())
    with pytest.raises(ValueError, match="dropout"):
        MCDropout(nn.Sequential(nn.Flatten(), nn.Linear(12, 3))).confidence(x)


def test_mc_dropout_freezes_batch_norm_and_restores_modes(toy):
    x_in, y, _ = toy
    model = _train(TinyNet(dropout=0.5, batch_norm=True), x_in, y, steps=20)
    bn = model.body[2]
    running = bn.running_mean.clone()
    probs = MCDropout(model, samples=4).sample_probs(x_in)
    assert probs.shape == (4, len(x_in), NUM_CLASSES)
    assert not torch.equal(probs[0], probs[1])  # dropout was active
    torch.testing.assert_close(bn.running_mean, running, rtol=0, atol=0)
    assert not any(module.training for module in model.modules())
    model.train()
    MCDropout(model, samples=2).confidence(x_in)
    assert all(module.training for module in model.modules())


def test_predictive_scores_match_ddu_formulas():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 10, 5, generator=gen, dtype=torch.float64), dim=-1)
    p = probs.numpy()
    mean = p.mean(0)
    pe = -(mean * np.log(mean + 1e-12)).sum(1)
    mi = pe - (-(p * np.log(p + 1e-12)).sum(2)).mean(0)
    np.testing.assert_allclose(predictive_confidence(probs, "entropy").numpy(), -pe, rtol=1e-12)
    np.testing.assert_allclose(predictive_confidence(probs, "mutual_info").numpy(), -mi, rtol=1e-10)
    np.testing.assert_allclose(predictive_confidence(probs, "max_prob").numpy(), mean.max(1), rtol=1e-12)
    np.testing.assert_allclose(predictive_confidence(probs, "variance").numpy(), -p.var(0).sum(1), rtol=1e-12)


def test_mutual_information_is_clamped_at_zero():
    # identical members: PE and the mean member entropy agree up to float64 rounding, which gave MI = -2e-16
    gen = torch.Generator().manual_seed(3)
    probs = (5 * torch.randn(500, 10, generator=gen)).softmax(1).unsqueeze(0).expand(5, -1, -1)
    confidence = predictive_confidence(probs, "mutual_info")
    assert bool((confidence <= 0).all()) and float(confidence.min()) > -1e-12   # -MI: never above 0


def test_ensemble_of_one_is_its_member_and_identical_members_have_no_mi(trained, toy):
    x_in, _, x_out = toy
    x = torch.cat([x_in, x_out])
    member = trained["members"][0]
    torch.testing.assert_close(Ensemble([member]).confidence(x), member(x).softmax(1).amax(1).double())
    torch.testing.assert_close(Ensemble(member).confidence(x), member(x).softmax(1).amax(1).double())
    torch.testing.assert_close(Ensemble([member] * 3, score="mutual_info").confidence(x),
                               torch.zeros(len(x), dtype=torch.float64), rtol=0, atol=1e-12)
    mean = torch.stack([m(x).softmax(1) for m in trained["members"]]).mean(0).double()
    torch.testing.assert_close(Ensemble(trained["members"]).confidence(x), mean.amax(1))


# ------------------------------------------------------------------------------------------------------- EDL

def test_edl_loss_formula_and_variants():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    y = torch.tensor([0, 2])
    model = EDLModel(IdentityFeatures(3))
    model.base.fc = nn.Identity()  # head(features) = the logits above
    alpha = F.elu(logits) + 2
    s = alpha.sum(1)
    p = alpha / s[:, None]
    err = ((F.one_hot(y, 3) - p) ** 2).sum(1)
    var = (p * (1 - p)).sum(1)
    ccu, out = edl_loss(model, logits, y, None, Namespace())
    paper, _ = edl_loss(model, logits, y, None, Namespace(edl_variance="paper"))
    torch.testing.assert_close(ccu, (err + var / s).mean())
    torch.testing.assert_close(paper, (err + var / (s + 1)).mean())
    torch.testing.assert_close(out.softmax(1), p)  # the output's softmax is EDL's p = alpha / S
    with pytest.raises(ValueError, match="valid"):
        edl_loss(model, logits, y, None, Namespace(edl_variance="kl"))
    assert EDL_METHODS["edl"].loss is edl_loss and not EDL_METHODS["edl"].uses_out_data


def test_edl_training_loss_is_finite_and_decreases(toy):
    x_in, y, _ = toy
    torch.manual_seed(0)
    method = EDL_METHODS["edl"]
    model = method.wrap_model(TinyNet(), Namespace(), True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, logits = method.loss(model, x_in, y, None, Namespace())
        assert torch.isfinite(loss) and logits.shape == (len(x_in), NUM_CLASSES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(model(x_in), model.head(model.features(x_in)))


def test_edl_detector_scores(trained, toy):
    x_in, _, _ = toy
    model = trained["edl"]
    with torch.no_grad():
        features = model.features(x_in)
        alpha = F.elu(model.base.head(features)).double() + 2
        logits = model.head(features)
    s = alpha.sum(1)
    torch.testing.assert_close(EDL(model).from_outputs(features, logits), (alpha / s[:, None]).amax(1))
    torch.testing.assert_close(EDL(model, score="uncertainty").from_outputs(features, logits), -3 / s)
