"""Linear (activation) regions of small ReLU networks on 2-D grids, and the 9-cluster toy of Ulmer & Cina.

Ulmer & Cina, "Know your limits", UAI 2021, arXiv 2012.05329, polytope figure (docs/methods.md#linear-regions): a PLNN
[2, 5, 5, 9] trained on 9 Gaussian clusters; its entropy (base 2), ||grad entropy|| and ||grad ||grad entropy|||| are
plotted over [-5, 5]^2 next to the network's linear regions. The original enumerated the regions with GeoCert
(Jordan et al. 2019, l_inf ball of radius 5); here a region is the set of grid points that share one
activation pattern (`utils.limits.activation_pattern`), which finds every region that contains a grid point
(regions thinner than the grid step can be missed, never invented).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.limits import activation_pattern

# The nine cluster centres of the original notebook (labels 0..8 in this order).
NINE_CENTRES = ((0.5, -0.5), (0.0, -1.5), (-1.3, -1.0), (-1.5, 0.0), (-0.1, 0.5), (-2.5, 0.5), (1.5, 0.0),
                (2.0, 1.1), (2.0, -1.5))


def nine_clusters(n_per_cluster: int = 50, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """9 isotropic Gaussian clusters at `NINE_CENTRES`, variance U(0.02, 0.1) per cluster: x (450, 2), y (450,)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, centre in enumerate(NINE_CENTRES):
        variance = rng.uniform(0.02, 0.1)
        xs.append(rng.normal(centre, np.sqrt(variance), size=(n_per_cluster, 2)))
        ys.append(np.full(n_per_cluster, label))
    order = rng.permutation(n_per_cluster * len(NINE_CENTRES))
    x = torch.as_tensor(np.concatenate(xs)[order], dtype=torch.float32)
    return x, torch.as_tensor(np.concatenate(ys)[order], dtype=torch.long)


def make_plnn(sizes: Sequence[int] = (2, 5, 5, 9)) -> nn.Sequential:
    """Piecewise-linear network Linear -> ReLU -> ... -> Linear with the given layer sizes."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_plnn(x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int] = (2, 5, 5, 9), epochs: int = 100,
               batch_size: int = 8, lr: float = 1e-3, seed: int = 1234) -> nn.Sequential:
    """Cross-entropy training with Adam (the paper's: lr 1e-3, batch 8, 100 epochs, seed 1234); eval mode."""
    torch.manual_seed(seed)
    net = make_plnn(sizes)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def grid_points(x_range: tuple[float, float, float], y_range: tuple[float, float, float]):
    """np.arange grids as in the original plots: (xs, ys, points (len(ys) * len(xs), 2)), row-major in y."""
    xs, ys = np.arange(*x_range), np.arange(*y_range)
    xx, yy = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
    return xs, ys, points


def linear_regions(model: nn.Module, points: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Region id per point (equal ids = equal activation pattern = same affine piece) and the region count."""
    patterns = activation_pattern(model, points)
    _, ids = torch.unique(patterns, dim=0, return_inverse=True)
    return ids, int(ids.max()) + 1 if len(ids) else 0


def entropy_maps(model: nn.Module, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax entropy H (bits), ||grad_x H|| and ||grad_x ||grad_x H|||| at each point (double backprop)."""
    x = points.detach().clone().requires_grad_(True)
    probs = torch.softmax(model(x), -1)
    entropy = -(probs * torch.log2(probs + 1e-8)).sum(-1)
    (grad,) = torch.autograd.grad(entropy.sum(), x, create_graph=True)
    grad_norm = grad.norm(dim=1)
    (grad2,) = torch.autograd.grad(grad_norm.sum(), x)
    return entropy.detach(), grad_norm.detach(), grad2.norm(dim=1)
