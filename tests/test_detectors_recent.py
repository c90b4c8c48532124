"""The detectors of the issue "Today's detectors" against hand-computed cases (tiny tensors, known W, b and
features), numpy / scikit-learn re-computations, and evaluate.py end to end."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from torch import nn

import evaluate
import train
from utils.detectors import DETECTORS
from utils.detectors import training_stats
from utils.detectors.recent import RECENT_DETECTORS
from utils.detectors.shaping import ash, kept_count
from utils.detectors.training_stats import head_parameters, percentile, topk_similarities
from tests.conftest import FlatLinear


def Affine(weight, bias) -> FlatLinear:
    """features = the flattened input (so features are exactly what the test passes), head = Linear(W, b)."""
    return FlatLinear.with_weights(weight, bias)


def fitted(name, model, train_features, labels=None, **options):
    x = torch.as_tensor(train_features, dtype=torch.float32)
    y = torch.zeros(len(x), dtype=torch.long) if labels is None else torch.as_tensor(labels)
    detector = DETECTORS[name](model, **options)
    return detector.fit([(x, y)]) if hasattr(detector, "fit") else detector


def conf(detector, features):
    return detector.confidence(torch.as_tensor(features, dtype=torch.float32)).double()


def test_react_clips_at_the_training_percentile():
    model = Affine([[1, 0, 0, 0], [0, 1, 1, 1]], [0, -1])
    # training activations 0..7: the 50th percentile (linear interpolation) is 3.5
    detector = fitted("react", model, [[0, 1, 2, 3], [4, 5, 6, 7]], p=50)
    assert float(detector.threshold) == 3.5
    # z = (1, 8, 0, 4) -> clipped (1, 3.5, 0, 3.5) -> logits (1, 3.5 + 0 + 3.5 - 1 = 6)
    assert conf(detector, [[1, 8, 0, 4]]).item() == pytest.approx(math.log(math.e + math.e ** 6), abs=1e-5)
    assert DETECTORS["react"](model).p == 90.0


def test_percentile_equals_numpy_and_kthvalue_works_beyond_quantile_limits():
    values = torch.randn(37, 11)
    for p in (0, 12.5, 50, 90, 99.9, 100):
        assert float(percentile(values, p)) == pytest.approx(np.percentile(values.numpy(), p), abs=1e-6)


def test_ash_variants_by_hand():
    z = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    # p = 50 keeps 4 - round(2) = 2 activations (4 and 3); s1 = 10, s2 = 7
    assert torch.equal(ash(z, 50, "p"), torch.tensor([[4.0, 0.0, 3.0, 0.0]]))
    assert torch.equal(ash(z, 50, "b"), torch.tensor([[5.0, 0.0, 5.0, 0.0]]))
    assert torch.allclose(ash(z, 50, "s"), torch.tensor([[4.0, 0.0, 3.0, 0.0]]) * math.exp(10 / 7))
    # the originals' count n - round(n p / 100), numpy's round half to even
    assert [kept_count(5, 90), kept_count(15, 90), kept_count(10, 85), kept_count(4, 100)] == [1, 1, 2, 1]
    model = Affine([[1, 1, 0, 0], [0, 0, 1, 1]], [0, 0])
    r = math.exp(10 / 7)
    expected = {"p": math.log(math.e ** 4 + math.e ** 3), "b": 5 + math.log(2),
                "s": math.log(math.exp(4 * r) + math.exp(3 * r))}
    for variant, value in expected.items():
        assert conf(DETECTORS["ash"](model, p=50, variant=variant), z).item() == pytest.approx(value, rel=1e-5)
    assert DETECTORS["ash"](model).variant == "s" and DETECTORS["ash"](model, variant="ASH-B").variant == "b"
    with pytest.raises(ValueError, match="unknown ASH variant 'q'; valid: p, b, s"):
        DETECTORS["ash"](model, variant="q")


def test_ash_and_scale_keep_a_dead_feature_vector_finite():
    model = Affine([[1, 1], [0, 1]], [0.5, 0])
    zero = torch.zeros(1, 2)
    for name in ("ash", "scale"):
        assert conf(DETECTORS[name](model), zero).item() == pytest.approx(math.log(math.exp(0.5) + 1), abs=1e-6)


def test_scale_scales_without_pruning():
    model = Affine([[1, 1, 0, 0], [0, 0, 1, 1]], [0, 0])
    z = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    r = math.exp(10 / 7)  # s1 = 10, s2 = 4 + 3 (p = 50 keeps two)
    assert conf(DETECTORS["scale"](model, p=50), z).item() == pytest.approx(5 * r + math.log(2), rel=1e-6)
    assert DETECTORS["scale"](model).p == 85.0


def test_knn_kth_normalised_distance():
    model = Affine([[1, 0], [0, 1]], [0, 0])
    bank = [[1, 0], [0, 1], [1, 1]]  # normalised: e1, e2, (e1 + e2) / sqrt 2
    query = [[2, 0], [0, 0]]         # unit e1; the zero vector stays zero (cosine 0 to all)
    assert conf(fitted("knn", model, bank, k=1), query).tolist() == pytest.approx([0.0, -math.sqrt(2)], abs=1e-6)
    assert conf(fitted("knn", model, bank, k=2), query).tolist() == pytest.approx(
        [-math.sqrt(2 - math.sqrt(2)), -math.sqrt(2)], abs=1e-6)
    assert conf(fitted("knn", model, bank, k=3), query)[0].item() == pytest.approx(-math.sqrt(2), abs=1e-6)
    with pytest.raises(ValueError, match="KNN k = 4 exceeds the 3 training features"):
        fitted("knn", model, bank, k=4)
    assert DETECTORS["knn"](model).k == 50


def test_chunked_top_k_equals_a_full_sort(monkeypatch):
    monkeypatch.setattr(training_stats, "KNN_BLOCK", 7)  # chunks of one bank row at a time for 7 queries
    queries, bank = torch.randn(7, 5), torch.randn(23, 5)
    expected = (queries @ bank.T).sort(dim=1, descending=True).values[:, :4]
    assert torch.allclose(topk_similarities(queries, bank, 4), expected)


def test_vim_by_hand():
    model = Affine([[1, 0, 0], [0, 1, 0]], [1, -1])  # pinv(W) = W^T, so u = -W^T b = (-1, 1, 0)
    u = torch.tensor([-1.0, 1.0, 0.0])
    centred = torch.tensor([[2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.5], [0, 0, -0.5]])
    detector = fitted("vim", model, centred + u, dim=2)
    # covariance diag(8, 2, 0.5) / 6: residual space e3; residual norms 0,0,0,0,.5,.5 (mean 1/6);
    # logits W z + b = the first two centred coordinates: max 2, 0, 1, 0, 0, 0 (mean 1/2); alpha = 3
    assert detector.alpha == pytest.approx(3.0)
    assert torch.allclose(detector.origin, u.double())
    # z = u + (1, 0, 2): logits (1, 0), residual 2
    assert conf(detector, [[0.0, 1.0, 2.0]]).item() == pytest.approx(math.log(1 + math.e) - 6, abs=1e-6)
    assert fitted("vim", model, centred + u, dim=2, alpha=1.0).alpha == 1.0
    with pytest.raises(ValueError, match="ViM dim = 3 leaves no residual space"):
        fitted("vim", model, centred + u, dim=3)
    assert fitted("vim", model, centred + u).dim == 1  # half of 3 features


def test_gen_by_hand():
    model = Affine([[1, 0], [0, 1]], [0, 0])
    z = [[0.0, math.log(3)]]  # softmax (1/4, 3/4)
    assert conf(DETECTORS["gen"](model, g=0.5), z).item() == pytest.approx(-math.sqrt(3) / 2, abs=1e-6)
    assert conf(DETECTORS["gen"](model, g=0.5, M=1), z).item() == pytest.approx(-math.sqrt(3) / 4, abs=1e-6)
    default = DETECTORS["gen"](model)
    assert (default.g, default.M) == (0.1, None)
    assert conf(default, z).item() == pytest.approx(-2 * (0.25 * 0.75) ** 0.1, abs=1e-6)


def test_fdbd_by_hand():
    model = Affine([[1, 0], [0, 1], [0, 0]], [0, 0, 0])
    detector = fitted("fdbd", model, [[1, 1], [3, 3]])  # training mean (2, 2)
    # z = (3, 1): logits (3, 1, 0), yhat = 0; |f0 - f1| / ||w0 - w1|| = 2 / sqrt 2, |f0 - f2| / ||w0 - w2|| = 3
    expected = (math.sqrt(2) + 3) / 2 / math.sqrt(2)
    assert conf(detector, [[3, 1]]).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="identical last-layer weights"):
        fitted("fdbd", Affine([[1, 0], [1, 0]], [0, 1]), [[1, 1], [3, 3]])


def test_nnguide_by_hand():
    model = Affine([[1, 0], [0, 1]], [0, 0])
    e1, e2 = math.log(math.e ** 2 + 1), math.log(1 + math.e)  # energies of the bank features (2, 0), (0, 1)
    eq = math.log(math.e ** 3 + math.e ** 4)                     # energy of the query (3, 4), unit (0.6, 0.8)
    bank = [[2, 0], [0, 1]]
    assert conf(fitted("nnguide", model, bank, k=1), [[3, 4]]).item() == pytest.approx(eq * 0.6 * e1, rel=1e-6)
    assert conf(fitted("nnguide", model, bank, k=2), [[3, 4]]).item() == pytest.approx(
        eq * (0.6 * e1 + 0.8 * e2) / 2, rel=1e-6)
    assert DETECTORS["nnguide"](model).k == 100


def _numpy_mahalanobis(train, labels, test):
    """-min_c squared distance with sklearn's EmpiricalCovariance of the class-centred features."""
    means = np.stack([train[labels == c].mean(0) for c in np.unique(labels)])
    precision = EmpiricalCovariance(assume_centered=True).fit(train - means[labels]).precision_
    diff = test[:, None, :] - means[None]
    return np.einsum("ncf,fg,ncg->nc", diff, precision, diff)


