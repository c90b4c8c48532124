"""Training on (adversarial) noise: CEDA and ACET (Hein et al., CVPR 2019, arXiv 1812.05720) and Outlier
Exposure (Hendrycks, Mazeika, Dietterich, ICLR 2019, arXiv 1812.04606).

CEDA / ACET (docs/methods.md#ceda), with B clean samples (x_i, y_i) and n_out out samples z_j:

    L = (1 / (B + n_out)) * [ sum_i CE(f(x_i), y_i) + sum_j l_out(z^_j) ]

    l_out = max_conf      max_k log softmax_k(f(z))      (default; every CEDA/ACET model of the paper)
          = uniform_conf  CE(f(z), uniform) = -(1/K) sum_k log softmax_k(f(z))      (`--out-loss uniform_conf`)

CEDA uses z^ = z. ACET uses z^ = argmax of l_out over the eps-ball around z intersected with [0,1]^d, found by
`utils.attacks.confidence_attack` (`--attack-*`; defaults `utils.attacks.PGD_DEFAULTS`: L-inf eps 0.3, 40 steps
of eps/40, random start, keep best).

Outlier Exposure:  L = mean_i CE(f(x_i), y_i) + lambda * mean_j CE(f(z_j), uniform),  lambda = `--oe-lambda` 0.5.

The out batch is `x_out` from the training loop (`--out-data`). When it is None, CEDA and ACET make the paper's
noise from the clean batch (`data.acet_noise_batch`: half permuted pixels, half uniform, low-passed, rescaled;
uniform U[0,1]^d for vector data).

Batch norm: each loss runs ONE forward pass on cat(x, z^), as the original does, so in training mode the BN
batch statistics (and running averages) mix clean and noise samples. The attack itself runs with BN in
inference mode (running statistics) and leaves the model's training flags as they were.

[DIFF] Weight decay is the optimiser's (`weight_decay` on every parameter), not a term of the loss. The original
adds 5e-4 * sum ||W||^2 over conv/fc weights AND biases, with no 1/2; its gradient 1e-3 * W equals
coupled (L2, not AdamW) weight decay 1e-3 applied to all parameters, biases included.
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.attacks import CONF_OBJECTIVES, PGD_DEFAULTS, attack_options, confidence_attack
from utils.cli import NON_NEGATIVE
from utils.methods.base import FlagGroup, Method
from utils.methods.shared import ATTACK, OUT_DATA

# ACET/CEDA (Hein et al. 2019): the loss adds 5e-4 * sum ||W||^2 over weights and biases, whose gradient
# 1e-3 * W is coupled L2 weight decay 1e-3 (module docstring); it replaces the dataset's, before any --recipe.
NOISE_DEFAULTS = {"weight_decay": 1e-3}
OE_LAMBDA = 0.5


def _add_out_loss(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--out-loss", default="max_conf", choices=list(CONF_OBJECTIVES))


def _add_oe(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--oe-lambda", type=float, default=OE_LAMBDA)


OUT_LOSS = FlagGroup("CEDA / ACET out loss", _add_out_loss)
OE = FlagGroup("Outlier Exposure", _add_oe, ranges={"oe_lambda": NON_NEGATIVE})


def out_loss_fn(opts: Namespace):
    """The per-sample out-distribution loss named by `opts.out_loss` (default max_conf)."""
    name = getattr(opts, "out_loss", "max_conf")
    if name not in CONF_OBJECTIVES:
        raise ValueError(f"unknown --out-loss {name!r}; valid: {', '.join(CONF_OBJECTIVES)}")
    return name, CONF_OBJECTIVES[name]


def _noise_from_batch(x: torch.Tensor, x_out: Optional[torch.Tensor]) -> torch.Tensor:
    if x_out is not None:
        return x_out
    from data import acet_noise_batch, uniform_batch  # the paper's generator, seeded from the clean batch

    return acet_noise_batch(x) if x.dim() == 4 else uniform_batch(x)  # vectors (two moons): U[0,1]^d


def _joint_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/(B+n)) [sum CE(x, y) + sum l_out(z)] from one forward pass on cat(x, z)."""
    _, l_out = out_loss_fn(opts)
    logits = model(torch.cat([x, z]))
    logits_in, logits_out = logits[: len(x)], logits[len(x):]
    total = F.cross_entropy(logits_in, y, reduction="sum") + l_out(logits_out).sum()
    return total / (len(x) + len(z)), logits_in


def ceda_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
              opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """CEDA (Hein et al. 2019, arXiv 1812.05720): CE on clean data + l_out on the noise itself
    (docs/methods.md#ceda)."""
    return _joint_loss(model, x, y, _noise_from_batch(x, x_out), opts)


def acet_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
              opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """ACET (Hein et al. 2019, arXiv 1812.05720): CE on clean data + l_out on adversarial noise (docs/methods.md#acet).

    The noise z is first attacked by PGD maximising l_out in the `--attack-eps` ball (`--attack-norm`, default
    L-inf 0.3) with `--attack-steps` (40) steps of `--attack-step-size` (None = eps/steps), then the joint loss is
    taken on cat(x, z^). Gradients reach the parameters only through the final forward pass.
    """
    name, _ = out_loss_fn(opts)
    z = _noise_from_batch(x, x_out)
    z_adv = confidence_attack(model, z, **attack_options(opts), loss=name,
                              random_start=bool(getattr(opts, "attack_random_start", PGD_DEFAULTS.random_start)))
    return _joint_loss(model, x, y, z_adv, opts)


def oe_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
            opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Outlier Exposure (Hendrycks et al. 2019, arXiv 1812.04606):

        L = mean_i CE(f(x_i), y_i) + lambda * mean_j CE(f(x_out_j), uniform),   lambda = opts.oe_lambda (0.5)

    from one forward pass on cat(x, x_out), as in the original code.
    """
    if x_out is None:
        raise ValueError("oe needs an out-distribution batch: pass --out-data")
    logits = model(torch.cat([x, x_out]))
    logits_in, logits_out = logits[: len(x)], logits[len(x):]
    to_uniform = -F.log_softmax(logits_out, dim=1).mean(dim=1)
    loss = F.cross_entropy(logits_in, y) + float(getattr(opts, "oe_lambda", OE_LAMBDA)) * to_uniform.mean()
    return loss, logits_in


NOISE_METHODS: dict[str, Method] = {
    "ceda": Method(loss=ceda_loss, flags=(OUT_DATA, OUT_LOSS), defaults=NOISE_DEFAULTS, uses_out_data=True),
    "acet": Method(loss=acet_loss, flags=(OUT_DATA, OUT_LOSS, ATTACK), defaults=NOISE_DEFAULTS, uses_out_data=True),
    "oe": Method(loss=oe_loss, flags=(OUT_DATA, OE), uses_out_data=True),
}
