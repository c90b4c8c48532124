"""CCU and CCUs training (Meinke & Hein, ICLR 2020, arXiv 1909.12180; docs/methods.md#ccu-training).

With lambda = e^{loglam}, p_in = 1/(1+lambda), p_out = lambda/(1+lambda) and the CCU model's log-probabilities
log p(y|.) (the full model, not the base classifier) in every term:

    L = p_in  [ NLL(x, y)              - mean_x LSE(log p_in + log p(x|i), log p_out + log p(x|o)) ]
      + p_out [ -mean_{z,y} log p(y|z) - mean_z LSE(log p_in + log p(z|i), log p_out + log p(z|o)) ]

x is the labelled in-distribution batch, z the out batch `x_out` drawn by the training loop from `--out-data`
(the paper: 80M Tiny Images for CCU, uniform noise for CCUs). CCUs ("CEDA_GMM") fixes log p(x|o) = 0.
Trainable: the base network and the means / log-variances of the mixtures (log-weights and loglam are frozen).
After every optimiser step the out-variances are clamped to >= 4 * max in-variance, the condition of CCU's
asymptotic guarantee.

Differences from the original: in and out samples go through one joint forward pass, split at B (the original
slices `[B+1:]` and silently drops the first out sample).
"""
from __future__ import annotations

import argparse
import math
from argparse import Namespace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.ccu import CCUModel, build_ccu, load_gmm_state
from utils.cli import NON_NEGATIVE, Range
from utils.methods.base import FlagGroup, Method
from utils.methods.shared import OUT_DATA

LOG_VAR_MARGIN = math.log(4.0)   # sigma_out^2 >= 4 * max sigma_in^2 (docs/methods.md#ccu-training)
GMM_FILE = "gmm.pt"
GMM_LR = 1e-5                    # the mixtures' means and log-variances train at this lr, without weight decay


