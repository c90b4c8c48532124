"""ODIN: temperature scaling plus input preprocessing (Liang, Li, Srikant, ICLR 2018, arXiv 1706.02690).

The input-perturbation helpers it shares with the Mahalanobis detector live in `utils.detectors.common`.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from utils.detectors.base import Detector
from utils.detectors.common import (CRITERIA, GRADIENTS, check_choice, input_gradient, model_device, perturb,
                                    select_setting, step_direction, sweep_loader)

# the ODIN paper's grid (docs/methods.md#odin-tuning); CCU's copy (its utils/odin.py) adds T = 100.
ODIN_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 200.0, 500.0, 1000.0)
CCU_ODIN_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
ODIN_EPS_GRID: tuple[float, ...] = tuple(float(e) for e in np.linspace(0.0, 0.004, 21))


class ODIN(Detector):
    """ODIN score S(x~; T) = max_k softmax(f(x~) / T)_k (Liang et al., arXiv 1706.02690, docs/methods.md#odin).

    x~ = x - eps * sign(-grad_x log S_yhat(x; T)), yhat = argmax_k f_k(x), sign(0) = +1, no clipping: the
    original (calData.py). With T = 1 and eps = 0 this is the MSP baseline.

    eps is in [0, 1] pixel units. The original normalises outside the network and steps the *normalised*
    input by eps * sign(g_norm) / std_c per channel. Since x_norm = (x - m_c) / std_c, the pixel-space gradient
    is g_norm / std_c, which has the same sign (std_c > 0), and a step of eps / std_c in x_norm is a step of
    exactly eps in x. Our models normalise inside their first layer, so differentiating with respect to the
    [0, 1] input and stepping by eps gives the identical x~ with no std division.

    gradient="raw" is CCU's variant (**[DIFF]**): x~ = clip(x + eps * grad_x log S_yhat(x; T), 0, 1),
    an unsigned gradient-ascent step. `clip` defaults to False for "sign" (as ODIN) and True for "raw" (as CCU).
    Scores are computed in float64 (the original used float32 logits with max-subtraction).
    """

    needs_grad = True
    tunable = True
    returns_probability = True

    def __init__(self, model: nn.Module, temperature: float = 1000.0, eps: float = 0.0014,
                 gradient: str = "sign", clip: Optional[bool] = None) -> None:
        super().__init__(model)
        self.temperature = float(temperature)
        self.eps = float(eps)
        self.gradient = check_choice("ODIN gradient", gradient, GRADIENTS)
        self.clip = (gradient == "raw") if clip is None else bool(clip)

    def _log_conf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return (logits / self.temperature).log_softmax(dim=1).amax(dim=1), logits

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.double() / self.temperature).softmax(dim=1).amax(dim=1)

    def _direction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad, logits = input_gradient(self._log_conf, x)
        return step_direction(grad, self.gradient), logits

    def perturb(self, x: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
        """The preprocessed input x~ at this detector's temperature (and eps unless given)."""
        direction, _ = self._direction(x)
        return perturb(x, direction, self.eps if eps is None else float(eps), self.clip)

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        return self.confidence_sweep(x, [self.eps])[0]

    def confidence_sweep(self, x: torch.Tensor, eps_list: Sequence[float]) -> torch.Tensor:
        """(len(eps_list), N) scores at this temperature, from ONE backward pass shared by all eps.

        The step direction does not depend on eps, so each extra eps costs one forward pass; eps = 0 reuses
        the logits of the gradient pass (inputs are in [0, 1], so clipping would not move them).
        """
        direction, logits = self._direction(x)
        rows = []
        with torch.inference_mode():  # a little faster than no_grad; the stack below leaves inference mode
            for eps in eps_list:
                step_logits = logits if eps == 0 else self.model(perturb(x, direction, float(eps), self.clip))
                rows.append(self._score(step_logits))
        return torch.stack(rows)

    def _grid_scores(self, temperatures: Sequence[float], eps_grid: Sequence[float]):
        def sweep(x: torch.Tensor) -> torch.Tensor:  # (T, E, B)
            rows = []
            for temperature in temperatures:
                self.temperature = float(temperature)
                rows.append(self.confidence_sweep(x, eps_grid))
            return torch.stack(rows)
        return sweep

    def tune(self, loader_in: Iterable, loader_out: Iterable,
             temperatures: Sequence[float] = ODIN_TEMPERATURES, eps_grid: Sequence[float] = ODIN_EPS_GRID,
             criterion: str = "fpr95", fpr_convention: str = "id", max_batches: Optional[int] = None) -> dict:
        """Choose (T, eps) on held-out in/out validation data, set them on the detector, return the choice.

        ODIN (docs/methods.md#odin-tuning) tunes on 1 000 held-out OOD images by FPR@95; CCU by AUROC against Tiny
        Images (pass `temperatures=CCU_ODIN_TEMPERATURES, criterion="auroc", gradient="raw"`). Each batch costs
        one backward pass per temperature plus one forward per nonzero eps. Returns temperature, eps, criterion
        and the validation metrics of the choice (`val_auroc`, `val_fpr95`, ...).
        """
        check_choice("criterion", criterion, CRITERIA)
        saved_temperature = self.temperature
        device = model_device(self.model)
        try:
            sweep = self._grid_scores(temperatures, eps_grid)
            conf_in = sweep_loader(sweep, loader_in, device, max_batches).flatten(0, 1)  # (T*E, N_in)
            conf_out = sweep_loader(sweep, loader_out, device, max_batches).flatten(0, 1)
        finally:
            self.temperature = saved_temperature
        index, metrics = select_setting(conf_in, conf_out, criterion, fpr_convention)
        self.temperature = float(temperatures[index // len(eps_grid)])
        self.eps = float(eps_grid[index % len(eps_grid)])
        return {"temperature": self.temperature, "eps": self.eps, "criterion": criterion,
                **{f"val_{name}": value for name, value in metrics.items()}}
