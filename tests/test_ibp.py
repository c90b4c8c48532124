"""utils/ibp.py: interval bounds hold (sampling and PGD inside the box), are exact for affine maps, collapse at
eps = 0, the elided last layer is never looser than per-logit bounds, unsupported layers are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import MODELS
from models.common import Normalize
from utils.attacks import pgd_maximize
from utils.ibp import (UnsupportedLayerError, confidence_upper_bound, input_box, interval_bounds,
                       layer_sequence, log_confidence_bound_from_differences, logit_difference_bounds)


def _randomise_batch_norm(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, -1.5, 1.5)  # negative scales too: |scale| must be used
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return net.eval()


def _conv_net() -> nn.Module:
    """Every supported layer type in one network: (N, 2, 8, 8) -> (N, 5)."""
    return _randomise_batch_norm(nn.Sequential(
        Normalize([0.3, 0.6], [0.2, 0.4]), nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Conv2d(6, 6, 1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(7, 5)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 9), nn.LeakyReLU(0.2),
                         nn.Linear(9, 4))


CASES = {"conv": (_conv_net, (2, 8, 8)), "mlp": (_mlp, (12,))}


def _box_samples(lower: torch.Tensor, upper: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of the box per item: uniform inside, a quarter of them on random vertices."""
    shape = (n, *lower.shape[1:])
    u = torch.rand(shape, generator=generator, dtype=lower.dtype)
    u[: n // 4] = (u[: n // 4] > 0.5).to(lower.dtype)
    return lower + u * (upper - lower)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_and_attacked_points_stay_within_the_bounds(case):
    build, shape = CASES[case]
    torch.manual_seed(1)
    net = build().double()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, *shape, generator=generator, dtype=torch.float64)
    eps = 0.15
    lower, upper = input_box(x, eps)
    out_lower, out_upper = interval_bounds(net, lower, upper)
    for i in range(len(x)):
        points = _box_samples(lower[i:i + 1], upper[i:i + 1], 10_000 // len(x), generator)
        with torch.no_grad():
            out = net(points)
        assert (out >= out_lower[i] - 1e-9).all() and (out <= out_upper[i] + 1e-9).all()
    for j in range(out_upper.shape[1]):  # PGD on each output, both directions
        for sign in (1.0, -1.0):
            x_adv, score = pgd_maximize(net, x, lambda o: sign * o[:, j], eps, steps=30, step_size=eps / 10)
            assert ((x_adv - x).abs() <= eps + 1e-12).all() and (x_adv >= 0).all() and (x_adv <= 1).all()
            limit = out_upper[:, j] if sign > 0 else -out_lower[:, j]
            assert (score <= limit + 1e-9).all()
    assert (out_upper - out_lower).min() >= 0


def _affine_upper_by_vertex(net: nn.Module, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Each output's true maximum over the box: the vertex that follows the sign of its input gradient."""
    maxima = []
    flat_out = net(x).flatten(1)
    for j in range(flat_out.shape[1]):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(xg).flatten(1)[:, j].sum(), xg)
        vertex = torch.where(grad > 0, upper, lower)
        maxima.append(net(vertex).flatten(1)[:, j].detach())
    return torch.stack(maxima, dim=1)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bounds_are_exact_for_an_affine_network(kind):
    torch.manual_seed(2)
    if kind == "conv":  # diagonal maps around one conv keep the box image exact
        net = _randomise_batch_norm(nn.Sequential(Normalize([0.5], [0.3]), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)))
        x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    else:
        net = _randomise_batch_norm(nn.Sequential(Normalize([0.2] * 6, [0.5] * 6), nn.Linear(6, 4), nn.BatchNorm1d(4)))
        x = torch.rand(2, 6, dtype=torch.float64)
    net = net.double()
    lower, upper = input_box(x, 0.1)
    _, out_upper = interval_bounds(net, lower, upper)
    assert torch.allclose(out_upper.flatten(1), _affine_upper_by_vertex(net, x, lower, upper), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_eps_gives_equal_bounds_at_the_forward_pass(case):
    build, shape = CASES[case]
    net = build().double()
    x = torch.rand(4, *shape, dtype=torch.float64)
    out_lower, out_upper = interval_bounds(net, *input_box(x, 0.0))
    with torch.no_grad():
        expected = net(x)
    assert torch.allclose(out_lower, expected, rtol=0, atol=1e-12)
    assert torch.allclose(out_upper, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_elision_is_never_looser_than_bounding_each_logit(case):
    build, shape = CASES[case]
    torch.manual_seed(3)
    net = build().double()
    x = torch.rand(16, *shape, dtype=torch.float64)
    lower, upper = input_box(x, 0.2)
    ud = logit_difference_bounds(net, lower, upper)
    logit_lower, logit_upper = interval_bounds(net, lower, upper)
    naive = logit_upper[:, :, None] - logit_lower[:, None, :]
    naive = naive - torch.diag_embed(torch.diagonal(naive, dim1=1, dim2=2))  # f_k - f_k = 0
    assert (ud <= naive + 1e-10).all()
    assert (ud < naive - 1e-6).any()  # and strictly tighter somewhere
    with torch.no_grad():  # the differences of the sampled points stay below ud
        points = _box_samples(lower[:1], upper[:1], 2000, torch.Generator().manual_seed(0))
        logits = net(points)
    assert ((logits[:, :, None] - logits[:, None, :]) <= ud[0] + 1e-9).all()
    # the confidence bound from ud is >= every sampled confidence
    conf_bound = log_confidence_bound_from_differences(ud[:1]).exp()
    assert (logits.softmax(1).amax(1) <= conf_bound + 1e-12).all()


# IBP widths grow about tenfold per layer of an untrained wide net: eps small enough for a non-trivial bound
@pytest.mark.parametrize("arch,shape,eps", [("lenet", (1, 8, 8), 1e-4), ("mlp", (1, 8, 8), 0.01),
                                            ("good_cnn_l", (1, 8, 8), 0.01)])
def test_confidence_upper_bound_holds_under_attack_for_registry_models(arch, shape, eps):
    torch.manual_seed(4)
    kwargs = {"width": 0.125} if arch.startswith("good") else {}
    model = MODELS[arch](num_classes=10, in_channels=1, input_size=8 if arch != "mlp" else shape, **kwargs).eval()
    x = torch.rand(8, *shape)
    bound = confidence_upper_bound(model, x, eps)
    assert bound.dtype == torch.float64 and (bound < 1).all()  # a real bound, not the trivial one
    _, log_conf = pgd_maximize(model, x, lambda o: o.log_softmax(1).amax(1), eps, steps=40, step_size=eps / 8)
    assert (log_conf.double().exp() <= bound + 1e-6).all()
    assert (confidence_upper_bound(model, x, 0.0) - model(x).softmax(1).amax(1).double()).abs().max() < 1e-5


def test_unsupported_layers_are_refused_and_the_model_gets_the_trivial_bound_only_when_asked():
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        interval_bounds(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(UnsupportedLayerError, match="eval mode"):
        interval_bounds(nn.Sequential(nn.BatchNorm1d(3)).train(), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(UnsupportedLayerError, match="not monotone"):
        interval_bounds(nn.LeakyReLU(-0.5), torch.zeros(1, 3), torch.ones(1, 3))
    resnet = MODELS["resnet_small"](num_classes=3, in_channels=3, input_size=8, units=1, widths=(4, 8, 16)).eval()
    with pytest.raises(UnsupportedLayerError, match="ResNetSmall: cannot bound function add in module 'stages.0.0'"):
        layer_sequence(resnet)
    with pytest.raises(UnsupportedLayerError, match="ResNetSmall"):  # no silent 1.0 a user reads as certified
        confidence_upper_bound(resnet, torch.rand(5, 3, 8, 8), 0.01)
    bound = confidence_upper_bound(resnet, torch.rand(5, 3, 8, 8), 0.01, trivial_ok=True)
    assert torch.equal(bound, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="lower <= upper"):
        interval_bounds(nn.ReLU(), torch.ones(1, 2), torch.zeros(1, 2))


def test_a_drifted_layer_sequence_is_refused_not_bounded(monkeypatch):
    model = MODELS["mlp"](num_classes=3, in_channels=1, input_size=6, widths=(5,)).eval()
    x = torch.rand(4, 6)
    assert (confidence_upper_bound(model, x, 0.01) < 1).all()
    # a sequence that skips the ReLU: same shapes, another function
    monkeypatch.setattr(model, "ibp_layers", lambda: [nn.Flatten(), model.body[0], model.fc], raising=False)
    with pytest.raises(UnsupportedLayerError, match="does not reproduce its forward pass"):
        confidence_upper_bound(model, x, 0.01)
    assert torch.equal(confidence_upper_bound(model, x, 0.01, trivial_ok=True), torch.ones(4, dtype=torch.float64))


class _OwnNames(nn.Module):
    """A ReLU chain of its own class and attribute names, with functional relu and a view (not models/)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 3, 3, padding=1)
        self.stack = nn.Sequential(nn.Sequential(nn.Linear(3 * 8 * 8, 16), nn.ReLU()))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_a(x))
        return self.out(self.stack(x.view(x.size(0), -1)))


def test_any_relu_chain_is_followed_whatever_its_names_and_a_list_of_layers_gives_the_same_bound():
    torch.manual_seed(0)
    model = _OwnNames().eval()
    x = torch.rand(6, 1, 8, 8)
    layers = [model.conv_a, nn.ReLU(), nn.Flatten(), model.stack[0][0], nn.ReLU(), model.out]
    assert [type(layer).__name__ for layer in layer_sequence(model)] == ["Conv2d", "ReLU", "Reshape", "Linear",
                                                                         "ReLU", "Linear"]
    bound = confidence_upper_bound(model, x, 0.02)
    assert (bound < 1).all() and torch.equal(bound, confidence_upper_bound(layers, x, 0.02))
    _, log_conf = pgd_maximize(model, x, lambda o: o.log_softmax(1).amax(1), 0.02, steps=40, step_size=0.005)
    assert (log_conf.double().exp() <= bound + 1e-6).all()
    lower, upper = interval_bounds(model, *input_box(x, 0.0))
    assert torch.allclose(lower.float(), model(x), atol=1e-5) and torch.allclose(upper.float(), model(x), atol=1e-5)


def test_an_operation_ibp_cannot_bound_is_named():
    class Gated(_OwnNames):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stack(torch.flatten(F.relu(self.conv_a(x)), 1))
            return self.out(torch.tanh(h))

    with pytest.raises(UnsupportedLayerError, match=r"Gated: cannot bound function tanh \(in forward itself\)"):
        confidence_upper_bound(Gated().eval(), torch.rand(2, 1, 8, 8), 0.01)
    class Squashed(_OwnNames):
        def __init__(self) -> None:
            super().__init__()
            self.stack.append(nn.Sigmoid())

    with pytest.raises(UnsupportedLayerError, match=r"Squashed: cannot bound module 'stack.1' \(Sigmoid\)"):
        layer_sequence(Squashed())
    inner = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Sigmoid()))
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        interval_bounds(inner, torch.zeros(1, 4), torch.ones(1, 4))
