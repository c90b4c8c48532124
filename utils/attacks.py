"""Batched PGD attacks in pixel space [0,1]: worst-case confidence (ACET's adversarial noise) and adversarial samples.

Hein, Andriushchenko, Bitterwolf, "Why ReLU networks yield high-confidence predictions far away from the training
data and how to mitigate the problem", CVPR 2019 (arXiv 1812.05720), docs/methods.md#acet and #acet-evaluation:

    x_0     = proj(z + s * u),  s ~ U[0,1] per image,  u ~ U[-eps, eps]^d           (random start)
    x_{t+1} = proj(x_t + eta * sign(grad_x l(x_t)))         (L-inf; L2: eta * grad / ||grad||_2)
    proj    = clip to [0,1], then clip x - z to the eps-ball around the seed z
    return  the most "l"-scoring point among z, x_0, ..., x_steps (per sample)

With the seed z in [0,1], clipping to [0,1] first and to the ball second keeps both constraints (the ball step
moves each point towards z along a segment inside the box), so every iterate is feasible.

Cost per call: `steps` forward+backward passes (the backward goes to the input only, parameters get no
gradient) plus one forward pass that scores the last iterate, concatenated with the seed when a random start
moved away from it. The forward pass that computes step t's gradient also scores iterate t, so keep-best is
free otherwise. The model runs in eval mode (BN uses its running statistics, dropout is off) and every
submodule's training flag is restored afterwards.

For the adversarial AUROC (AAUC) of GOOD / ProoD, the bottom of this file adds stronger L-inf attacks on the
confidence: APGD (Croce & Hein, ICML 2020, arXiv 2003.01690) with its step-size schedule and restarts, and
ProoD's monotone momentum PGD (`monotone_pgd_run`) from its de-contrasted, uniform and Gaussian starts, combined
by `worst_case_confidence`.

[BUG fixed] The original toy notebook's PGD clipped the old iterate and undid the step, so only its random start
took effect; here every step is applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.precision import eval_mode  # noqa: F401  (utils.attacks.eval_mode: the studies import it here)
from utils.amp import attack_autocast

# objective(logits) -> (N,) score to MAXIMISE; "higher" means the attack is doing better
Objective = Callable[[torch.Tensor], torch.Tensor]


def max_log_conf(logits: torch.Tensor) -> torch.Tensor:
    """ACET's `max_conf`: max_k log softmax_k(f(x)) (for CCU's log-probability outputs, max_k log p(k|x))."""
    return F.log_softmax(logits, dim=1).max(dim=1).values


def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """ACET's `uniform_conf`: CE(f(x), uniform) = -(1/K) sum_k log softmax_k(f(x)); larger = less uniform."""
    return -F.log_softmax(logits, dim=1).mean(dim=1)


# attack / out-distribution loss name -> per-sample score that training minimises and the attack maximises
CONF_OBJECTIVES: dict[str, Objective] = {"max_conf": max_log_conf, "uniform_conf": uniform_ce}
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class PGDDefaults:
    """The one home of the PGD defaults: ACET's adversarial noise (arXiv 1812.05720) is L-inf PGD with eps 0.3,
    40 steps of eps / steps, from a random start. train.py's `--attack-*` flags (`utils.methods.shared.ATTACK`),
    `attack_options` and ACET's loss read `steps`; evaluate.py's adversarial sets attack twice as long
    (`eval_steps`), as ACET's evaluation does."""
    eps: float = 0.3
    steps: int = 40
    eval_steps: int = 80
    step_size: Optional[float] = None   # None: eps / steps
    norm: str = "linf"
    random_start: bool = True


PGD_DEFAULTS = PGDDefaults()


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))  # (N, 1, ..., 1) for broadcasting