@pytest.fixture
def gaussian_case():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    train = rng.normal(size=(60, 4)) * [1, 2, 0.5, 1] + np.eye(3, 4)[labels] * 3
    test = rng.normal(size=(9, 4)) * 2
    return Affine(np.ones((3, 4)) * np.arange(3)[:, None], [0, 1, 2]), train, labels, test


def test_mahalanobis_plus_plus_equals_sklearn_on_normalised_features(gaussian_case):
    model, train, labels, test = gaussian_case
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = -_numpy_mahalanobis(unit(train), labels, unit(test)).min(1)
    detector = fitted("mahalanobis++", model, train, labels)
    assert np.allclose(conf(detector, test).numpy(), expected, atol=1e-4)
    # the score only sees the direction of the feature
    assert torch.allclose(conf(detector, 7.5 * test), conf(detector, test), atol=1e-6)


def test_rmds_equals_class_minus_background_distance(gaussian_case):
    model, train, labels, test = gaussian_case
    classes = _numpy_mahalanobis(train, labels, test)
    background = _numpy_mahalanobis(train, np.zeros_like(labels), test)[:, 0]
    expected = -(classes - background[:, None]).min(1)
    assert np.allclose(conf(fitted("rmds", model, train, labels), test).numpy(), expected, atol=1e-4)


