"""DDU (arXiv 2102.11582): GDA log-densities, jitter search, scores' sign, temperature scaling, ECE,
aggregation over runs, Dirty-MNIST's multi-label expansion, active-learning acquisition."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from utils.calibration import TEMPERATURE_GRID, fit_temperature
from utils.ddu_summary import (classification_metrics, ddu_table, make_row, score_names, summarize, summary,
                               write_summaries)
from utils.detectors.ddu import DDU, DDU_DETECTORS, SCORES, JitterError, default_jitters, jittered_cholesky
from utils.metrics import auroc, ece, nll


class FeatureNet(nn.Module):
    """features = x itself (so tests control the features exactly), head = a fixed linear map."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _blobs(n_per_class: int, centres: torch.Tensor, scale: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dim = centres.shape[1]
    mixing = torch.randn(len(centres), dim, dim, generator=generator, dtype=torch.float64)
    x = torch.cat([centres[c] + scale * torch.randn(n_per_class, dim, generator=generator, dtype=torch.float64)
                   @ mixing[c] for c in range(len(centres))])
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return x, y


def test_class_log_density_equals_scipy_logpdf():
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 0.0], [-3.0, 4.0, 0.0, 1.0]], dtype=torch.float64)
    x, y = _blobs(40, centres)
    ddu = DDU(FeatureNet(4, 3)).fit_features(x, y, num_classes=3)
    assert ddu.jitter_ == 0.0  # full-rank covariances need no jitter
    queries = torch.randn(25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    ours = ddu.class_log_densities(queries).numpy()
    for c in range(3):
        features = x[y == c].numpy()
        expected = multivariate_normal(features.mean(0), np.cov(features.T, ddof=1)).logpdf(queries.numpy())
        np.testing.assert_allclose(ours[:, c], expected, rtol=1e-10, atol=1e-9)
    # density = LSE_c l_c with equal priors; with class priors log pi_c is added (here pi_c = 1/3)
    np.testing.assert_allclose(ddu.from_outputs(queries, queries[:, :3]).numpy(),
                               torch.logsumexp(torch.as_tensor(ours), 1).numpy(), rtol=1e-12)
    with_priors = DDU(FeatureNet(4, 3), priors="class").fit_features(x, y)
    np.testing.assert_allclose(with_priors.from_outputs(queries, queries[:, :3]).numpy(),
                               torch.logsumexp(torch.as_tensor(ours), 1).numpy() - math.log(3), rtol=1e-12)


def test_jitter_search_recovers_rank_deficient_covariance():
    # 6-d features that live on a 2-d plane: every class covariance is singular (rank 2)
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    y = torch.arange(2).repeat_interleave(30)
    x = (torch.randn(60, 2, generator=generator, dtype=torch.float64) + 4 * y[:, None]) @ basis
    ddu = DDU(FeatureNet(6, 2)).fit_features(x, y)
    assert ddu.jitter_ > 0.0
    ladder = default_jitters()
    assert ddu.jitter_ in ladder
    # it is the first rung that works: the rung below still fails to factorise some class covariance
    covariances = torch.stack([torch.cov(x[y == c].T) for c in range(2)])
    previous = ladder[ladder.index(ddu.jitter_) - 1]
    assert (torch.linalg.cholesky_ex(covariances + previous * torch.eye(6, dtype=torch.float64))[1] != 0).any()
    densities = ddu.class_log_densities(x)
    assert torch.isfinite(densities).all()
    # scipy calls a matrix of condition ~1e15 singular, and at that condition the log-determinant is only
    # defined up to rounding of the covariance itself, so compare with the original's own construction,
    # torch's MultivariateNormal on Sigma + eps I (the same Cholesky, an independent log_prob)
    reference = torch.distributions.MultivariateNormal(
        x[y == 1].mean(0), covariance_matrix=covariances[1] + ddu.jitter_ * torch.eye(6, dtype=torch.float64))
    np.testing.assert_allclose(densities[:, 1].numpy(), reference.log_prob(x).numpy(), rtol=1e-9)


def test_jitter_ladder_keeps_the_originals_order():
    # a zero-variance feature: eps = 0 fails, float64 tiny (2.2e-308) and the smaller subnormal 1e-308 both work;
    # the original scans 0, tiny, 1e-308, ... and so takes tiny, not the numerically smaller 1e-308
    tiny = torch.finfo(torch.float64).tiny
    assert default_jitters()[:3] == [0.0, tiny, 1e-308]
    _, eps = jittered_cholesky(torch.zeros(1, 1, 1, dtype=torch.float64))
    assert eps == tiny
    # a rank-deficient covariance that every positive rung fixes: the first in the given order wins
    singular = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    cholesky, eps = jittered_cholesky(singular, [0.0, 1e-1, 1e-3])
    assert eps == 1e-1
    torch.testing.assert_close(cholesky[0] @ cholesky[0].T, singular[0] + 0.1 * torch.eye(2, dtype=torch.float64))


def test_jitter_search_all_fail_raises_clear_error():
    # huge rank-deficient features (the reported ResNet-18 failure, DDU issue #4): the covariance's rounding
    # error (~1e-16 * 1e24) dwarfs every jitter on the ladder, so nothing factorises
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    good = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    huge = 1e12 * torch.randn(20, 2, generator=generator, dtype=torch.float64) @ basis
    x, y = torch.cat([good, huge]), torch.arange(2).repeat_interleave(20)
    with pytest.raises(JitterError, match=r"classes \[1\] .* largest jitter tried, 0.1 \* I"):
        DDU(FeatureNet(6, 2)).fit_features(x, y)
    with pytest.raises(JitterError, match=r"classes \[0, 1\] .* 1e-300"):
        DDU(FeatureNet(6, 2), jitters=[0.0, 1e-300]).fit_features(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match=r"classes \[1\] have \[1\]"):
        DDU(FeatureNet(3, 2)).fit_features(x[:21], y[:21])
    with pytest.raises(ValueError, match="valid: density, gmm_entropy, softmax_entropy"):
        DDU(FeatureNet(3, 2), score="mahalanobis")


def test_scores_are_higher_in_distribution_on_toy_features():
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    x, y = _blobs(100, centres, scale=0.5)
    model = FeatureNet(2, 2).double()
    x_in, _ = _blobs(50, centres, scale=0.5, seed=1)
    x_far = torch.tensor([[0.0, 25.0], [40.0, 40.0], [-30.0, 5.0]], dtype=torch.float64).repeat(10, 1)
    density = DDU(model, "density").fit_features(x, y)
    conf_in = density.from_outputs(x_in, model(x_in))
    conf_out = density.from_outputs(x_far, model(x_far))
    assert auroc(conf_in, conf_out) == 1.0
    assert conf_in.min() > conf_out.max()
    # entropies are negated: a point between the classes is less confident than one inside a class
    between, inside = torch.tensor([[0.0, 0.0]], dtype=torch.float64), centres[:1]
    gmm_entropy = DDU(model, "gmm_entropy").fit_features(x, y)
    assert gmm_entropy.from_outputs(inside, model(inside)) > gmm_entropy.from_outputs(between, model(between))
    softmax = DDU(model, "softmax_entropy")
    logits = torch.tensor([[8.0, 0.0], [0.1, 0.0]])
    scores = softmax.from_outputs(logits, logits)
    assert scores[0] > scores[1]
    assert scores[1].item() == pytest.approx(-math.log(2), abs=1e-2)
    assert torch.all(softmax.from_outputs(logits, torch.tensor([[1000.0, -1000.0]])) == 0.0)  # 0 log 0 = 0


def test_fit_from_loader_matches_fit_features():
    centres = torch.tensor([[1.0, 2.0, 0.0], [-2.0, 0.0, 1.0], [0.0, -3.0, 3.0]])
    x, y = _blobs(30, centres.double())
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=16)
    for name, detector_class in DDU_DETECTORS.items():
        for score in SCORES:
            detector = detector_class(FeatureNet(3, 3), score=score).fit(loader)
            reference = DDU(FeatureNet(3, 3), score=score).fit_features(x.float().double(), y)
            conf = detector.confidence(x.float())
            assert conf.shape == (90,), name
            if score != "softmax_entropy":
                torch.testing.assert_close(detector.means_, reference.means_)
                torch.testing.assert_close(conf, reference.from_outputs(x.float(), conf[:, None]))