def project(x: torch.Tensor, x_seed: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Clip to [0,1], then to the eps-ball (L-inf or L2) around `x_seed`; feasible for both when x_seed is."""
    delta = x.clamp(0.0, 1.0) - x_seed
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return x_seed + delta


def _random_start(x_seed: torch.Tensor, eps: float, norm: str,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    shape, kw = x_seed.shape, dict(device=x_seed.device, dtype=x_seed.dtype, generator=generator)
    scale = torch.rand((shape[0],) + (1,) * (len(shape) - 1), **kw)  # s ~ U[0,1], one per image
    if norm == "linf":
        u = (2.0 * torch.rand(shape, **kw) - 1.0) * eps
    else:  # a uniformly random direction of length eps
        u = torch.randn(shape, **kw)
        u = u * (eps / _flat_norm(u).clamp_min(1e-12))
    return project(x_seed + scale * u, x_seed, eps, norm)


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def _keep_best(best_x: torch.Tensor, best_score: torch.Tensor, x: torch.Tensor,
               score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    better = score > best_score  # NaN scores never win
    mask = better.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x, best_x), torch.where(better, score, best_score)


def pgd_maximize(model: nn.Module, x_seed: torch.Tensor, objective: Objective, eps: float, steps: int,
                 step_size: Optional[float] = None, norm: str = "linf", random_start: bool = True,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise `objective(model(x))` per sample over the eps-ball around `x_seed` intersected with [0,1]^d.

    Returns (x_best, score_best), both detached; x_best is the best of the seed and every iterate.
    step_size None means eps / steps (ACET's training setting).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown attack norm {norm!r}; valid: {', '.join(NORMS)}")
    if steps < 0 or eps < 0:
        raise ValueError(f"attack needs steps >= 0 and eps >= 0, got steps={steps}, eps={eps}")
    step_size = eps / max(steps, 1) if step_size is None else step_size
    x_seed = x_seed.detach()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # the attack needs no gradient sync; DDP's forward would expect a backward
    # attack_autocast: --amp of evaluate.py / gen_attack_stats.py (in training the loss's autocast covers this)
    with eval_mode(model), torch.enable_grad(), attack_autocast(x_seed.device):
        x = _random_start(x_seed, eps, norm, generator) if random_start else x_seed.clone()
        best_x = x_seed.clone()
        best_score = torch.full(x_seed.shape[:1], -float("inf"), device=x_seed.device, dtype=x_seed.dtype)
        for _ in range(steps):
            x.requires_grad_(True)
            score = objective(model(x)).float()
            # gradient w.r.t. the input only: parameters' .grad stay untouched and no weight gradient is computed
            (grad,) = torch.autograd.grad(score.sum(), x)
            x = x.detach()
            best_x, best_score = _keep_best(best_x, best_score, x, score.detach())
            x = project(x + step_size * _ascent_direction(grad, norm), x_seed, eps, norm)
        with torch.no_grad():
            # one forward scores the last iterate, and the seed too when the random start left it
            logits = model(torch.cat([x, x_seed]) if random_start else x)
            best_x, best_score = _keep_best(best_x, best_score, x, objective(logits[: len(x)]).float())
            if random_start:
                best_x, best_score = _keep_best(best_x, best_score, x_seed, objective(logits[len(x):]).float())
    return best_x.detach(), best_score.detach()


def confidence_attack(model: nn.Module, x_seed: torch.Tensor, eps: float, steps: int,
                      step_size: Optional[float] = None, norm: str = "linf", random_start: bool = True,
                      loss: str = "max_conf", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarial noise: the point of the eps-ball around `x_seed` (within [0,1]) where the model is most
    confident, by `loss` in CONF_OBJECTIVES ("max_conf": log max-softmax; "uniform_conf": CE to uniform)."""
    if loss not in CONF_OBJECTIVES:
        raise ValueError(f"unknown attack loss {loss!r}; valid: {', '.join(CONF_OBJECTIVES)}")
    if steps == 0 and not random_start:
        return x_seed.detach().clone()  # CEDA: the noise itself, no pass needed
    x_adv, _ = pgd_maximize(model, x_seed, CONF_OBJECTIVES[loss], eps, steps, step_size, norm, random_start,
                            generator)
    return x_adv


def adversarial_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                        step_size: Optional[float] = None, norm: str = "linf", random_start: bool = True,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ACET's "Adv. Samples": PGD from clean test images maximising CE(f(x), y) of the true label."""
    def true_label_ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")

    x_adv, _ = pgd_maximize(model, x, true_label_ce, eps, steps, step_size, norm, random_start, generator)
    return x_adv


def non_resisted_mask(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """docs/methods.md#acet-evaluation: True where an adversarial sample is kept ("not resisted").

    A dummy column of value 1.01/K is appended to the softmax probabilities; the sample is resisted when the
    argmax of the K+1 columns is still the true label, so near-uniform predictions (max prob < 1.01/K) count as
    not resisted and are kept.
    """
    probs = F.softmax(logits, dim=1)
    num_classes = probs.shape[1]
    dummy = torch.full_like(probs[:, :1], 1.01 / num_classes)
    resisted = torch.cat([probs, dummy], dim=1).argmax(dim=1) == y
    return ~resisted


@dataclass
class AdvBatch:
    """An adversarial evaluation batch: inputs, and which of them to keep (None = all)."""

    x: torch.Tensor
    keep: Optional[torch.Tensor] = None


def attack_options(opts) -> dict:
    """The PGD settings carried by a config namespace (attack_eps, attack_steps, attack_step_size, attack_norm)."""
    return dict(eps=float(getattr(opts, "attack_eps", PGD_DEFAULTS.eps)),
                steps=int(getattr(opts, "attack_steps", PGD_DEFAULTS.steps)),
                step_size=getattr(opts, "attack_step_size", PGD_DEFAULTS.step_size),
                norm=getattr(opts, "attack_norm", PGD_DEFAULTS.norm))


def adv_noise_set(model: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, opts) -> AdvBatch:
    """Adv. Noise: ACET noise made from the test images (`data.acet_noise_batch`; uniform for vector data),
    then `confidence_attack` on `opts.out_loss` (default max_conf)."""
    from data import acet_noise_batch, uniform_batch  # imported here: attacks need not load the data package

    seeds = acet_noise_batch(x_in) if x_in.dim() == 4 else uniform_batch(x_in)  # vectors: U[0,1]^d seeds
    loss = getattr(opts, "out_loss", "max_conf")
    return AdvBatch(confidence_attack(model, seeds, loss=loss, **attack_options(opts)))


def adv_samples_set(model: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, opts) -> AdvBatch:
    """Adv. Samples: true-label CE attack on the test images, keeping only the non-resisted ones
    (docs/methods.md#acet-evaluation)."""
    x_adv = adversarial_samples(model, x_in, y_in, **attack_options(opts))
    with torch.no_grad(), eval_mode(model):
        keep = non_resisted_mask(model(x_adv), y_in)
    return AdvBatch(x_adv, keep)


# evaluation set name -> fn(model, x_in, y_in, opts) -> AdvBatch
ADV_SETS: dict[str, Callable[..., AdvBatch]] = {"adv_noise": adv_noise_set, "adv_samples": adv_samples_set}


# ---------------------------------------------------------------------------------------------------------------
# Strong L-inf attacks on the confidence for AAUC (utils/studies/gauc.py): APGD and monotone momentum PGD.

def _score_and_input_grad(model: nn.Module, x: torch.Tensor, objective: Objective):
    x = x.detach().requires_grad_(True)
    score = objective(model(x))
    (grad,) = torch.autograd.grad(score.sum(), x)
    return score.detach(), grad.detach()


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    return sorted({min(steps, math.ceil(round(p * steps, 6))) for p in fractions[1:]})  # 0.57 * 100 is 57.000...01


def _apgd_run(model: nn.Module, x_seed: torch.Tensor, x: torch.Tensor, objective: Objective, eps: float,
              steps: int, momentum: float, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from x (Croce & Hein 2020, Algorithm 1): step eta = 2 eps, halved per sample at a checkpoint
    when fewer than rho of the steps since the last one improved, or when neither eta nor the best score changed;
    a halving restarts from the best point. Returns (best x, best score)."""
    score, grad = _score_and_input_grad(model, x, objective)
    best_x, best_score, best_grad = x.clone(), score.clone(), grad.clone()
    eta = torch.full_like(score, 2.0 * eps)
    x_prev, successes, last = x.clone(), torch.zeros_like(score), 0
    eta_at_last, best_at_last = eta.clone(), best_score.clone()
    checkpoints = set(apgd_checkpoints(steps))
    for k in range(steps):
        z = project(x + _per_sample(eta, x) * grad.sign(), x_seed, eps, "linf")
        x_new = z if k == 0 else project(x + momentum * (z - x) + (1 - momentum) * (x - x_prev), x_seed, eps, "linf")
        x_prev, x = x, x_new
        new_score, grad = _score_and_input_grad(model, x, objective)
        successes += (new_score > score).to(score.dtype)
        score = new_score
        better = score > best_score
        best_x, best_score = _keep_best(best_x, best_score, x, score)
        best_grad = torch.where(_per_sample(better, x), grad, best_grad)
        if k + 1 in checkpoints:
            reduce = (successes < rho * (k + 1 - last)) | ((eta == eta_at_last) & (best_score == best_at_last))
            eta = torch.where(reduce, eta / 2, eta)
            mask = _per_sample(reduce, x)
            x, x_prev = torch.where(mask, best_x, x), torch.where(mask, best_x, x_prev)
            grad = torch.where(mask, best_grad, grad)
            score = torch.where(reduce, best_score, score)
            successes, last, eta_at_last, best_at_last = torch.zeros_like(score), k + 1, eta.clone(), best_score.clone()
    return best_x, best_score


def apgd_maximize(model: nn.Module, x_seed: torch.Tensor, objective: Objective, eps: float, steps: int = 100,
                  restarts: int = 1, momentum: float = 0.75, rho: float = 0.75,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD (Croce & Hein, ICML 2020, arXiv 2003.01690) maximising `objective(model(x))` per sample over the L-inf
    eps-ball around x_seed intersected with [0,1]^d: `restarts` runs from uniform random points of the ball.
    Returns (x_best, score_best), the best of the seed and every iterate of every run; both detached."""
    x_seed = x_seed.detach()
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            best_x, best_score = x_seed.clone(), objective(model(x_seed))
        for _ in range(restarts):
            u = (2.0 * torch.rand(x_seed.shape, generator=generator, dtype=x_seed.dtype).to(x_seed.device) - 1.0)
            x, score = _apgd_run(model, x_seed, project(x_seed + eps * u, x_seed, eps, "linf"), objective, eps,
                                 steps, momentum, rho)
            best_x, best_score = _keep_best(best_x, best_score, x, score)
    return best_x, best_score


def max_conf(logits: torch.Tensor) -> torch.Tensor:
    """max_k softmax_k(f(x)), the confidence itself (ProoD's monotone PGD ascends it, not its log)."""
    return F.softmax(logits, dim=1).max(dim=1).values


@dataclass
class MonotonePGDResult:
    """One monotone PGD run: the last accepted point, its score and each sample's final step size."""

    x: torch.Tensor
    score: torch.Tensor
    step: torch.Tensor


def monotone_pgd_run(model: nn.Module, x_seed: torch.Tensor, x_start: torch.Tensor, objective: Objective,
                     eps: float, steps: int = 200, step_size: float = 0.1, momentum: float = 0.9,
                     gain: float = 1.1, decay: float = 0.5) -> MonotonePGDResult:
    """ProoD's MonotonePGD (AlexMeinke/Provable-OOD-Detection, utils/adversarial: `normalize_grad=False`), batched.

    Per sample: v <- momentum * v + grad (the raw gradient, no sign, no normalisation), x <- proj(x + step * v),
    with an absolute initial step `step_size`. Each of the steps + 1 evaluations compares the new point with the
    last accepted one: a lower score is rejected (the point and v return to the last accepted ones) and halves the
    step; otherwise the point is accepted and the step grows by `gain` (the first evaluation, of the start, only
    sets the reference). The next velocity uses the gradient at the evaluated point, rejected or not, as the
    original does. Returns the last accepted point: it never scores below the (projected) start.
    """
    x = project(x_start.detach(), x_seed, eps, "linf")
    step = torch.full(x.shape[:1], float(step_size), dtype=x.dtype, device=x.device)
    best_x, best_score = x, torch.full_like(step, -float("inf"))
    velocity = accepted_velocity = torch.zeros_like(x)
    with eval_mode(model), torch.enable_grad():
        for i in range(steps + 1):
            score, grad = _score_and_input_grad(model, x, objective)
            worse = score < best_score  # ties are accepted, as the original's strict "loss increased" test
            mask = _per_sample(worse, x)
            x, score = torch.where(mask, best_x, x), torch.where(worse, best_score, score)
            velocity = torch.where(mask, accepted_velocity, velocity)
            best_x, best_score, accepted_velocity = x, score, velocity
            if i > 0:
                step = torch.where(worse, step * decay, step * gain)
            if i == steps:
                break
            velocity = momentum * velocity + grad
            x = project(x + _per_sample(step, x) * velocity, x_seed, eps, "linf")
    return MonotonePGDResult(best_x.detach(), best_score.detach(), step)


def decontrast_start(x_seed: torch.Tensor, eps: float) -> torch.Tensor:
    """ProoD's DeContraster start: every pixel moved towards its image's mean by at most eps (never past it)."""
    mean = _per_sample(x_seed.flatten(1).mean(1), x_seed)
    return x_seed + (mean - x_seed).clamp(-eps, eps)


def prood_pgd_starts(x_seed: torch.Tensor, eps: float, restarts: int = 3,
                     generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """The starts of ProoD's AAUC attacks: the de-contrasted point once (it is deterministic), then 1 + restarts
    uniform points of the ball and 1 + restarts points of N(0, (1e-4)^2) noise around the seed."""
    kw = dict(generator=generator, dtype=x_seed.dtype)
    starts = [decontrast_start(x_seed, eps)]
    for _ in range(1 + restarts):
        starts.append(x_seed + ((2.0 * torch.rand(x_seed.shape, **kw) - 1.0) * eps).to(x_seed.device))
    for _ in range(1 + restarts):
        starts.append(x_seed + (torch.randn(x_seed.shape, **kw) * 1e-4).to(x_seed.device))
    return starts


# the AAUC attack's name in the GAUC rows (`utils/studies/gauc.py`): change it whenever the attack changes
AAUC_ATTACK = "apgd+prood_monotone_pgd"


def worst_case_confidence(model: nn.Module, x_seed: torch.Tensor, eps: float, apgd_steps: int = 500,
                          apgd_restarts: int = 5, pgd_steps: int = 200, pgd_step_size: float = 0.1,
                          generator: Optional[torch.Generator] = None,
                          pgd_restarts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point the highest log-confidence max_y log p(y|x) found inside the clipped L-inf eps-ball: the max over
    the clean point, APGD with restarts and ProoD's monotone PGD from its starts (`prood_pgd_starts`; 0 steps or
    restarts skip an attack). Returns (x_best, log_conf_best), detached."""
    best_x, best_score = apgd_maximize(model, x_seed, max_log_conf, eps, apgd_steps, apgd_restarts,
                                       generator=generator)
    if pgd_steps > 0:
        for start in prood_pgd_starts(x_seed, eps, pgd_restarts, generator):
            run = monotone_pgd_run(model, x_seed, start, max_conf, eps, pgd_steps, pgd_step_size)
            best_x, best_score = _keep_best(best_x, best_score, run.x, run.score.log())
    return best_x, best_score
