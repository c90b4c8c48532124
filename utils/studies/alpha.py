"""The ACET paper's alpha-scaling experiment (Hein et al., CVPR 2019, arXiv 1812.05720, Table 2;
docs/methods.md#alpha-scaling).

Theorem 3.1 says a ReLU network becomes arbitrarily confident along almost every ray alpha * x. For each of `--n`
draws x ~ U[0,1]^d the study finds the smallest alpha >= 1 with conf(alpha x) = max_k softmax_k(f(alpha x)) >= 0.999
and reports the median; then the percentage of predictions with confidence > 95% on clip(alpha x, 0, 1), the
scaled noise projected back to the image domain. The paper's code for this table was not released; here the
projected noise uses each sample's own alpha (alpha_max for samples that never reach the target).

Search (`min_alpha`): a geometric grid 1 = a_0 < a_1 < ... < a_G = alpha_max with ratio `grid_factor`, evaluated
on the samples not yet confident, then a batched geometric bisection inside the first grid cell where the
confidence reaches the target. Confidence is not monotone in alpha in general: the result is the first crossing
the grid sees, exact to `rel_tol`. Samples never reaching the target get alpha = inf ("> alpha_max").

    python gen_attack_stats.py --study alpha --dataset MNIST            # the runs of model_paths.MODEL_PATHS
    python gen_attack_stats.py --study alpha --runs runs/MNIST/plain-s0 runs/MNIST/acet-s0
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.attacks import eval_mode
from utils.byom import add_model_args, run_target, study_targets
from utils.cli import AT_LEAST_ONE, UNIT_OPEN, Range
from utils.progress import bar
from utils.studies import add_common_args, dataset_of_runs

RANGES = {"n": AT_LEAST_ONE, "target": UNIT_OPEN, "alpha_max": Range(1.0),
          "grid_factor": Range(1.0, low_inclusive=False), "overconf": UNIT_OPEN, "batch_size": AT_LEAST_ONE}


@torch.no_grad()
def max_confidence(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """max_k softmax_k(f(x)) per sample, in eval mode, in chunks of `batch_size`."""
    with eval_mode(model):
        chunks = [F.softmax(model(x[i:i + batch_size]), dim=1).max(dim=1).values
                  for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else x.new_zeros(0)


@torch.no_grad()
def min_alpha(model: nn.Module, x: torch.Tensor, target: float = 0.999, alpha_max: float = 1e20,
              grid_factor: float = 1.25, rel_tol: float = 1e-4, batch_size: int = 1000) -> torch.Tensor:
    """(N,) float64: per sample the smallest alpha in [1, alpha_max] with conf(alpha x) >= target found by a
    geometric grid plus bisection (see module docstring); inf where the target is never reached."""
    if grid_factor <= 1 or alpha_max < 1:
        raise ValueError(f"need grid_factor > 1 and alpha_max >= 1, got {grid_factor}, {alpha_max}")
    n = len(x)
    n_grid = max(1, math.ceil(math.log(alpha_max) / math.log(grid_factor))) if alpha_max > 1 else 0
    grid = torch.logspace(0, math.log10(alpha_max), n_grid + 1, dtype=torch.float64) if n_grid else \
        torch.ones(1, dtype=torch.float64)
    grid[0], grid[-1] = 1.0, alpha_max
    lo = torch.ones(n, dtype=torch.float64)  # largest grid alpha known to be below target
    hi = torch.full((n,), math.inf, dtype=torch.float64)  # first grid alpha at or above target
    active = torch.arange(n)
    for j, alpha in enumerate(grid.tolist()):
        if len(active) == 0:
            break
        hit = (max_confidence(model, alpha * x[active], batch_size) >= target).cpu()
        hi[active[hit]] = alpha
        lo[active[hit]] = grid[j - 1] if j > 0 else alpha
        active = active[~hit]
    # batched geometric bisection on every sample with lo < hi < inf
    todo = torch.nonzero(torch.isfinite(hi) & (hi > lo)).flatten()
    while len(todo):
        mid = torch.sqrt(lo[todo] * hi[todo])
        scaled = mid.to(x.dtype).to(x.device).view(-1, *([1] * (x.dim() - 1))) * x[todo]
        hit = (max_confidence(model, scaled, batch_size) >= target).cpu()
        hi[todo[hit]] = mid[hit]
        lo[todo[~hit]] = mid[~hit]
        todo = todo[(hi[todo] / lo[todo]) > 1 + rel_tol]
    return hi


def overconfident_fraction(model: nn.Module, x: torch.Tensor, alpha: torch.Tensor, alpha_max: float,
                           threshold: float = 0.95, batch_size: int = 1000) -> float:
    """Fraction of clip(alpha_i x_i, 0, 1) predicted with confidence > threshold (alpha_max where alpha_i = inf)."""
    used = torch.where(torch.isfinite(alpha), alpha, torch.full_like(alpha, alpha_max))
    scaled = (used.to(x.device).view(-1, *([1] * (x.dim() - 1))) * x.double()).clamp(0.0, 1.0).to(x.dtype)
    return float((max_confidence(model, scaled, batch_size) > threshold).double().mean())


def median_of(values: torch.Tensor) -> float:
    """The usual median (mean of the two middle values for even N), with inf allowed (then inf, never NaN)."""
    ordered = values.double().sort().values
    k = len(ordered) // 2
    return float(ordered[k]) if len(ordered) % 2 else float((ordered[k - 1] + ordered[k]) / 2)


def format_alpha(alpha: float, alpha_max: float) -> str:
    if not math.isfinite(alpha):
        return f"> {alpha_max:.0e}"
    return f"{alpha:.1f}" if alpha < 1000 else f"{alpha:.1e}"


def add_args(parser: argparse.ArgumentParser) -> None:
    import model_paths

    model_paths.add_run_args(parser, "study")
    add_model_args(parser)
    parser.add_argument("--n", type=int, default=10000, help="uniform noise draws (paper: 10 000)")
    parser.add_argument("--target", type=float, default=0.999, help="confidence alpha must reach")
    parser.add_argument("--alpha-max", type=float, default=1e20)
    parser.add_argument("--grid-factor", type=float, default=1.25, help="ratio of the geometric alpha grid")
    parser.add_argument("--overconf", type=float, default=0.95, help="'overconfident' threshold of row 2")
    parser.add_argument("--float64", action=argparse.BooleanOptionalAction, default=False,
                        help="run the models in float64 (precision at very large alpha)")
    parser.add_argument("--batch-size", type=int, default=1000)
    add_common_args(parser, data_root=False)


def _run_list(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(label, run_dir) once per network; an ensemble's members are ordinary runs, studied one by one."""
    import model_paths

    return model_paths.distinct_runs(args.dataset, args.runs_root, args.runs, include_ensembles=False)


