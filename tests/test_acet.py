"""CEDA / ACET / OE losses, the PGD confidence attack, adversarial samples and the alpha-scaling search."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from utils.studies.alpha import max_confidence, median_of, min_alpha
from utils.attacks import (ADV_SETS, AdvBatch, adversarial_samples, confidence_attack, eval_mode, max_log_conf,
                           non_resisted_mask, pgd_maximize)
from utils.methods.noise import NOISE_METHODS

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_conv(seed: int, num_classes: int = 3) -> nn.Module:
    """A conv net with batch norm and dropout, so eval/train mode matters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, num_classes))


def tiny_mlp(seed: int, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return models.MODELS["mlp"](num_classes=num_classes, in_channels=1, input_size=SHAPE, widths=(32,))


def opts_for(out_loss: str = "max_conf", **kw) -> Namespace:
    base = dict(out_loss=out_loss, attack_eps=0.3, attack_steps=5, attack_step_size=None, attack_norm="linf",
                oe_lambda=0.5)
    return Namespace(**{**base, **kw})


def separable_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c lights up rows 3c..3c+1 of an 8x8 image on top of weak noise: learnable in a few steps."""
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, *SHAPE, generator=gen)
    for c in range(3):
        x[y == c, :, 3 * c:3 * c + 2, :] += 0.7
    return x, y


# ---------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("method,out_loss", [("ceda", "max_conf"), ("ceda", "uniform_conf"), ("acet", "max_conf"),
                                             ("acet", "uniform_conf"), ("oe", "max_conf")])
def test_loss_finite_has_gradients_and_decreases(method, out_loss):
    model = tiny_mlp(0)
    gen = torch.Generator().manual_seed(1)
    x, y = separable_batch(32, gen)
    x_out = torch.rand(32, *SHAPE, generator=gen)
    loss_fn, opts = NOISE_METHODS[method].loss, opts_for(out_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        torch.manual_seed(step)
        loss, logits_in = loss_fn(model, x, y, x_out, opts)
        assert torch.isfinite(loss) and loss.dim() == 0 and logits_in.shape == (32, 3)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses


def test_joint_loss_formula():
    """CEDA = (1/(B+n)) [sum CE + sum max log softmax]; OE = mean CE + lambda mean CE-to-uniform."""
    model = tiny_mlp(2).eval()
    gen = torch.Generator().manual_seed(3)
    x, y, z = torch.rand(6, *SHAPE, generator=gen), torch.randint(0, 3, (6,), generator=gen), torch.rand(4, *SHAPE)
    with torch.no_grad():
        lx, lz = model(x), model(z)
        ceda, _ = NOISE_METHODS["ceda"].loss(model, x, y, z, opts_for())
        expected = (F.cross_entropy(lx, y, reduction="sum") + max_log_conf(lz).sum()) / 10
        uni, _ = NOISE_METHODS["ceda"].loss(model, x, y, z, opts_for("uniform_conf"))
        expected_uni = (F.cross_entropy(lx, y, reduction="sum") - F.log_softmax(lz, 1).mean(1).sum()) / 10
        oe, _ = NOISE_METHODS["oe"].loss(model, x, y, z, opts_for(oe_lambda=0.25))
        expected_oe = F.cross_entropy(lx, y) + 0.25 * (-F.log_softmax(lz, 1).mean(1)).mean()
    assert float(ceda) == pytest.approx(float(expected), abs=1e-5)
    assert float(uni) == pytest.approx(float(expected_uni), abs=1e-5)
    assert float(oe) == pytest.approx(float(expected_oe), abs=1e-5)


def test_noise_from_batch_when_no_out_data():
    """Without --out-data, CEDA/ACET make the paper's noise from the clean batch; OE refuses."""
    model, x, y = tiny_mlp(0), torch.rand(8, *SHAPE), torch.randint(0, 3, (8,))
    for name in ("ceda", "acet"):
        loss, _ = NOISE_METHODS[name].loss(model, x, y, None, opts_for())
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="out-distribution"):
        NOISE_METHODS["oe"].loss(model, x, y, None, opts_for())
    with pytest.raises(ValueError, match="max_conf"):
        NOISE_METHODS["ceda"].loss(model, x, y, x, opts_for("bogus"))