def test_head_parameters_probe_and_refuse():
    weight, bias = torch.randn(3, 5), torch.randn(3)
    model = Affine(weight, bias)
    got = head_parameters(model, 5)
    assert torch.equal(got[0], model.fc.weight) and torch.equal(got[1], model.fc.bias)
    # an affine head without one matching Linear (two stacked) is read off by probing
    model.fc = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    w, b = head_parameters(model, 5)
    z = torch.randn(6, 5)
    assert torch.allclose(z @ w.T + b, model.head(z), atol=1e-5)
    model.fc = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="head is not affine"):
        head_parameters(model, 5)


def test_every_new_detector_is_registered_and_validates_options():
    assert list(RECENT_DETECTORS) == ["react", "ash", "scale", "knn", "vim", "gen", "fdbd", "nnguide",
                                      "mahalanobis++", "rmds"]
    assert all(DETECTORS[name] is cls and not cls.needs_grad for name, cls in RECENT_DETECTORS.items())
    model = Affine([[1, 0]], [0])
    for name, options, message in [("react", {"p": 120}, "ReAct p must lie in"), ("knn", {"k": 0}, "KNN k must"),
                                   ("gen", {"M": 1.5}, "GEN M must"), ("scale", {"p": -1}, "SCALE p must")]:
        with pytest.raises(ValueError, match=message):
            DETECTORS[name](model, **options)
    with pytest.raises(RuntimeError, match="KNN is not fitted"):
        DETECTORS["knn"](model).confidence(torch.ones(1, 2))


def test_evaluate_runs_every_new_detector_and_auroc_equals_sklearn(tmp_path):
    runs = tmp_path / "runs"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--epochs", "1", "--runs-root", str(runs), "--no-progress"]))
    names = [name for name in RECENT_DETECTORS]
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs", str(runs / "digits" / "plain-s0"), "--detectors", ",".join(names),
         "--results-root", str(tmp_path / "results"), "--ood", "uniform", "--n-ood", "100", "--table-name", "t",
         "--no-progress", "--no-print"]))
    rows = [json.loads(line) for line in (tmp_path / "results" / "ood" / "digits_adhoc_t.jsonl").read_text()
            .splitlines()]
    assert sorted(r["detector"] for r in rows) == sorted(names)
    for row in rows:
        cache = np.load(next((tmp_path / "results" / "scores" / "digits").glob(
            f"plain-s0__plain-s0:{row['detector']}__{row['detector']}__*.npz")))
        assert np.isfinite(cache["in"]).all() and np.isfinite(cache["uniform"]).all()
        labels = np.r_[np.ones(len(cache["in"])), np.zeros(len(cache["uniform"]))]
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[cache["in"], cache["uniform"]]),
                                             abs=1e-12), row["detector"]


def test_detectors_of_one_run_share_one_pass_over_the_training_set():
    """evaluation fits each detector with its own DataLoader over the same training set: one pass in all."""
    from torch.utils.data import DataLoader, TensorDataset

    training_stats.clear_cache()
    model = Affine(torch.randn(3, 4), torch.randn(3))
    calls, features = [], model.features
    model.features = lambda x: calls.append(1) or features(x)  # counts the passes over data
    dataset = TensorDataset(torch.rand(12, 4), torch.arange(12) % 3)
    for name in ("react", "knn", "vim", "fdbd", "rmds"):
        DETECTORS[name](model, **({"k": 3} if name == "knn" else {})).fit(DataLoader(dataset, batch_size=5))
    assert len(calls) == 3  # three batches, once
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # the model changed in place: its outputs are collected again
    detector = DETECTORS["fdbd"](model).fit(DataLoader(dataset, batch_size=5))
    assert len(calls) == 6 and torch.equal(detector.weight, model.fc.weight)
    DETECTORS["react"](model).fit(DataLoader(TensorDataset(*dataset.tensors), batch_size=5))  # other data
    assert len(calls) == 9
