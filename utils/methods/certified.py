"""Provably robust OOD training with interval bound propagation: GOOD and ProoD (`train.py --method good|prood`).

GOOD (Bitterwolf, Meinke, Hein, NeurIPS 2020, arXiv 2007.08473), GOOD_Q with Q = `--good-quantile`:

    L = mean_i CE(f(x_i), y_i) + kappa * mean_j l_j,
    l_j = log(ub_j^2 / 2 + 1),  ub_j = max_{k,l} ud_kl(z_j, eps)   for the fraction Q of out points z_j with the
                                                                     lowest bounds ub_j in the batch,
    l_j = the same at eps = 0 (the clean logit spread max_k f_k - min_l f_l)           for the others,

with ud_kl(z, eps) the IBP bound of f_k - f_l over the clipped eps-box (`utils.ibp.logit_difference_bounds`).

ProoD (Meinke, Bitterwolf, Hein, NeurIPS 2022, arXiv 2106.04260): the model is `models.prood.ProodModel`; only
its discriminator d trains (the classifier is a finished run given by `--classifier`, frozen, its weights copied
into the new run), or the classifier trains jointly with plain cross-entropy when no `--classifier` is given:

    L = mean_i log(e + e^{-d(x_i)}) + kappa * mean_j log(e + e^{u_d(z_j, eps)})   [+ mean_i CE(f(x_i), y_i)]

(the paper's logistic loss with its margin shifted by one, `logaddexp(1, -o)`, on d(x) for in points and on
-u_d for out points, u_d the IBP upper bound of d over the box). Weight decay applies to every layer of d but
its last. After training, d is deployed with its bias raised by `--prood-bias-shift` (a buffer of the model).

Schedules: kappa (default 1.0, DEFAULT_KAPPA) and eps ramp linearly from 0 to their targets between two
fractions of the run (`--kappa-ramp`, `--eps-ramp`), moving at every step rather than once per epoch as the
originals: GOOD's kappa over 20-50% of the run and eps over 20-60% by default (the paper's MNIST schedule, kappa
over epochs 2-102 of 420 and eps over 10-130, leaves short runs no clean warm-up: they collapsed to a constant
output on digits and MNIST); ProoD's kappa over the first 30% of the run as the original
(prood_config/experimental/schedule_long.yaml: linear from 0 over epochs 0-300 of 1000, then held), but eps
only over 10-40% after a clean start (see RAMPS for why). The training loop records the epoch in `opts.epoch`
and the share of its batches done in `opts.epoch_progress`. d's last layer starts as an ordinary nn.Linear
(|W| = exp(V) near 1) with 3 added to its bias, as the original's utils/factories.py.

Differences from the originals: losses are means over the batch (GOOD's code sums, with a per-batch learning
rate); ramps are fractions of `--epochs`, so short runs ramp proportionally; the training out-distribution is
`--out-data` (80M Tiny Images is withdrawn); ProoD's classifier is not re-trained with OE after d is trained
(train the classifier first, e.g. an `oe` run, and pass it as `--classifier`).
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model_params import PARAMS
from models.prood import ProodModel
from utils.cli import NON_NEGATIVE, POSITIVE
from utils.ibp import input_box, interval_bounds, logit_difference_bounds
from utils.methods.base import FlagGroup, Method
from utils.methods.shared import OUT_DATA

# L-inf radius of the certified eps-ball per in-distribution (GOOD: MNIST 0.3, SVHN 0.03, CIFAR-10 0.01;
# ProoD: CIFAR 0.01; the 8x8 digits take MNIST's). FMNIST 0.1 is our choice (neither paper trains on it; its
# textures make MNIST's 0.3 a very large ball).
CERTIFIED_EPS = {"MNIST": 0.3, "digits": 0.3, "FMNIST": 0.1, "SVHN": 0.03, "CIFAR10": 0.01, "CIFAR100": 0.01}
# kappa, the out-loss weight, is 1.0 for both methods. GOOD's paper uses 0.3 on MNIST (1.0 on CIFAR-10) with its
# 420-epoch schedule; in our shorter runs 0.3 left the bound loss stuck (measured on digits, 60 epochs, seeds
# 0-2: 93.6%, 0% and 0% of uniform-noise points certified below confidence 0.5; kappa 1.0: 97.0%, 99.4%, 97.6%;
# docs/methods.md#good). `--kappa 0.3` restores the paper's.
DEFAULT_KAPPA = 1.0
# GOOD's MNIST schedule is kappa over epochs 2-102 and eps over 10-130 of 420 (`--kappa-ramp 0.0048 0.243
# --eps-ramp 0.024 0.31`); scaled to a short run its clean warm-up vanishes and the net collapses to a constant
# output (seen on digits and MNIST), so by default the first 20% of the run is clean.
# ProoD (prood_config/experimental/schedule_long.yaml): kappa and eps both rise linearly from 0 over epochs
# 0-300 of 1000 and are held for the remaining 70%. Ours: kappa the same (but moving at every step), eps held
# at 0 for the first 10% and ramped over 10-40%. Why (measured on digits, docs/methods.md#prood): at the
# default initialisation d's features are ~0.01 and every IBP lower bound over an out box is 0 for any
# eps >= 0.01, so the out term passes no gradient to d's body; with eps > 0 from the start (or kappa = 0 in
# the whole first epoch, the original's per-epoch shape) the in term alone, scaled up by Adam, drives every
# feature to zero within the first epoch and weight decay then shrinks the body to a constant d. A clean
# start (eps = 0, kappa > 0) grows features that fire on out points and not on in points first.
RAMPS = {"good": {"kappa": (0.2, 0.5), "eps": (0.2, 0.6)},
         "prood": {"kappa": (0.0, 0.3), "eps": (0.1, 0.4)}}
# ProoD's utils/factories.py adds 3 to the last-layer bias of a negative-head discriminator after its ordinary
# nn.Linear initialisation, so d begins on the "in" side.
DISCRIMINATOR_INIT_BIAS = 3.0


@dataclass(frozen=True)
class GoodParams:
    """GOOD (Bitterwolf, Meinke, Hein, NeurIPS 2020, arXiv 2007.08473) per dataset: PARAMS fields it replaces under
    `--method good`; None keeps the dataset's default."""
    epochs: int | None = None
    arch: str | None = None
    out_data: str | None = None


