"""Confidence planes of 2-D toy classifiers (the ACET paper's two-moons figure, Hein et al., arXiv 1812.05720).

For each model, max_k softmax_k(f(p)) is drawn over a grid of points p of the plane, once per window, with the
training points on top: the [0,1]^2 window shows what CEDA/ACET change where the noise was drawn, the zoomed-out
window shows Theorem 3.1 (a ReLU network is overconfident far away from the data whatever it was trained on).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.attacks import eval_mode


@torch.no_grad()
def confidence_grid(model: nn.Module, window: tuple[float, float],
                    resolution: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xx, yy, conf) on a resolution x resolution grid of window x window; conf = max softmax of `model`."""
    axis = torch.linspace(window[0], window[1], resolution)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (R*R, 2)
    device = next(model.parameters()).device
    with eval_mode(model):
        conf = F.softmax(model(points.to(device)), dim=1).max(dim=1).values.cpu()
    return xx, yy, conf.view(resolution, resolution)


def confidence_planes(models: Mapping[str, nn.Module],
                      windows: Sequence[tuple[float, float]] = ((0.0, 1.0), (-10.0, 10.0)),
                      resolution: int = 200) -> dict[str, np.ndarray]:
    """The data of the confidence-plane figure, as numpy arrays (saved by scripts/moons_figure.py):
    "models" (M,) names, "windows" (W, 2), "conf" (M, W, R, R) max-softmax confidence on each window's grid."""
    conf = [[confidence_grid(model, window, resolution)[2].numpy() for window in windows] for model in models.values()]
    return {"models": np.array(list(models)), "windows": np.array(windows, dtype=np.float64),
            "conf": np.array(conf, dtype=np.float32)}


def plot_confidence_grids(planes: Mapping[str, np.ndarray], x, y, path: Optional[str] = None):
    """Draw `confidence_planes` data: one column per model, one row per window, with the training points (x, y).

    Returns the matplotlib Figure; saves it to `path` when given. Draws from arrays only, so notebooks can
    plot the saved data without a model.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    x, y = np.asarray(x), np.asarray(y)
    names, windows, conf = [str(name) for name in planes["models"]], planes["windows"], planes["conf"]
    num_classes = int(y.max()) + 1
    fig, axes = plt.subplots(len(windows), len(names), figsize=(3.6 * len(names), 3.3 * len(windows)),
                             squeeze=False, constrained_layout=True)
    image = None
    for col, name in enumerate(names):
        for row, window in enumerate(windows):
            ax = axes[row][col]
            axis = np.linspace(window[0], window[1], conf.shape[-1])  # the grid of confidence_grid
            image = ax.pcolormesh(axis, axis, conf[col, row], cmap="viridis", shading="auto",
                                  vmin=1.0 / num_classes, vmax=1.0)
            ax.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=4, edgecolors="none")
            if window[0] < 0.0 or window[1] > 1.0:  # show where the training noise lives
                ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, edgecolor="white", linewidth=0.8))
            ax.set_xlim(*window)
            ax.set_ylim(*window)
            ax.set_aspect("equal")
            ax.set_title(f"{name}, [{window[0]:g}, {window[1]:g}]$^2$", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="max softmax confidence")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Lay out, save (creating the folder) and close a figure; returns the path written."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