def test_ece_hand_computed():
    # confidences 0.95 (right), 0.95 (wrong) -> bin 14; 0.55 (right) -> bin 8; 0.70 (right) -> bin 10
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.30, 0.70]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    expected = 2 / 4 * abs(0.5 - 0.95) + 1 / 4 * abs(1 - 0.55) + 1 / 4 * abs(1 - 0.70)
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    metrics = classification_metrics(torch.log(probs), labels, temperature=1.0)
    assert metrics["ece"] == pytest.approx(expected, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(0.75) and metrics["t_ece"] == metrics["ece"]


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    calibrated = 2.0 * torch.randn(4000, 5, generator=generator)
    labels = torch.multinomial(calibrated.softmax(1), 1, generator=generator).squeeze(1)
    overconfident = 4.0 * calibrated  # the true temperature is 4
    temperature = fit_temperature(overconfident, labels)
    assert temperature in TEMPERATURE_GRID and len(TEMPERATURE_GRID) == 100
    assert 3.5 <= temperature <= 4.5
    before = nll(overconfident.softmax(1), labels)
    after = nll((overconfident / temperature).softmax(1), labels)
    assert after < before - 0.5
    # the grid optimum: no grid temperature does better
    assert all(nll((overconfident / t).softmax(1), labels) >= after - 1e-12 for t in TEMPERATURE_GRID)


def _rows():
    rows = []
    for seed, (acc, auc) in enumerate([(0.95, 0.90), (0.96, 0.94), (0.97, 0.92)]):
        metrics = {"accuracy": acc, "ece": 0.01 * (seed + 1), "t_accuracy": acc, "t_ece": 0.005, "temperature": 1.5}
        for ood, shift in (("SVHN", 0.0), ("noise", 0.05)):
            rows.append(make_row("CIFAR10", "DDU", f"sn-s{seed}", seed, ood, "softmax entropy", "GMM density",
                                 metrics, auc + shift, auc + shift))
    return rows


def test_summarize_is_mean_and_standard_error():
    values = [0.9, 0.94, 0.92, 0.97, 0.95]
    stats = summarize(values)
    assert set(stats) == {"mean", "std", "values", "n"}
    assert stats["n"] == 5 and stats["values"] == values
    assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-15)
    assert stats["std"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(5), abs=1e-15)
    assert summarize([0.5])["std"] is None