# The paper's plain CNNs (size L for one channel, XL otherwise: models/good.py) and natural-image patches standing
# in for its 80M Tiny Images on the image sets. On digits the dataset's LeNet and ACET noise: measured (eps 0.3,
# kappa 1, RAMPS["good"]), at 60 epochs train.py's seeds 0-5 certify 97.0-99.4% of uniform-noise points below
# confidence 0.5; at the dataset's 15 epochs none, at 30 one seed of five none; size L on natural patches
# certified 17% and 72% (seeds 0, 1; docs/methods.md#good). 60 epochs take under a minute on a laptop CPU.
GOOD_PARAMS: dict[str, GoodParams] = {
    **{name: GoodParams(arch="good_cnn", out_data="natural_patches") for name in PARAMS},
    "digits": GoodParams(epochs=60),
    "moons": GoodParams(),
}


def good_defaults(dataset: str) -> dict:
    """The flags `--method good` sets by default on `dataset` (GOOD_PARAMS; train.py drops the None fields)."""
    return asdict(GOOD_PARAMS[dataset])


@dataclass(frozen=True)
class ProodParams:
    """ProoD (Meinke, Bitterwolf, Hein, NeurIPS 2022, arXiv 2106.04260) per dataset: PARAMS fields and ProoD flags
    it replaces under `--method prood`; None keeps the dataset's default."""
    epochs: int | None = None
    out_data: str | None = None
    discriminator_width: float = 1.0          # ProoD's S CNN at its published widths