def study_run(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict:
    alpha = min_alpha(model, x, args.target, args.alpha_max, args.grid_factor, batch_size=args.batch_size)
    median = median_of(alpha)
    return {"median_alpha": median if math.isfinite(median) else None,
            "median_alpha_str": format_alpha(median, args.alpha_max),
            "reached": float(torch.isfinite(alpha).double().mean()),
            "pct_overconfident": 100 * overconfident_fraction(model, x, alpha, args.alpha_max, args.overconf,
                                                              args.batch_size)}


def alpha_table(rows: list[dict]) -> str:
    """Markdown: one column per label (latest row per run; mean over several runs), rows = the paper's two."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["label"], row["run"])] = row
    labels = list(dict.fromkeys(label for label, _ in latest))
    median_cells, pct_cells = [], []
    for label in labels:
        group = [r for (lab, _), r in latest.items() if lab == label]
        alphas = [r["median_alpha"] if r["median_alpha"] is not None else math.inf for r in group]
        median_cells.append(format_alpha(sum(alphas) / len(alphas), group[0]["alpha_max"]))
        pct_cells.append(f"{sum(r['pct_overconfident'] for r in group) / len(group):.1f}%")
    r0 = rows[0]
    lines = [f"Alpha scaling ({r0['dataset']}, {r0['n']} uniform draws): median smallest alpha with "
             f"conf(alpha x) >= {r0['target']}; % of clip(alpha x, 0, 1) with conf > {r0['overconf']}.", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
             "| median alpha | " + " | ".join(median_cells) + " |",
             "| % overconfident | " + " | ".join(pct_cells) + " |"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    import data
    from utils import methods
    from utils import runs

    if args.dataset is None:
        args.dataset = dataset_of_runs(args.runs)
        if args.dataset is None:
            raise ValueError("pass --dataset (it names the result files and the noise shape)")
    _, shape = data.dataset_info(args.dataset)
    dtype = torch.float64 if args.float64 else torch.float32
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.n, *shape), generator=generator, dtype=torch.float64).to(args.device, dtype)
    targets = study_targets(args, lambda: [
        run_target(label, [run_dir], lambda d=run_dir: methods.load_run(d, device=args.device))
        for label, run_dir in _run_list(args)])
    rows = []
    for target in bar(targets, getattr(args, "progress", None), desc="models"):
        model, checkpoint = target.load()
        model, label, run_dir = model.to(dtype), target.label, target.run
        row = {"study": "alpha", "dataset": args.dataset, "label": label, "run": run_dir,
               "checkpoint": checkpoint, "n": args.n, "target": args.target,
               "alpha_max": args.alpha_max, "overconf": args.overconf, "seed": args.seed,
               "float64": args.float64, **study_run(model, x, args), "git_sha": runs.git_sha(),
               "date": runs.now(), **getattr(args, "row_tags", {})}
        print(f"{label:>12s} {run_dir}: median alpha {row['median_alpha_str']}, reached {100 * row['reached']:.1f}%,"
              f" overconfident {row['pct_overconfident']:.1f}%")
        rows.append(row)
    name = f"{args.dataset}_alpha"
    table = runs.record_study(args.results_root, name, name, rows, alpha_table)
    print(table)