def _add_ccu(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--gmm", default=None, help="gen_gmm.py run folder (ccu, ccus)")
    group.add_argument("--gmm-lr", type=float, default=GMM_LR)
    group.add_argument("--loglam", type=float, default=0.0)


CCU_FLAGS = FlagGroup("CCU mixtures", _add_ccu, ranges={"gmm_lr": NON_NEGATIVE, "loglam": Range()})


def _core(model: nn.Module) -> CCUModel:
    """The CCUModel inside a (possibly DDP / DataParallel-wrapped) model."""
    core = getattr(model, "module", model)
    if not isinstance(core, CCUModel):
        raise TypeError(f"the ccu methods need a CCUModel (built by wrap_model), got {type(core).__name__}")
    return core


def ccu_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
             opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the module docstring; returns (loss, log-probabilities of the clean batch x)."""
    if x_out is None:
        raise ValueError("the ccu/ccus losses need an out-distribution batch: train with --out-data NAME")
    n_in = x.shape[0]
    log_probs, log_p_in, log_p_out = model(torch.cat([x, x_out.to(x.dtype)]), return_densities=True)
    loglam = _core(model).loglam
    log_prior_in, log_prior_out = -F.softplus(loglam), loglam - F.softplus(loglam)
    log_mix = torch.logaddexp(log_prior_in + log_p_in, log_prior_out + log_p_out)   # (B + B_out,)
    in_term = F.nll_loss(log_probs[:n_in], y) - log_mix[:n_in].mean()
    out_term = -log_probs[n_in:].mean() - log_mix[n_in:].mean()
    loss = log_prior_in.exp() * in_term + log_prior_out.exp() * out_term
    return loss, log_probs[:n_in]


def resolve_gmm_dir(opts: Namespace) -> Path:
    """`opts.gmm` is a run folder path, or a run name under <runs_root>/<dataset>/ (as gen_gmm.py writes it)."""
    name = getattr(opts, "gmm", None)
    if not name:
        raise ValueError("the ccu/ccus methods need --gmm RUN (a folder written by gen_gmm.py)")
    path = Path(name)
    if not path.is_dir():
        path = Path(getattr(opts, "runs_root", "runs")) / str(getattr(opts, "dataset", "")) / str(name)
    if not (path / GMM_FILE).is_file():
        raise FileNotFoundError(f"no {GMM_FILE} in {path}: run gen_gmm.py --dataset ... --name {name} first")
    return path


def load_gmm_file(path: str | Path) -> dict:
    """The tensors written by gen_gmm.py: {"metric": {V, s, mean}, "gmm_in": {...}, "gmm_out": {...}}."""
    path = Path(path)
    return torch.load(path / GMM_FILE if path.is_dir() else path, map_location="cpu", weights_only=True)


def _input_dim(opts: Namespace) -> int:
    """D of the model input: `opts.input_dim` (recorded by wrap_model at init), else the product of the
    dataset's shape (data.dataset_info), else 1 (a placeholder the mixtures resize from a loaded state)."""
    if getattr(opts, "input_dim", None):
        return int(opts.input_dim)
    try:
        import data

        return math.prod(data.dataset_info(opts.dataset)[1])
    except (AttributeError, ImportError, ValueError):
        return 1


def _components_from_file(opts: Namespace) -> tuple[int, int]:
    """(K_in, K_out) from the gmm run named in opts, for configs written without `gmm_components`."""
    try:
        state = load_gmm_file(resolve_gmm_dir(opts))
    except (FileNotFoundError, ValueError):
        return 100, 100  # the paper's default; a mismatch is then reported by the checkpoint loader
    return _components(state)


def _components(state: dict) -> tuple[int, int]:
    n_in = int(state["gmm_in"]["mu"].shape[0])
    return n_in, int(state["gmm_out"]["mu"].shape[0]) if "gmm_out" in state else n_in


def _wrapper(ccus: bool):
    def wrap_model(model: nn.Module, opts: Namespace, init: bool) -> CCUModel:
        """Backbone -> CCUModel. init=True reads the mixtures from `opts.gmm` and records their shapes in
        opts (input_dim, gmm_components = [K_in, K_out]); init=False builds placeholders from those keys."""
        loglam = float(getattr(opts, "loglam", 0.0) or 0.0)
        if not init:
            n_in, n_out = getattr(opts, "gmm_components", None) or _components_from_file(opts)
            return build_ccu(model, _input_dim(opts), n_in, n_out, loglam=loglam, ccus=ccus)
        state = load_gmm_file(resolve_gmm_dir(opts))
        dim = state["metric"]["V"].shape[1]
        expected = _input_dim(opts)
        if expected not in (1, dim):
            raise ValueError(f"the mixtures in {opts.gmm} have D={dim}, the model's input has D={expected}")
        n_in, n_out = _components(state)
        opts.input_dim, opts.gmm_components = dim, [n_in, n_out]
        ccu = build_ccu(model, dim, n_in, n_out, loglam=loglam, ccus=ccus)
        return load_gmm_state(ccu, state)
    return wrap_model


def ccu_param_groups(model: nn.Module, opts: Namespace) -> list[dict]:
    """Base network at (lr, weight_decay); each mixture's means and log-variances at (gmm_lr, 0)."""
    core = _core(model)
    groups = [{"params": list(core.base.parameters()), "lr": opts.lr, "weight_decay": opts.weight_decay}]
    gmm_lr = float(getattr(opts, "gmm_lr", GMM_LR))
    for gmm in core.gmms():
        groups.append({"params": [gmm.mu, gmm.logvar], "lr": gmm_lr, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def clamp_out_variances(model: nn.Module, opts: Optional[Namespace] = None) -> None:
    """l_out <- max(l_out, max_k l_in_k + log 4) after every step (nothing to do for CCUs)."""
    core = _core(model)
    if core.gmm_out is not None:
        core.gmm_out.logvar.clamp_(min=float(core.gmm_in.logvar.max()) + LOG_VAR_MARGIN)


CCU = Method(loss=ccu_loss, flags=(OUT_DATA, CCU_FLAGS), uses_out_data=True, wrap_model=_wrapper(ccus=False),
             param_groups=ccu_param_groups, after_step=clamp_out_variances)
CCUS = Method(loss=ccu_loss, flags=(OUT_DATA, CCU_FLAGS), uses_out_data=True, wrap_model=_wrapper(ccus=True),
              param_groups=ccu_param_groups, after_step=clamp_out_variances)

CCU_METHODS: dict[str, Method] = {"ccu": CCU, "ccus": CCUS}