# Measured on digits (eps 0.3, uniform noise, RAMPS["prood"]): with these defaults train.py's seeds 0, 1 and 2
# certify 98.6%, 98.4% and 98.0% of uniform-noise points below 0.5 (the earlier per-epoch ramp from 0: 0%;
# docs/methods.md#prood). A quarter-width S CNN keeps 60 epochs within CPU minutes.
PROOD_PARAMS: dict[str, ProodParams] = {
    **{name: ProodParams() for name in PARAMS},
    "digits": ProodParams(epochs=60, out_data="uniform", discriminator_width=0.25),
}


def prood_defaults(dataset: str) -> dict:
    """The flags `--method prood` sets by default on `dataset` (PROOD_PARAMS; train.py drops the None fields)."""
    return asdict(PROOD_PARAMS[dataset])


CLASSIFIER_KEYS = ("arch", "num_classes", "in_channels", "input_size", "dropout", "normalize",
                   "spectral_norm_coeff", "mod", "arch_kwargs")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def add_args(group: argparse._ArgumentGroup) -> None:
    """The good / prood flags of train.py."""
    group.add_argument("--good-quantile", type=fraction, default=0.8,
                       help="GOOD_Q: share of each out batch with the lowest bounds that gets the bound loss")
    group.add_argument("--ibp-eps", type=float, default=None,
                       help=f"L-inf radius of the certified box (default per dataset: {CERTIFIED_EPS})")
    group.add_argument("--kappa", type=float, default=None,
                       help=f"out-loss weight (default {DEFAULT_KAPPA}; GOOD's paper: MNIST 0.3)")
    group.add_argument("--kappa-ramp", type=fraction, nargs=2, default=None, metavar=("START", "END"),
                       help="kappa ramps 0 -> kappa between these fractions of the run, at every step (default: "
                            f"good {RAMPS['good']['kappa']}, prood {RAMPS['prood']['kappa']})")
    group.add_argument("--eps-ramp", type=fraction, nargs=2, default=None, metavar=("START", "END"),
                       help="eps ramps 0 -> --ibp-eps between these fractions of the run, at every step (default: "
                            f"good {RAMPS['good']['eps']}, prood {RAMPS['prood']['eps']})")
    group.add_argument("--classifier", default=None, metavar="RUN",
                       help="prood: finished classifier run (folder, or name under <runs-root>/<dataset>/); "
                            "omitted: the classifier trains jointly")
    group.add_argument("--discriminator-arch", default="good_cnn_s", help="prood: the discriminator's arch")
    group.add_argument("--discriminator-width", type=float, default=None,
                       help="prood: its channel scale (default PROOD_PARAMS: 1.0, digits 0.25)")
    group.add_argument("--prood-bias-shift", type=float, default=3.0,
                       help="prood: added to d's output at evaluation (the paper's bias shift)")


CERTIFIED_FLAGS = FlagGroup("certified out-distribution training", add_args,
                            ranges={"ibp_eps": NON_NEGATIVE, "kappa": NON_NEGATIVE, "discriminator_width": POSITIVE})


def certified_eps(opts: Namespace) -> float:
    eps = getattr(opts, "ibp_eps", None)
    if eps is None:
        if opts.dataset not in CERTIFIED_EPS:
            raise ValueError(f"no default certified eps for {opts.dataset}; pass --ibp-eps (defaults: "
                             f"{CERTIFIED_EPS})")
        eps = CERTIFIED_EPS[opts.dataset]
    return float(eps)


def training_progress(opts: Namespace) -> Optional[float]:
    """Share of the run done at this step: (epoch + share of the epoch's batches done) / epochs; None outside
    a training loop (no `opts.epoch`). train.py records the epoch, `utils.training.train_epoch` the batch."""
    epoch = getattr(opts, "epoch", None)
    if epoch is None:
        return None
    epochs = int(getattr(opts, "epochs", 1) or 1)
    return (epoch + float(getattr(opts, "epoch_progress", 0.0) or 0.0)) / epochs


def linear_ramp(progress: Optional[float], ramp: tuple[float, float]) -> float:
    """0 before the fraction start of the run, 1 from end, linear in between, evaluated at every step (the
    originals' linear ramps without their per-epoch steps); None (no loop) -> 1."""
    if progress is None:
        return 1.0
    start, end = ramp
    if end <= start:
        return float(progress >= start)
    return min(1.0, max(0.0, (progress - start) / (end - start)))


