"""Know your limits (Ulmer & Cina, UAI 2021, arXiv 2012.05329; docs/methods.md#know-your-limits): uncertainty of ReLU
classifiers far away.

Trains the toy models of docs/methods.md#toy-study on two half-moons (seconds on a CPU) and writes, under --out:
  moons_<model>.png    each score (entropy, 1 - max p, class variance, mutual information) over the paper's score
                       grid, and ||grad_x score||_2 over the (wider) gradient grid;
  moons_far_away.png   score and ||grad_x score|| along rays alpha * d, alpha in logspace(0, 4), random unit d:
                       the scores freeze and the gradients vanish far away (docs/methods.md#far-away-limit);
  regions.png          the 9-cluster PLNN [2, 5, 5, 9]: linear regions, entropy, ||grad H||, ||grad ||grad H||||;
  images_far_away_<DATASET>.png  with --runs: max-softmax confidence and its gradient norm along scaled noise
                       alpha * u for trained image models (plain, CEDA, ACET, CCU, DDU, ...).
Rows (rewritten by every invocation): <--results-root>/limits/moons.jsonl (median / quantiles of score and gradient norm per
model, score and alpha, plus the limits), regions.jsonl, and <DATASET>_rays.jsonl for --runs.

    python scripts/limits_figures.py                       # toy figures, ~1 min on a laptop CPU
    python scripts/limits_figures.py --runs runs/MNIST/plain-s0 runs/MNIST/acet-s0 runs/MNIST/ccu-s0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/limits_figures.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils import cli, limits  # noqa: E402
from utils.studies import regions, toy  # noqa: E402
from utils.plots import save_figure  # noqa: E402

# the paper's grids (start, stop, step) and colour ranges; the original's MI range [4, 5] was its bug's, MI <= 1 bit
SCORE_GRID = ((-3.5, 4.5, 0.1), (-3.0, 3.5, 0.1))
GRAD_GRID = ((-5.5, 6.5, 0.1), (-5.0, 5.5, 0.1))
COLOUR_RANGE = {"entropy": (0, 1), "max_prob": (0, 0.5), "var": (0, 0.25), "mutual_information": (0, 1),
                "confidence": (0, 1)}
SINGLE_SCORES = ("entropy", "max_prob")  # a deterministic model has no variance or mutual information


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(toy.TOY_MODELS), choices=list(toy.TOY_MODELS))
    parser.add_argument("--preset", default="tuned", choices=("tuned", "paper"),
                        help="paper: the paper's learning rates (underfit in 20 epochs); tuned: fitted (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-directions", type=int, default=64, help="random unit directions for the rays")
    parser.add_argument("--alpha-exp", type=float, nargs=2, default=(0.0, 4.0), help="alphas = logspace(a, b)")
    parser.add_argument("--n-alphas", type=int, default=41)
    parser.add_argument("--regions", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR", help="image runs for far-away curves")
    parser.add_argument("--noise", default="uniform", help="data.DATASETS noise key scaled along the rays")
    parser.add_argument("--image-directions", type=int, default=64)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/figures/limits", help="folder of the figures")
    parser.add_argument("--results-root", default="results", help="rows go to <results-root>/limits/")
    cli.add_alias(parser, "--out-dir", "--out", dest="out")
    cli.add_debug_flag(parser)
    return parser


def scores_of(name: str) -> tuple[str, ...]:
    return SINGLE_SCORES if name in ("NN", "PlattScalingNN") else tuple(toy.SCORES)


def score_maps(model: toy.ToyModel, scores: tuple[str, ...], points: torch.Tensor) -> dict:
    """{score: (score(x), ||grad_x score(x)||_2)} at every point, from one Monte-Carlo forward pass (the gradient
    of the sum, as the original)."""
    x = points.clone().requires_grad_(True)
    probs = model.predict_samples(x)
    maps = {}
    for i, score in enumerate(scores):
        value = toy.SCORES[score](probs)
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=i < len(scores) - 1)
        maps[score] = (value.detach().numpy(), grad.norm(dim=1).numpy())
    return maps


def plot_model_maps(name: str, model: toy.ToyModel, data: toy.MoonsData, path: Path) -> None:
    """Row 1: each score over the score grid; row 2: its gradient norm over the gradient grid (log colours)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = scores_of(name)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for row, grid in enumerate((SCORE_GRID, GRAD_GRID)):
        xs, ys, points = regions.grid_points(*grid)
        maps = score_maps(model, names, points)
        for col, score in enumerate(names):
            value, grad = (m.reshape(len(ys), len(xs)) for m in maps[score])
            ax = axes[row, col]
            if row == 0:
                vmin, vmax = COLOUR_RANGE[score]
                image = ax.pcolormesh(xs, ys, value, vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
                ax.set_title(f"{score}")
            else:
                image = ax.pcolormesh(xs, ys, np.clip(grad, 1e-8, None), cmap="magma", shading="auto",
                                      norm=LogNorm(1e-6, max(grad.max(), 1e-5)))
                ax.set_title(f"||grad {score}||")
            ax.scatter(*data.x_train.T, c=data.y_train, s=3, cmap="coolwarm", alpha=0.6)
            fig.colorbar(image, ax=ax, fraction=0.046)
    acc = model.accuracy(data.x_val, data.y_val)
    fig.suptitle(f"{name}: validation accuracy {100 * acc:.1f}%")
    save_figure(fig, path, dpi=80)


class _TwoLogits(nn.Module):
    """A deterministic toy model as a 2-logit network [0, f(x)] (softmax = [1 - sigmoid f, sigmoid f])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.model.logit(x)
        return torch.stack([torch.zeros_like(logit), logit], -1)


def toy_limits(name: str, model: toy.ToyModel, directions: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Exact limit probabilities (S, N, 2) of the model's samples: NN / Platt (S = 1) and each ensemble member;
    MC dropout and BBB sample fresh networks and return ("numeric", None)."""
    if name in ("NN", "PlattScalingNN"):
        return "exact", limits.limit_analysis(_TwoLogits(model), directions).probs[None]
    if name in ("NNEnsemble", "AnchoredNNEnsemble"):
        return "exact", torch.stack([limits.limit_analysis(_TwoLogits(m), directions).probs for m in model.members])
    return "numeric", None


def far_away_curves(models: dict, alphas: torch.Tensor, directions: torch.Tensor) -> dict:
    """{model: [(score, values (A, N), grad norms (A, N), limit (N,), limit method)]} along alpha * d."""
    curves: dict = {}
    for name, model in models.items():
        method, limit_probs = toy_limits(name, model, directions)
        if limit_probs is not None:
            share = float((limit_probs.mean(0).amax(-1) > 0.99).double().mean())
            print(f"{name:>18s}: limit confidence > 0.99 along {100 * share:.1f}% of the rays (exact)")
        for score in scores_of(name):
            values, grads = limits.ray_curve(model, directions, alphas, score=toy.SCORES[score])
            limit = toy.SCORES[score](limit_probs.float()) if limit_probs is not None else values[-1]
            curves.setdefault(name, []).append((score, values, grads, limit, method))
    return curves


def curve_rows(curves: dict, alphas: torch.Tensor, meta: dict) -> list[dict]:
    """One row per (model, score, alpha): quantiles of the score and its gradient norm over the directions."""
    rows, levels = [], torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for name, entries in curves.items():
        for score, values, grads, limit, method in entries:
            for i, alpha in enumerate(alphas.tolist()):
                q = torch.quantile(values[i].double(), levels).tolist()
                rows.append({**meta, "model": name, "score": score, "alpha": alpha, "score_q10": q[0],
                             "score_median": q[1], "score_q90": q[2], "grad_median": float(grads[i].median()),
                             "grad_max": float(grads[i].max()), "limit_median": float(limit.median()),
                             "limit_method": method, "max_abs_to_limit": float((values[i] - limit).abs().max())})
    return rows


def plot_rays(curves: dict, alphas: torch.Tensor, path: Path, title: str, n_show: int = 16) -> None:
    """Rows = models; per score two panels: the score along n_show rays, and its gradient norm (log-log)."""
    import matplotlib.pyplot as plt

    n_cols = 2 * max(len(entries) for entries in curves.values())
    fig, axes = plt.subplots(len(curves), n_cols, figsize=(3.3 * n_cols, 2.4 * len(curves)), squeeze=False)
    floor = 1e-12  # exact zeros (float32 probabilities saturated at 1) are drawn on the floor
    for r, (name, entries) in enumerate(curves.items()):
        for c, (score, values, grads, _, _) in enumerate(entries):
            ax_value, ax_grad = axes[r, 2 * c], axes[r, 2 * c + 1]
            ax_value.semilogx(alphas, values[:, :n_show], lw=0.8)
            ax_grad.loglog(alphas, grads[:, :n_show].clamp_min(floor), lw=0.8)
            ax_value.set_title(f"{name}: {score}", fontsize=8)
            ax_grad.set_title(f"||grad {score}||", fontsize=8)
            ax_value.set_ylim(COLOUR_RANGE[score][0], 1.04 * COLOUR_RANGE[score][1])
            ax_grad.set_ylim(floor / 2, max(10 * float(grads.max()), 1.0))
        for ax in axes[r, 2 * len(entries):]:
            ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("alpha")
    fig.suptitle(title)
    save_figure(fig, path, dpi=80)


def regions_figure(path: Path, seed: int) -> dict:
    """The polytope figure (docs/methods.md#linear-regions) on the 9-cluster toy; returns its summary row."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    x, y = regions.nine_clusters(seed=seed + 1234)
    net = regions.train_plnn(x, y, seed=seed + 1234)
    accuracy = float((net(x).argmax(1) == y).double().mean())
    xs, ys, points = regions.grid_points((-5.0, 5.05, 0.1), (-5.0, 5.05, 0.1))
    ids, count = regions.linear_regions(net, points)
    entropy, grad, grad2 = regions.entropy_maps(net, points)
    shape = (len(ys), len(xs))
    colours = torch.randperm(count, generator=torch.Generator().manual_seed(0))[ids].reshape(shape)
    grid_ids = ids.reshape(shape)
    edges = torch.zeros(shape, dtype=torch.bool)  # grid cells whose right or upper neighbour is another region
    edges[:, :-1] |= grid_ids[:, 1:] != grid_ids[:, :-1]
    edges[:-1, :] |= grid_ids[1:, :] != grid_ids[:-1, :]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    panels = [(colours, f"{count} linear regions on the grid", dict(cmap="tab20")),
              (entropy.reshape(shape), "entropy (bits)", dict(cmap="viridis", vmin=0, vmax=np.log2(9))),
              (grad.clamp_min(1e-8).reshape(shape), "||grad entropy||", dict(cmap="magma", norm=LogNorm(1e-6))),
              (grad2.clamp_min(1e-8).reshape(shape), "||grad ||grad entropy||||",
               dict(cmap="magma", norm=LogNorm(1e-6)))]
    for ax, (image, title, style) in zip(axes, panels):
        mesh = ax.pcolormesh(xs, ys, image.numpy(), shading="auto", **style)
        ax.pcolormesh(xs, ys, np.ma.masked_where(~edges.numpy(), edges.numpy()), shading="auto", cmap="gray_r",
                      vmin=0, vmax=1, alpha=1.0 if ax is axes[0] else 0.25)
        ax.scatter(*x.T, c=y, s=2, cmap="tab10", edgecolors="none")
        ax.set_title(title)
        if ax is not axes[0]:
            fig.colorbar(mesh, ax=ax, fraction=0.046)
    fig.suptitle(f"PLNN [2, 5, 5, 9] on 9 clusters (train accuracy {100 * accuracy:.1f}%)")
    save_figure(fig, path, dpi=80)
    border = (points.abs() > 4.5).any(1)  # outer ring of the grid: entropy frozen, gradients vanishing
    return {"dataset": "nine_clusters", "n_regions": count, "train_accuracy": accuracy,
            "entropy_grad_median_outer": float(grad[border].median()),
            "entropy_grad_median_inner": float(grad[~border].median())}


def image_curves(args: argparse.Namespace, alphas: torch.Tensor) -> tuple[str, dict, dict]:
    """Max-softmax confidence and its gradient norm along alpha * u (u = --noise images) for each --runs model,
    with the limit (exact for piecewise-affine networks, measured at alpha = 1e6 otherwise, e.g. CCU)."""
    import data
    from utils import methods
    from utils.runs import file_hash, resolve_data_root

    curves, info, dataset = {}, {}, None
    for run_dir in map(Path, args.runs):
        model = methods.load_run(run_dir, device=args.device)
        name = model.run_config.get("dataset")
        if dataset not in (None, name):
            raise ValueError(f"--runs mixes datasets {dataset} and {name}; pass one dataset's runs at a time")
        dataset = name
        noise = data.get_dataset(args.noise, "test", root=resolve_data_root(args.data_root), like=dataset,
                                 n=args.image_directions, seed=args.seed)
        u = next(iter(torch.utils.data.DataLoader(noise, batch_size=len(noise))))[0]
        values, grads = limits.ray_curve(model, u, alphas, batch_size=256)
        result = limits.limit_analysis(model, u, on_non_pa="numeric", batch_size=64)
        label = f"{run_dir.name} ({model.run_config.get('method', '?')})"
        share = float((result.confidence > 0.99).double().mean())
        print(f"{label:>28s}: limit confidence > 0.99 along {100 * share:.1f}% of the noise rays [{result.method}]; "
              f"median confidence {float(values[0].median()):.4f} at alpha=1 -> {float(values[-1].median()):.4f} "
              f"at alpha={float(alphas[-1]):g}, median ||grad|| {float(grads[0].median()):.2e} -> "
              f"{float(grads[-1].median()):.2e}")
        curves[label] = [("confidence", values, grads, result.confidence.float(), result.method)]
        info[label] = {"run": str(run_dir), "checkpoint": file_hash(run_dir / "model.pt"), "noise": args.noise,
                       "limit_share_confident": share}
    return dataset, curves, info


def main(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from utils.runs import git_sha, now

    out_dir, rows_dir = Path(args.out), Path(args.results_root) / "limits"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = toy.moons_data()
    alphas = torch.logspace(*args.alpha_exp, args.n_alphas)
    meta = {"dataset": "moons", "preset": args.preset, "seed": args.seed, "n_directions": args.n_directions,
            "git_sha": git_sha(), "date": now()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy networks are tiny: extra threads only add synchronisation overhead
    trained = {}
    for name in args.models:
        trained[name] = toy.train_toy(name, data, preset=args.preset, seed=args.seed)
        print(f"{name:>18s}: validation accuracy {100 * trained[name].accuracy(data.x_val, data.y_val):.1f}%")
        plot_model_maps(name, trained[name], data, out_dir / f"moons_{name}.png")
    directions = torch.randn(args.n_directions, 2, generator=torch.Generator().manual_seed(args.seed))
    directions = directions / directions.norm(dim=1, keepdim=True)
    curves = far_away_curves(trained, alphas, directions)
    rows = curve_rows(curves, alphas, meta)
    for name, entries in curves.items():
        for score, values, grads, limit, method in entries:
            print(f"{name:>18s} {score:>18s}: rays still above 0.01 at alpha={float(alphas[-1]):g}: "
                  f"{100 * float((values[-1] > 0.01).double().mean()):5.1f}%, max |score - limit| "
                  f"{float((values[-1] - limit).abs().max()):.1e} ({method}), max ||grad|| "
                  f"{float(grads[0].max()):.1e} at alpha=1 -> {float(grads[-1].max()):.1e}")
    write_rows(rows_dir / "moons.jsonl", rows)
    plot_rays(curves, alphas, out_dir / "moons_far_away.png", "Two moons: scores along alpha * d, d random unit")
    if args.regions:
        summary = {**regions_figure(out_dir / "regions.png", args.seed), "git_sha": meta["git_sha"], "date": now()}
        print(f"regions: {summary['n_regions']} linear regions on [-5, 5]^2, train accuracy "
              f"{100 * summary['train_accuracy']:.1f}%, median ||grad H|| inside |x| <= 4.5 "
              f"{summary['entropy_grad_median_inner']:.2e} vs the outer ring "
              f"{summary['entropy_grad_median_outer']:.2e}")
        write_rows(rows_dir / "regions.jsonl", [summary])
    torch.set_num_threads(threads)
    if args.runs:
        dataset, curves, info = image_curves(args, alphas)
        meta = {"dataset": dataset, "seed": args.seed, "n_directions": args.image_directions,
                "git_sha": meta["git_sha"], "date": now()}
        image = [{**row, **info[row["model"]]} for row in curve_rows(curves, alphas, meta)]
        write_rows(rows_dir / f"{dataset}_rays.jsonl", image)
        plot_rays(curves, alphas, out_dir / f"images_far_away_{dataset}.png",
                  f"{dataset}: max-softmax confidence along alpha * u, u = {args.noise} noise")
    print(f"figures in {out_dir}, rows in {rows_dir}")


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rewrite `path` with `rows` as JSON lines (the rows of one invocation)."""
    import json

    from utils.runs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