def test_summary_json_and_table(tmp_path: Path):
    rows = _rows()
    paths = write_summaries(rows, tmp_path)
    assert paths == [tmp_path / "CIFAR10_DDU.json"]
    result = json.loads(paths[0].read_text())
    assert set(result) == {"accuracy", "ece", "t_accuracy", "t_ece", "auroc", "t_auroc", "info"}
    assert result["accuracy"]["values"] == [0.95, 0.96, 0.97]  # one value per run, not per OOD row
    assert result["accuracy"]["std"] == pytest.approx(0.01 / math.sqrt(3))
    assert result["auroc"]["noise"]["score"] == "GMM density"
    assert result["auroc"]["noise"]["mean"] == pytest.approx(0.97)
    assert result["info"]["seeds"] == [0, 1, 2] and result["info"]["runs"][0] == "sn-s0"
    assert summary(rows)["ece"]["mean"] == pytest.approx(0.02)
    table = ddu_table(rows)
    assert "### CIFAR10 vs SVHN" in table and "### CIFAR10 vs noise" in table
    # accuracy 96.00 +- 100 * 0.01 / sqrt(3) = 0.58; ECE 2.00 +- 0.58; AUROC 92.00 +- 1.15
    assert "| DDU | softmax entropy | GMM density | 96.00±0.58 | 2.00±0.58 | 92.00±1.15 |" in table
    with pytest.raises(ValueError, match="lacks"):
        ddu_table([{"run": "x"}])
    assert score_names("ddu") == ("softmax entropy", "GMM density")
    assert score_names("ensemble", {"score": "entropy"}) == ("predictive entropy", "predictive entropy")
    assert score_names("energy", {"temperature": 1.0}) == ("softmax entropy", "softmax density (logsumexp)")