def schedule(opts: Namespace, method: str) -> tuple[float, float]:
    """(eps, kappa) of the current step: both ramps linear in the share of the run done, at every step."""
    kappa = getattr(opts, "kappa", None)
    kappa = DEFAULT_KAPPA if kappa is None else kappa
    kappa_ramp = tuple(getattr(opts, "kappa_ramp", None) or RAMPS[method]["kappa"])
    eps_ramp = tuple(getattr(opts, "eps_ramp", None) or RAMPS[method]["eps"])
    progress = training_progress(opts)
    return certified_eps(opts) * linear_ramp(progress, eps_ramp), float(kappa) * linear_ramp(progress, kappa_ramp)


def spread_loss(spread: torch.Tensor) -> torch.Tensor:
    """GOOD's out loss log(s^2 / 2 + 1) of a logit spread s >= 0."""
    return torch.log1p(spread.pow(2) / 2)


def good_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
              opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """GOOD_Q (module docstring); returns (loss, logits of the clean batch x)."""
    if x_out is None:
        raise ValueError("good needs an out-distribution batch: pass --out-data")
    quantile = float(getattr(opts, "good_quantile", 0.8))
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"--good-quantile must lie in [0, 1], got {quantile}")
    eps, kappa = schedule(opts, "good")
    logits = model(torch.cat([x, x_out]))
    logits_in, logits_out = logits[: len(x)], logits[len(x):]
    out_losses = spread_loss(logits_out.amax(1) - logits_out.amin(1))       # the clean spread, eps = 0
    n_bound = round(quantile * len(x_out))
    if n_bound > 0 and eps > 0:
        bound = logit_difference_bounds(model, *input_box(x_out, eps)).amax(dim=(1, 2))
        lowest = bound.detach().argsort()[:n_bound]
        out_losses = out_losses.index_put((lowest,), spread_loss(bound[lowest]))
    loss = F.cross_entropy(logits_in, y) + kappa * out_losses.mean()
    return loss, logits_in


def _prood(model: nn.Module) -> ProodModel:
    core = getattr(model, "module", model)
    if not isinstance(core, ProodModel):
        raise TypeError(f"the prood method needs a ProodModel (built by wrap_model), got {type(core).__name__}")
    return core


def shifted_logistic(margin: torch.Tensor) -> torch.Tensor:
    """log(e + e^{-margin}): ProoD's discriminator loss (a logistic loss with its margin shifted by one)."""
    return torch.logaddexp(torch.ones_like(margin), -margin)


def prood_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
               opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """ProoD's discriminator loss (+ CE when the classifier trains jointly); returns (loss, log-probs of x)."""
    if x_out is None:
        raise ValueError("prood needs an out-distribution batch: pass --out-data")
    core = _prood(model)
    eps, kappa = schedule(opts, "prood")
    d_in = core.discriminator(x).squeeze(1)
    _, upper_out = interval_bounds(core.discriminator, *input_box(x_out, eps))
    loss = shifted_logistic(d_in).mean() + kappa * shifted_logistic(-upper_out.squeeze(1)).mean()
    if core.freeze_classifier:
        with torch.no_grad():
            logits = core.classifier(x)
    else:
        logits = core.classifier(x)
        loss = loss + F.cross_entropy(logits, y)
    return loss, core.combine(logits.detach(), d_in.detach() + core.bias_shift)


def resolve_classifier_dir(opts: Namespace) -> Path:
    path = Path(opts.classifier)
    if not path.is_dir():
        path = Path(getattr(opts, "runs_root", "runs")) / str(opts.dataset) / str(opts.classifier)
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"--classifier {opts.classifier}: no finished run at {path} (model.pt missing); "
                                "train it first, e.g. train.py --method plain")
    return path