# ---------------------------------------------------------------------------------------------- attack

@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 0.3), ("l2", 0.5), ("l2", 2.0)])
def test_attack_stays_feasible_and_never_loses_confidence(norm, eps):
    for seed in range(4):
        model = tiny_conv(seed) if seed % 2 else tiny_mlp(seed)
        model.train()
        model[3].eval() if seed % 2 else None  # a submodule in its own mode must keep it
        modes = [m.training for m in model.modules()]
        gen = torch.Generator().manual_seed(seed)
        x_seed = torch.rand(24, *SHAPE, generator=gen)
        x_seed[:4] = x_seed[:4].round()  # seeds on the faces of the box
        x_adv = confidence_attack(model, x_seed, eps, steps=7, step_size=eps / 3, norm=norm, generator=gen)
        delta = (x_adv - x_seed).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5) + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        with torch.no_grad(), eval_mode(model):
            gain = max_log_conf(model(x_adv)) - max_log_conf(model(x_seed))
        assert float(gain.min()) >= -1e-6
        assert float(gain.mean()) > 0.01  # the attack does something
        assert [m.training for m in model.modules()] == modes
        assert all(p.grad is None for p in model.parameters())


def test_attack_cost_is_steps_plus_one_forward():
    model, calls = tiny_mlp(0), []
    model.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(5, *SHAPE)
    confidence_attack(model, x, 0.3, steps=6)
    assert len(calls) == 7
    calls.clear()
    confidence_attack(model, x, 0.3, steps=0, random_start=False)  # CEDA: the noise itself, no pass
    assert len(calls) == 0