def _fake_amnist(root: Path, n_images: int = 6002, labels_per_image: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    from data.dirty_mnist import amnist_paths
    generator = torch.Generator().manual_seed(0)
    samples = torch.rand(n_images, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (n_images, labels_per_image), generator=generator)
    samples_path, labels_path = amnist_paths(root)
    samples_path.parent.mkdir(parents=True)
    torch.save(samples, samples_path)
    torch.save(labels, labels_path)
    return samples, labels


def test_ambiguous_mnist_multi_label_expansion(tmp_path: Path):
    from data.dirty_mnist import AmbiguousMNIST
    with pytest.raises(FileNotFoundError, match=r"AmbiguousMNIST/amnist_samples.pt and .*amnist_labels.pt"):
        AmbiguousMNIST(tmp_path, "train")
    samples, labels = _fake_amnist(tmp_path)
    train, test = AmbiguousMNIST(tmp_path, "train"), AmbiguousMNIST(tmp_path, "test")
    assert len(train) == 60_000 and len(test) == 6002 * 10 - 60_000
    x, y = train[12_345]  # image 1234, its 6th label
    assert torch.equal(x, samples[1234]) and int(y) == int(labels[1234, 5]) and x.dtype == torch.float32
    x, y = test[3]        # the test split starts at expanded item 60 000 = image 6000
    assert torch.equal(x, samples[6000]) and int(y) == int(labels[6000, 3])
    assert torch.equal(train.targets, labels.reshape(-1)[:60_000])


def test_dirty_mnist_concatenates_mnist_and_ambiguous(tmp_path: Path, shared_data: Path):
    from data.dirty_mnist import dirty_mnist
    (tmp_path / "MNIST").symlink_to(shared_data / "MNIST")
    samples, labels = _fake_amnist(tmp_path)
    train, test = dirty_mnist("train", tmp_path), dirty_mnist("test", tmp_path)
    assert len(train) == 120_000 and len(test) == 10_000 + 20
    x, y = train[60_000 + 7]
    assert torch.equal(x, samples[0]) and int(y) == int(labels[0, 7])
    assert x.shape == train[0][0].shape == (1, 28, 28) and 0.0 <= float(train[0][0].min()) <= 1.0
    assert int(train.targets[60_000 + 7]) == int(labels[0, 7]) and len(train.targets) == 120_000


def test_active_learning_acquisition_rules():
    from active_learning import acquire, initial_indices
    targets = torch.arange(10).repeat(20)              # 200 samples, 20 per class
    pool = torch.arange(200)
    ambiguous = torch.zeros(200, dtype=torch.bool)
    ambiguous[100:] = True                             # the initial set comes from the clean part only
    chosen = initial_indices(pool, targets, ambiguous, 20, 10, seed=0)
    assert torch.equal(torch.bincount(targets[chosen], minlength=10), torch.full((10,), 2))
    assert (chosen < 100).all() and len(set(chosen.tolist())) == 20
    confidences = torch.tensor([0.5, -3.0, 2.0, -1.0, 7.0])
    assert sorted(acquire(confidences, 2).tolist()) == [1, 3]  # the two lowest confidences
    assert len(acquire(confidences, 10)) == 5
