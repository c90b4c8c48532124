"""Issue 19: one precision for both sides of AUC / AAUC / GAUC, and ProoD's monotone PGD (`--study gauc`)."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch import nn

from utils.attacks import (decontrast_start, max_conf, max_log_conf, monotone_pgd_run, prood_pgd_starts,
                           worst_case_confidence)
from utils.ibp import confidence_upper_bound, round_up_to
from utils.studies.gauc import gauc_table, score_model

EPS = 0.05


def _gap_model() -> nn.Sequential:
    """Two classes on 2-d inputs z in [0,1]^2 with logit gap f_0 - f_1 = 20 relu(z_0) - 20 relu(z_0) + 40 z_1 =
    40 z_1. IBP does not see that the first two terms cancel: over an eps-box its bound of the gap is the true
    maximum 40 (z_1 + eps) plus 40 eps (2 at eps = 0.05), which no attack can reach."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[10.0, -10.0, 20.0], [-10.0, 10.0, -20.0]]))
        model[0].bias.zero_()
        model[2].bias.zero_()
    return model.eval()


def _points(x1: list[float], repeat: int = 1) -> torch.Tensor:
    return torch.tensor([[0.5, v] for v in x1 for _ in range(repeat)])


def _conservative(conf_in: torch.Tensor, conf_out: torch.Tensor) -> float:
    """Brute force over all pairs: ties count against the model."""
    return 100 * float((conf_out[None, :] < conf_in[:, None]).double().mean())


def _args(precision: str) -> Namespace:
    return Namespace(apgd_steps=10, apgd_restarts=1, pgd_steps=5, pgd_step_size=0.1, pgd_restarts=1,
                     batch_size=64, seed=0, device="cpu", precision=precision)