def test_keep_best_returns_seed_when_every_step_is_worse():
    """Confidence peaks at x_0 = 0.52; from the seed 0.5 every 0.05 step overshoots to 0.55 (worse) and back,
    so the best point seen is the seed itself."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))  # logit_0 = 2 - 40 |x_0 - 0.52|, logit_1 = 0
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([-0.52, 0.52]))
        model[2].weight.copy_(torch.tensor([[-40.0, -40.0], [0.0, 0.0]]))
        model[2].bias.copy_(torch.tensor([2.0, 0.0]))
    x_seed = torch.tensor([[0.5, 0.5]])
    x_adv, score = pgd_maximize(model, x_seed, max_log_conf, eps=0.05, steps=4, step_size=0.05, random_start=False)
    assert x_adv.tolist() == x_seed.tolist()
    assert float(score) == pytest.approx(float(F.logsigmoid(torch.tensor(1.2))), abs=1e-5)
    x_adv = confidence_attack(model, x_seed, 0.05, steps=4, step_size=0.01, random_start=False)
    assert float(x_adv[0, 0]) == pytest.approx(0.52, abs=1e-6)  # small steps reach the peak


# ----------------------------------------------------------------------------------- adversarial samples

def test_non_resisted_mask_hand_case():
    k = 4
    probs = torch.tensor([[0.90, 0.05, 0.03, 0.02],   # correct, confident: resisted -> dropped
                          [0.10, 0.70, 0.10, 0.10],   # wrong argmax: kept
                          [0.26, 0.25, 0.25, 0.24],   # correct, 0.26 > 1.01/K = 0.2525: resisted -> dropped
                          [0.2524, 0.2492, 0.2492, 0.2492]])  # correct argmax but below 1.01/K: kept
    y = torch.tensor([0, 0, 0, 0])
    mask = non_resisted_mask(probs.log(), y)
    assert mask.tolist() == [False, True, False, True]
    assert 1.01 / k == pytest.approx(0.2525)


def test_adv_sets_registry():
    model = tiny_conv(5).train()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, *SHAPE, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    opts = Namespace(attack_eps=0.2, attack_steps=5, attack_step_size=0.08, attack_norm="linf")
    for name, fn in ADV_SETS.items():
        batch = fn(model, x, y, opts)
        assert isinstance(batch, AdvBatch) and batch.x.shape == x.shape
        assert 0.0 <= float(batch.x.min()) and float(batch.x.max()) <= 1.0
        assert model.training
    samples = ADV_SETS["adv_samples"](model, x, y, opts)
    with torch.no_grad(), eval_mode(model):
        ce_clean = F.cross_entropy(model(x), y, reduction="none")
        logits_adv = model(samples.x)
    assert bool((F.cross_entropy(logits_adv, y, reduction="none") >= ce_clean - 1e-6).all())
    assert float((samples.x - x).abs().max()) <= 0.2 + 1e-6
    assert torch.equal(samples.keep, non_resisted_mask(logits_adv, y))
    direct = adversarial_samples(model, x, y, 0.2, 0, random_start=False)
    assert torch.equal(direct, x)
    torch.manual_seed(0)  # vector data (two moons): uniform seeds instead of image noise
    mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    noise = ADV_SETS["adv_noise"](mlp, torch.rand(10, 2), torch.zeros(10, dtype=torch.long), opts)
    assert noise.keep is None and noise.x.shape == (10, 2) and 0 <= float(noise.x.min()) <= float(noise.x.max()) <= 1


# ----------------------------------------------------------------------------------- alpha scaling

def test_min_alpha_matches_fine_scan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1))
    target, alpha_max = 0.999, 1e3
    found = min_alpha(model, x, target, alpha_max, grid_factor=1.25, rel_tol=1e-5)
    scan = torch.logspace(0, 3, 20001, dtype=torch.float64)  # ratio 1.000345 between neighbours
    with torch.no_grad():
        conf = torch.cat([max_confidence(model, (chunk.float().view(-1, 1, 1) * x).view(-1, 4), 100000)
                          .view(len(chunk), -1) for chunk in scan.split(2000)]).T  # (N, S)
    reached = conf >= target
    first = torch.where(reached.any(1), scan[reached.double().argmax(1)], torch.tensor(float("inf"),
                                                                                      dtype=torch.float64))
    assert torch.equal(torch.isfinite(found), torch.isfinite(first))
    assert 10 < int(torch.isfinite(found).sum()) < 64  # both cases occur
    fin = torch.isfinite(found)
    ratio = found[fin] / first[fin]
    assert float(ratio.min()) > 1 / 1.0004 and float(ratio.max()) < 1.0004, ratio
    with torch.no_grad():  # the returned alpha really reaches the target
        assert bool((max_confidence(model, found[fin].float().unsqueeze(1) * x[fin]) >= target).all())


def test_min_alpha_is_one_when_already_confident_and_median_of_inf():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 0.0]]))
        model.bias.zero_()
    x = torch.tensor([[0.5, 0.1], [0.01, 0.3], [0.0, 0.5]])  # logit gap 50, 1, 0
    alpha = min_alpha(model, x, 0.999, 1e6)
    gap_needed = torch.log(torch.tensor(999.0, dtype=torch.float64))  # conf >= .999 iff gap >= log 999
    assert float(alpha[0]) == 1.0
    assert float(alpha[1]) == pytest.approx(float(gap_needed), rel=1e-3)
    assert alpha[2] == float("inf")
    assert median_of(torch.tensor([1.0, float("inf")])) == float("inf")
    assert median_of(torch.tensor([1.0, 3.0, float("inf"), 2.0])) == 2.5


# ----------------------------------------------------------------------------------- the two-moons toy

def test_moons_acet_lowers_confidence_on_noise_and_keeps_accuracy():
    """Two-moons toy (docs/methods.md#two-moons-toy; 300 of the 1000 training points, 500 ACET iterations to stay fast):
    ACET's mean max-confidence on U[0,1]^2 is far below plain's while validation accuracy stays high."""
    from scripts.moons_figure import moons_tensors, summary, train_moons

    x, y = moons_tensors("train")
    x_val, y_val = moons_tensors("val")
    x, y = x[:300], y[:300]
    trained = {"plain": train_moons("plain", x, y, 400), "acet": train_moons("acet", x, y, 500)}
    stats = summary(trained, x_val, y_val, n_noise=5000)
    assert stats["plain"]["mmc_uniform"] > 0.9
    assert stats["acet"]["mmc_uniform"] < stats["plain"]["mmc_uniform"] - 0.2, stats
    assert stats["acet"]["val_accuracy"] > 0.95 and stats["plain"]["val_accuracy"] > 0.95, stats
