"""utils.metrics against scikit-learn, hand-computed cases, and defined behaviour on degenerate input."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from utils import metrics


@pytest.mark.parametrize("seed", range(5))
def test_ood_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    conf_in = rng.normal(1.0, 1.0, size=300 + seed)
    conf_out = rng.normal(0.0, 1.0, size=200)
    result = metrics.ood_metrics(conf_in, conf_out)
    labels = np.r_[np.ones(conf_in.size), np.zeros(conf_out.size)]
    scores = np.r_[conf_in, conf_out]
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["aupr_in"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["aupr_out"] == pytest.approx(average_precision_score(1 - labels, -scores), abs=1e-12)
    # FPR@95 "id" is ACET's percentile rule; "id_achievable" by brute force over thresholds from the data
    assert result["fpr95"] == pytest.approx(np.mean(conf_out >= np.percentile(conf_in, 5)))
    thresholds = np.sort(conf_in)[::-1]
    tau = next(t for t in thresholds if np.mean(conf_in >= t) >= 0.95)
    assert metrics.fpr_at_95_tpr(conf_in, conf_out, "id_achievable") == pytest.approx(np.mean(conf_out >= tau))
    errors = [0.5 * np.mean(conf_in < t) + 0.5 * np.mean(conf_out >= t) for t in np.r_[scores, np.inf]]
    assert result["detection_error"] == pytest.approx(min(errors))


def test_fpr_conventions_hand_computed():
    # 20 in-distribution scores 1..20, 10 OOD scores 0.5..9.5
    conf_in = np.arange(1, 21, dtype=float)
    conf_out = np.arange(10, dtype=float) + 0.5
    # "id": keep >= 95% of in (19 of 20) -> threshold 2; OOD accepted (>= 2): 2.5..9.5 = 8 of 10
    assert metrics.fpr_at_95_tpr(conf_in, conf_out, "id") == pytest.approx(0.8)
    # "ood": catch >= 95% of OOD (all 10 here, 9.5 is the lowest threshold doing so at >= 0.95) -> in-distribution
    # samples with conf <= 9.5 are rejected: 1..9 = 9 of 20
    assert metrics.fpr_at_95_tpr(conf_in, conf_out, "ood") == pytest.approx(0.45)


def test_fpr_id_is_acets_interpolated_percentile():
    # in 1..20: np.percentile(., 5) = 1 + 0.05 * 19 = 1.95 (linear interpolation), not an observed score.
    # An OOD score of 1.96 is accepted by ACET's rule (>= 1.95) but rejected at the achievable threshold 2.
    conf_in = np.arange(1, 21, dtype=float)
    conf_out = np.array([1.96, 0.5, 0.7, 2.5])
    assert metrics.fpr_at_95_tpr(conf_in, conf_out, "id") == pytest.approx(2 / 4)
    assert metrics.fpr_at_95_tpr(conf_in, conf_out, "id_achievable") == pytest.approx(1 / 4)
    assert metrics.ood_metrics(conf_in, conf_out)["fpr95"] == pytest.approx(2 / 4)


def test_ties_and_constant_scores():
    constant = metrics.ood_metrics(np.ones(50), np.ones(70))
    assert constant["auroc"] == 0.5
    assert constant["fpr95"] == 1.0  # everything is accepted at the only threshold
    assert constant["detection_error"] == pytest.approx(0.5)
    tied = metrics.auroc([1.0, 2.0], [1.0, 0.0])  # pairs: (1>1 tie .5) (1>0) (2>1) (2>0)
    assert tied == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("bad", [[np.nan, 1.0], [np.inf, 0.0]])
def test_nan_and_inf_are_named(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.ood_metrics(np.array(bad), np.zeros(3))


def test_empty_sets_are_named():
    with pytest.raises(ValueError, match="conf_out is empty"):
        metrics.ood_metrics(np.ones(3), [])
    with pytest.raises(ValueError, match="unknown FPR convention"):
        metrics.fpr_at_95_tpr([1.0], [0.0], "tpr")


def test_ece_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.58, 0.42], [0.55, 0.45], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins of width 1/15: 0.9 -> bin 13 (acc 1), 0.58 and 0.55 -> bin 8 ((8/15, 9/15]: 0.5333..0.6), 1.0 -> bin 14
    expected = (abs(1 - 0.9) + abs(1 - (0.58 + 0.55)) + abs(1 - 1.0)) / 4
    assert metrics.ece(probs, labels) == pytest.approx(expected)
    # a confidence of 0 cannot occur for a max over a distribution, but the binning must not index bin -1
    assert metrics.ece(torch.tensor([[0.0, 0.0]]), torch.tensor([1])) == pytest.approx(0.0)


def test_mmc_accuracy_nll():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    assert metrics.mmc(probs) == pytest.approx(0.75)
    assert metrics.mmc(torch.tensor([0.7, 0.8])) == pytest.approx(0.75)
    assert metrics.accuracy(probs, torch.tensor([0, 0])) == 0.5
    assert metrics.nll(probs, torch.tensor([0, 1])) == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2)