def _load_classifier(opts: Namespace) -> nn.Module:
    """Load the --classifier run and copy its architecture keys into opts, so that `build_model(config)`
    rebuilds the classifier from this run's config alone."""
    from utils.checkpoints import load_run, read_run_checkpoint

    path = resolve_classifier_dir(opts)
    saved = read_run_checkpoint(path)
    config = saved["config"]
    if config.get("dataset") != opts.dataset:
        raise ValueError(f"--classifier {opts.classifier} was trained on {config.get('dataset')}, not {opts.dataset}")
    if _is_wrapped(saved):  # its weights are more than the backbone's: a method wrapped it (CCU, EDL, ProoD)
        raise ValueError(f"--classifier {opts.classifier} is a {config['method']} run with a wrapped model; "
                         "ProoD takes a plain backbone (e.g. a plain or oe run)")
    classifier = load_run(path)  # the plain backbone; no method wrapper is needed, nor looked up
    for key in CLASSIFIER_KEYS:
        setattr(opts, key, config.get(key))
    return classifier


def _is_wrapped(saved: dict) -> bool:
    """Whether a checkpoint's weights differ from those of the backbone its config names (a wrapper's own
    parameters, or the backbone's under a prefix). A config that builds no model is left to load_run's error."""
    import models

    try:
        backbone = models.build_model(saved["config"])
    except (ValueError, TypeError):
        return False
    return set(saved["model"]) != set(backbone.state_dict())


def _image_shape(opts: Namespace) -> tuple[int, ...]:
    """(C, H, W) of the dataset: the discriminator is a CNN whatever the classifier's input_size says (an MLP
    classifier records its flat size)."""
    import data

    shape = tuple(getattr(opts, "data_shape", None) or data.dataset_info(opts.dataset)[1])
    if len(shape) != 3:
        raise ValueError(f"prood's discriminator is a CNN: it needs images (C, H, W), {opts.dataset} has {shape}")
    return shape


def wrap_prood(model: nn.Module, opts: Namespace, init: bool) -> ProodModel:
    """Backbone -> ProodModel(classifier, discriminator). init=True with --classifier loads that run (frozen)
    and discards the freshly built backbone; init=False rebuilds the structure from the config."""
    import models

    frozen = bool(getattr(opts, "classifier", None))
    classifier = _load_classifier(opts) if init and frozen else model
    shape = _image_shape(opts)
    disc_config = {"arch": getattr(opts, "discriminator_arch", "good_cnn_s"), "num_classes": 1,
                   "in_channels": shape[0], "input_size": shape[1],
                   "arch_kwargs": {"negative_head": True,
                                   "width": float(getattr(opts, "discriminator_width", None) or 1.0)}}
    discriminator = models.build_model(disc_config)
    if init:
        with torch.no_grad():
            discriminator.fc.bias.add_(DISCRIMINATOR_INIT_BIAS)
    bias_shift = float(getattr(opts, "prood_bias_shift", 0.0) or 0.0)
    return ProodModel(classifier, discriminator, bias_shift=bias_shift, freeze_classifier=frozen)


def prood_param_groups(model: nn.Module, opts: Namespace) -> list[dict]:
    """d's layers at (lr, weight_decay) except its last layer (no decay, as the paper); a jointly trained
    classifier at (lr, weight_decay)."""
    core = _prood(model)
    head = list(core.discriminator.fc.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in core.discriminator.parameters() if id(p) not in head_ids]
    groups = [{"params": body, "weight_decay": opts.weight_decay}, {"params": head, "weight_decay": 0.0}]
    if not core.freeze_classifier:
        groups.append({"params": list(core.classifier.parameters()), "weight_decay": opts.weight_decay})
    return groups


CERTIFIED_METHODS: dict[str, Method] = {
    "good": Method(loss=good_loss, flags=(OUT_DATA, CERTIFIED_FLAGS), dataset_defaults=good_defaults,
                   uses_out_data=True),
    "prood": Method(loss=prood_loss, flags=(OUT_DATA, CERTIFIED_FLAGS), dataset_defaults=prood_defaults,
                    uses_out_data=True, wrap_model=wrap_prood, param_groups=prood_param_groups),
}