def _conf(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return model.to(dtype)(x.to(dtype)).softmax(1).amax(1).double()


def test_gauc_compares_confidences_and_bounds_in_one_precision():
    # A float32 softmax saturates at exactly 1.0 for a gap above 16.6 (1 + e^-gap rounds to 1).
    # in: gap 18 (float32 confidence exactly 1.0, float64 1 - 1.5e-8) and gap 6. Out (eps 0.05), gaps clean /
    # attacked / bound: T 14.4 / 16.4 / 18.4, Q 8 / 10 / 12, R 0 / 2 / 4, S 12 / 14 / 16, U 13.5 / 15.5 / 17.5. The float64
    # bounds of T and U lie below 1 but round to 1.0 in float32, where they tie with the saturated in-distribution
    # confidences; T's is above the in-distribution float64 confidence, U's below it.
    model = _gap_model()
    x_in, y_in = _points([0.45, 0.15], repeat=4), torch.zeros(8, dtype=torch.long)
    x_out = _points([0.36, 0.2, 0.0, 0.3, 0.3375])
    corner = x_out + torch.tensor([0.0, EPS])  # where the confidence over each box is largest (gap >= 0)
    rows = {p: score_model(_gap_model(), x_in, y_in, {"toy": x_out}, EPS, _args(p))[0] for p in ("float32", "float64")}
    for precision, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        conf_in = _conf(_gap_model(), x_in, dtype)
        by_hand = {"auc": _conservative(conf_in, _conf(_gap_model(), x_out, dtype)),
                   "aauc": _conservative(conf_in, _conf(_gap_model(), corner, dtype)),
                   "gauc": _conservative(conf_in, confidence_upper_bound(_gap_model().to(dtype), x_out.to(dtype),
                                                                          EPS, dtype).double())}
        row = rows[precision]
        assert row["precision"] == precision and row["attack"] == "apgd+prood_monotone_pgd"
        assert {k: row[f"{k}_conservative"] for k in by_hand} == pytest.approx(by_hand)
    assert [rows["float32"][f"{k}_conservative"] for k in ("auc", "aauc", "gauc")] == [60.0, 60.0, 40.0]
    assert [rows["float64"][f"{k}_conservative"] for k in ("auc", "aauc", "gauc")] == [60.0, 60.0, 50.0]
    # the study before issue 19: float32 in-distribution confidences against float64 bounds
    mixed = _conservative(_conf(model, x_in, torch.float32), confidence_upper_bound(model, x_out, EPS, torch.float64))
    assert mixed == 60.0 != rows["float32"]["gauc_conservative"]
    table = gauc_table([{**rows[p], "study": "gauc", "dataset": "toy", "label": "m", "run": "r"} for p in rows])
    assert "float32, x100" in table and "float64, x100" in table and "| m | 100.0 | 60.0 / 60.0 / 40.0 |" in table


def test_own_certificates_are_rounded_up_to_the_study_precision():
    bound = torch.tensor([1 - 2e-9, 0.5, 0.3], dtype=torch.float64)
    rounded = round_up_to(bound, torch.float32)
    assert rounded.dtype == torch.float32 and (rounded.double() >= bound).all()
    assert rounded[0] == 1.0 and rounded[1] == 0.5 and rounded[2].double() - 0.3 < 3e-8


def test_monotone_pgd_step_grows_by_1_1_on_success():
    # a linear objective never gets worse (on the box boundary it ties, which counts as success)
    seed = torch.full((3, 4), 0.5)
    run = monotone_pgd_run(nn.Identity(), seed, seed, lambda out: out.sum(1), eps=0.5, steps=7)
    assert torch.allclose(run.step, torch.full((3,), 0.1 * 1.1 ** 7))
    assert torch.equal(run.x, torch.ones(3, 4)) and torch.equal(run.score, torch.full((3,), 4.0))


@pytest.mark.parametrize("steps, step", [(1, 0.05), (2, 0.025)])
def test_monotone_pgd_halves_on_failure_and_keeps_the_accepted_point(steps, step):
    # -100 (x - 0.5)^2 from 0.4: the raw-gradient step (0.1 * 20) overshoots to x = 1, is rejected and halved; the
    # next one, along the gradient taken at the rejected point (as the original), overshoots to 0: halved again
    seed, start = torch.full((2, 1), 0.5), torch.full((2, 1), 0.4)
    run = monotone_pgd_run(nn.Identity(), seed, start, lambda out: -100 * (out[:, 0] - 0.5) ** 2, eps=0.5,
                           steps=steps)
    assert torch.allclose(run.step, torch.full((2,), step))
    assert torch.equal(run.x, start) and torch.allclose(run.score, torch.full((2,), -1.0))


def test_monotone_pgd_stays_in_the_clipped_ball_and_never_below_its_start():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(40, 1, 4, 4)
    x[:, :, 0] = 0.0  # seeds on the box boundary
    eps = 0.2
    start = x + (2 * torch.rand_like(x) - 1) * eps
    run = monotone_pgd_run(model, x, start, max_conf, eps, steps=30)
    assert ((run.x - x).abs() <= eps + 1e-6).all() and (run.x >= 0).all() and (run.x <= 1).all()
    with torch.no_grad():
        start_score = max_conf(model(start.clamp(0, 1)))
        assert torch.allclose(max_conf(model(run.x)), run.score)  # the point returned is the one scored
    assert (run.score >= start_score).all() and (run.score > start_score + 1e-3).float().mean() > 0.5
    assert ((run.step - 0.1 * 1.1 ** 30).abs() < 1e-3).float().mean() < 1  # some steps failed, so some halved


def test_prood_starts_and_restarts():
    x = torch.tensor([[[[0.9, 0.45], [0.1, 0.55]]]])  # image mean 0.5
    assert torch.allclose(decontrast_start(x, 0.3), torch.tensor([[[[0.6, 0.5], [0.4, 0.5]]]]))  # not past 0.5
    seeds = torch.rand(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    starts = prood_pgd_starts(seeds, 0.3, restarts=3, generator=torch.Generator().manual_seed(1))
    assert len(starts) == 1 + 4 + 4
    uniform = torch.stack([s - seeds for s in starts[1:5]])
    assert uniform.abs().max() <= 0.3 and uniform.abs().max() > 0.29 and abs(float(uniform.mean())) < 0.01
    normal = torch.stack([s - seeds for s in starts[5:]])
    assert abs(float(normal.std()) - 1e-4) < 1e-5

    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

        def forward(self, z):
            calls.append(len(z))
            return self.net(z)

    model = Counting().eval()
    for restarts, runs in ((3, 9), (0, 3)):
        calls.clear()
        worst_case_confidence(model, seeds[:7], 0.1, apgd_steps=0, apgd_restarts=1, pgd_steps=4,
                              pgd_restarts=restarts)
        assert len(calls) == 2 + runs * (4 + 1)  # APGD: the seed and its one start; each PGD run: 5 evaluations
    calls.clear()
    x_best, log_conf = worst_case_confidence(model, seeds[:7], 0.1, apgd_steps=3, apgd_restarts=1, pgd_steps=4)
    with torch.no_grad():
        assert torch.allclose(max_log_conf(model.net(x_best)), log_conf, atol=1e-6)
