"""Temperature scaling by grid search (Guo et al., "On Calibration of Modern Neural Networks", arXiv 1706.04599),
as DDU's `ModelWithTemperature` does it (docs/methods.md#temperature-scaling): p_T(y|x) = softmax(logits / T), with T
chosen from the grid {0.1, 0.2, ..., 10.0} (100 values) to minimise the NLL on a held-out validation split. Ties keep
the smallest T.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from utils.metrics import nll

# DDU's grid; built from integers so 0.3 is 0.3 and not 0.30000000000000004
TEMPERATURE_GRID: tuple[float, ...] = tuple(step / 10 for step in range(1, 101))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor,
                    temperatures: Sequence[float] = TEMPERATURE_GRID) -> float:
    """The temperature T of the grid with minimal validation NLL of softmax(logits / T) (utils.metrics.nll)."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits (N>0, K) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    best_temperature, best_nll = None, float("inf")
    for temperature in temperatures:
        value = nll(torch.softmax(logits / temperature, dim=1), labels)
        if value < best_nll:                                # strict: ties keep the smaller temperature
            best_temperature, best_nll = float(temperature), value
    if best_temperature is None:
        raise ValueError("every temperature gave a non-finite NLL; check the logits")
    return best_temperature


@torch.no_grad()
def collect_logits(model: nn.Module, loader: Iterable, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and labels (N,) of a model (eval mode) on a loader of (x, y) batches, on the CPU."""
    model.eval()
    device = next(model.parameters()).device if device is None else torch.device(device)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(logits), torch.cat(labels)

