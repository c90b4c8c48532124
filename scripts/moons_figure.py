"""The ACET paper's two-moons toy (Hein et al., CVPR 2019, arXiv 1812.05720; docs/methods.md#two-moons-toy).

An MLP 2-100-100-2 is trained full batch with Adam (lr 0.01) on two moons rescaled into [0,1]^2, three ways:
  plain  mean CE, 400 iterations;
  ceda   mean CE + mean max log-confidence on 2N uniform points of [0,1]^2 drawn every iteration, 3000
         iterations (the notebook's equal weighting of the two means, see `toy_loss`);
  acet   the same on adversarial noise: PGD L-inf eps 0.025, 4 steps of 0.02, random start, keep best
         (`utils.attacks.confidence_attack`; the notebook's PGD undid its own steps [BUG], here they apply).
It saves max-confidence planes on [0,1]^2 and zoomed out to [-10,10]^2 (results/figures/moons_confidence.png),
their data next to the figure (moons_confidence.npz: what notebooks/moons.ipynb draws, no model needed) and
prints, per model, validation accuracy and the mean max-confidence on uniform noise in [0,1]^2 and on points at
radius 10 from the centre of the square, where Theorem 3.1 predicts every ReLU network is confident again.

    python scripts/moons_figure.py [--iterations-scale 0.25] [--out results/figures/moons_confidence.png]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/moons_figure.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from utils.attacks import CONF_OBJECTIVES, confidence_attack  # noqa: E402

ITERATIONS = {"plain": 400, "ceda": 3000, "acet": 3000}  # the notebook's: 400 plain, 3000 with noise
# the toy's attack (docs/methods.md#two-moons-toy); out_loss max_conf as for every CEDA/ACET model of the paper
TOY_OPTS = Namespace(out_loss="max_conf", attack_eps=0.025, attack_steps=4, attack_step_size=0.02,
                     attack_norm="linf", attack_random_start=True)


def moons_tensors(split: str = "train", root: str = "datasets") -> tuple[torch.Tensor, torch.Tensor]:
    """All of two moons' `split` as (x (N, 2) float32 in [0,1]^2, y (N,) int64)."""
    import data

    dataset = data.get_dataset("moons", split=split, root=root)
    if hasattr(dataset, "tensors"):
        return dataset.tensors()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs).float(), torch.as_tensor(ys, dtype=torch.int64)


def build_mlp() -> nn.Module:
    """ACET's toy network, 2-100-100-2 with ReLU (models.MODELS["mlp"])."""
    import models

    return models.MODELS["mlp"](num_classes=2, in_channels=1, input_size=2, widths=(100, 100))


def toy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, method: str,
             opts: Namespace = TOY_OPTS) -> torch.Tensor:
    """The notebook's objective: mean_i CE(f(x_i), y_i) + mean_j l_out(z^_j), the two means weighted equally.

    [DIFF] `utils.methods.noise` (the paper's train.py) weights every sample equally, (1/(N+2N)) [sum CE +
    sum l_out], which gives the 2N toy noise points 2/3 of the loss; with the fixed (effective) PGD that
    pulls the noise onto the moons, one moon then collapses to confidence 1/2 (validation accuracy ~0.5), so
    the toy keeps the notebook's equal weighting.
    """
    loss = F.cross_entropy(model(x), y)
    if method == "plain":
        return loss
    if method == "acet":
        z = confidence_attack(model, z, opts.attack_eps, opts.attack_steps, opts.attack_step_size,
                              opts.attack_norm, opts.attack_random_start, loss=opts.out_loss)
    return loss + CONF_OBJECTIVES[opts.out_loss](model(z)).mean()


def train_moons(method: str, x: torch.Tensor, y: torch.Tensor, iterations: int | None = None, seed: int = 0,
                lr: float = 0.01, opts: Namespace = TOY_OPTS) -> nn.Module:
    """Train the toy MLP full batch with `method` in {plain, ceda, acet}; noise = 2N uniform points of [0,1]^2."""
    if method not in ITERATIONS:
        raise ValueError(f"unknown moons method {method!r}; valid: {', '.join(ITERATIONS)}")
    torch.manual_seed(seed)
    model = build_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(ITERATIONS[method] if iterations is None else iterations):
        z = torch.rand(2 * len(x), 2)  # fresh uniform noise in the unit square every iteration
        loss = toy_loss(model, x, y, z, method, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def mean_confidence(model: nn.Module, points: torch.Tensor) -> float:
    return float(F.softmax(model(points), dim=1).max(dim=1).values.mean())


def far_points(n: int = 1000, radius: float = 10.0) -> torch.Tensor:
    """n points evenly spaced on the circle of `radius` around the centre (0.5, 0.5) of the unit square."""
    angle = torch.arange(n, dtype=torch.float32) * (2 * math.pi / n)
    return 0.5 + radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def summary(models: dict[str, nn.Module], x_val: torch.Tensor, y_val: torch.Tensor,
            n_noise: int = 10000, seed: int = 1) -> dict[str, dict[str, float]]:
    """Per model: val accuracy, mean max-conf on U[0,1]^2 noise and at radius 10."""
    noise = torch.rand(n_noise, 2, generator=torch.Generator().manual_seed(seed))
    far = far_points()
    stats = {}
    for name, model in models.items():
        with torch.no_grad():
            accuracy = float((model(x_val).argmax(dim=1) == y_val).float().mean())
        stats[name] = {"val_accuracy": accuracy, "mmc_uniform": mean_confidence(model, noise),
                       "mmc_radius10": mean_confidence(model, far)}
    return stats


def save_figure_data(path: Path, planes: dict, x: torch.Tensor, y: torch.Tensor,
                     stats: dict[str, dict[str, float]]) -> None:
    """The figure's arrays plus the training points and per-model summary columns ("<stat>", (M,)), in one npz
    written atomically (temporary file, then rename), loadable with allow_pickle=False."""
    import os

    import numpy as np

    columns = {key: np.array([stats[str(name)][key] for name in planes["models"]]) for key in next(iter(stats.values()))}
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez_compressed(handle, x=x.numpy(), y=y.numpy(), **planes, **columns)
    os.replace(partial, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(ITERATIONS), choices=list(ITERATIONS))
    parser.add_argument("--iterations-scale", type=float, default=1.0, help="multiply the iteration counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--out", default="results/figures/moons_confidence.png")
    return parser


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import matplotlib

    matplotlib.use("Agg")
    from utils.plots import confidence_planes, plot_confidence_grids

    x, y = moons_tensors("train", args.data_root)
    x_val, y_val = moons_tensors("val", args.data_root)
    trained = {}
    for method in args.methods:
        start = time.perf_counter()
        iterations = max(1, round(ITERATIONS[method] * args.iterations_scale))
        trained[method] = train_moons(method, x, y, iterations, args.seed)
        print(f"trained {method}: {iterations} iterations in {time.perf_counter() - start:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    planes = confidence_planes(trained)
    plot_confidence_grids(planes, x, y, path=args.out)
    stats = summary(trained, x_val, y_val)
    save_figure_data(Path(args.out).with_suffix(".npz"), planes, x, y, stats)
    print("\n| model | val accuracy | MMC uniform [0,1]^2 | MMC radius 10 |\n|---|---|---|---|")
    for name, row in stats.items():
        print(f"| {name} | {row['val_accuracy']:.3f} | {row['mmc_uniform']:.3f} | {row['mmc_radius10']:.3f} |")
    print(f"\nsaved {args.out} and its data {Path(args.out).with_suffix('.npz')}")
    return stats


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
