"""Helpers shared by several detectors: choice checks, the device of a model, and the one-step input perturbation
that ODIN and Mahalanobis both take (`input_gradient`, `step_direction`, `perturb`) with the grid search that tunes it
(`sweep_loader`, `select_setting`): each raises its own confidence, by ODIN's signed step or CCU's raw-gradient
variant.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from utils.metrics import ood_metrics

GRADIENTS = ("sign", "raw")
CRITERIA = ("fpr95", "auroc")


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def input_gradient(conf_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x of a per-sample confidence, and the (detached) side output of `conf_fn` at x.

    `conf_fn(x) -> (conf (N,), aux)`. The confidences are summed before the backward pass: with the model in
    eval mode every sample's confidence depends on its own input only, so the gradient of the sum holds the N
    per-sample gradients. `autograd.grad` asks for the input gradient only, so parameter `.grad`s are untouched.
    """
    # inference mode would silently disable autograd: leave it (and copy an inference tensor) for this pass
    with torch.inference_mode(False), torch.enable_grad():
        x = (x.clone() if x.is_inference() else x.detach()).requires_grad_(True)
        conf, aux = conf_fn(x)
        (grad,) = torch.autograd.grad(conf.sum(), x)
    return grad, aux.detach()


def step_direction(grad_conf: torch.Tensor, gradient: str) -> torch.Tensor:
    """The unit-eps step d, so that x~ = x + eps * d raises the confidence.

    "sign" (ODIN, Lee et al.): d = -sign(-grad_conf) with sign(0) = +1 as in the originals, which threshold the
    loss gradient with `>= 0`; a zero gradient therefore steps by -eps. "raw" (CCU): d = grad_conf.
    """
    if gradient == "sign":
        return torch.where(grad_conf > 0, 1.0, -1.0).to(grad_conf.dtype)
    return grad_conf


def perturb(x: torch.Tensor, direction: torch.Tensor, eps: float, clip: bool) -> torch.Tensor:
    x_tilde = torch.add(x, direction, alpha=eps)
    return x_tilde.clamp(0.0, 1.0) if clip else x_tilde


def select_setting(conf_in: torch.Tensor, conf_out: torch.Tensor, criterion: str,
                   fpr_convention: str = "id") -> tuple[int, dict]:
    """Index of the best of S candidate settings, given (S, N_in) and (S, N_out) confidences.

    "fpr95" minimises FPR@95%TPR (ties broken by the higher AUROC), "auroc" maximises AUROC (ties broken by the
    lower FPR); remaining ties go to the first setting in grid order. Returns (index, metrics of that setting).
    """
    check_choice("criterion", criterion, CRITERIA)
    best, best_key, best_metrics = -1, None, {}
    for index in range(conf_in.shape[0]):
        metrics = ood_metrics(conf_in[index], conf_out[index], fpr_convention=fpr_convention)
        key = ((metrics["fpr95"], -metrics["auroc"]) if criterion == "fpr95"
               else (-metrics["auroc"], metrics["fpr95"]))
        if best_key is None or key < best_key:
            best, best_key, best_metrics = index, key, metrics
    return best, best_metrics


def sweep_loader(sweep_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                 max_batches: Optional[int] = None) -> torch.Tensor:
    """Concatenate `sweep_fn(x) -> (..., B)` over a loader of (x, y) batches into (..., N) on the CPU."""
    chunks = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        chunks.append(sweep_fn(x.to(device)).cpu())
    if not chunks:
        raise ValueError("the tuning loader yielded no batches")
    return torch.cat(chunks, dim=-1)
