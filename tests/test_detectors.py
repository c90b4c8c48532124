"""The whole DETECTORS registry: formulas of the logit scores, and the shared forward pass of evaluation giving
exactly what each detector computes on its own."""
import pytest
import torch
from torch.utils.data import TensorDataset

import models
from utils.detectors import DETECTORS, get_detector_class
from utils.scoring import score_dataset

STOCHASTIC = {"mcdropout"}
OPTIONS = {"mcdropout": {"samples": 3}, "odin": {"temperature": 10.0, "eps": 0.002},
           "knn": {"k": 5}, "nnguide": {"k": 5}}  # 40 training points: fewer than the default k


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = models.build_model({"arch": "lenet", "num_classes": 4, "in_channels": 1, "input_size": 8, "dropout": 0.3})
    return net.eval()


def test_logit_scores_match_their_formulas(model):
    x = torch.rand(16, 1, 8, 8)
    logits = model(x)
    probs = logits.softmax(1)
    expected = {"msp": probs.max(1).values, "maxlogit": logits.max(1).values,
                "energy": torch.logsumexp(logits, 1), "entropy": (probs * probs.log()).sum(1)}
    for name, value in expected.items():
        assert torch.allclose(DETECTORS[name](model).confidence(x), value, atol=1e-6), name
    assert torch.allclose(DETECTORS["energy"](model, temperature=2.0).confidence(x),
                          2.0 * torch.logsumexp(logits / 2.0, 1), atol=1e-6)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_shared_pass_equals_each_detector_alone(model, name):
    """evaluate.py feeds every gradient-free detector from one forward pass; the result must not change."""
    torch.manual_seed(1)
    x = torch.rand(40, 1, 8, 8)
    y = torch.randint(0, 4, (40,))
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    detector = get_detector_class(name)([model, model] if name == "ensemble" else model, **OPTIONS.get(name, {}))
    detector.fit(loader)
    torch.manual_seed(2)
    alone = torch.cat([detector.confidence(x[:20]), detector.confidence(x[20:])]).detach().double()
    torch.manual_seed(2)
    shared_model = None if name == "ensemble" else model
    scores = score_dataset(shared_model, {"k": detector}, TensorDataset(x, y), 20, torch.device("cpu"),
                           progress=False)
    assert scores.confidences["k"].shape == (40,)
    assert torch.isfinite(scores.confidences["k"]).all()
    if name in STOCHASTIC:  # the DataLoader draws from the global RNG, so compare two shared passes instead
        torch.manual_seed(2)
        again = score_dataset(shared_model, {"k": detector}, TensorDataset(x, y), 20, torch.device("cpu"),
                              progress=False)
        assert torch.equal(again.confidences["k"], scores.confidences["k"])
        assert not torch.allclose(alone, detector.confidence(x).double())  # it is stochastic indeed
    else:
        assert torch.allclose(scores.confidences["k"], alone, atol=1e-5), name
    assert torch.allclose(scores.probs.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-5)


def test_unknown_detector_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown detector 'nope'; valid: .*energy.*msp"):
        get_detector_class("nope")
