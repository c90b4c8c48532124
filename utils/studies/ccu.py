"""CCU Table 1: adversarial noise inside CCU's certified balls (`gen_attack_stats.py --study ccu`).

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), docs/methods.md#ccu-attack-study. For each seed x0 (uniform noise by
default) the CCU run gives a certified radius R(x0) in its PCA metric; every model of the table is then attacked inside
B(x0, R) intersected with [0,1]^D, maximising its log-confidence max_y log p(y|x):

  * work in whitened coordinates u = x V^T / sqrt(s), where the ball is Euclidean;
  * `restarts` random starts u0 + R (U[0,1] - 0.5) per coordinate, `steps` ascent steps on the raw gradient
    times a per-sample step alpha (initially 3.0): if the log-confidence got worse, go back to the previous
    point and halve alpha, otherwise accept and multiply alpha by 1.1;
  * after every step: project onto the ball in u, map to pixels, clip to [0,1], map forward again.

Rows, all x100: TE (test error), MMC (mean confidence of the adversarial samples), SR (share of adversarial
samples with log-conf >= the median in-distribution test log-conf) and AUC (in-test vs adversarial noise).

Differences from the original `gen_pca_noise`: "revert" really restores the previous point (the original kept
the stepped one through an aliased in-place update); every restart uses the given step size; and the returned
sample is pulled radially towards its seed after the final alternating projections, so it lies in the ball AND
in the box exactly (the seed is in the box, so the segment towards it stays there).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import model_paths
from models.gmm import PCAMetric
from utils.amp import attack_autocast
from utils.attacks import eval_mode
from utils.cli import AT_LEAST_ONE, NON_NEGATIVE_INT, POSITIVE, Range
from utils.byom import add_model_args, load_external
from utils.detectors.bayes import load_network
from utils.detectors.logit import MSP
from utils.progress import bar
from utils.studies import add_common_args
from utils.studies.ccu_targets import EntryModel, entry_model

STUDY = "ccu_attack"
RANGES = {"n_seeds": AT_LEAST_ONE, "restarts": AT_LEAST_ONE, "steps": NON_NEGATIVE_INT, "step_size": POSITIVE,
          "f": Range(1.0), "n_test": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "test_batch_size": AT_LEAST_ONE}


def log_conf(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the attack maximises: a table column's own objective (`ccu_targets.EntryModel.objective`), else
    max_y log softmax(model(x)); for CCU's log-probability outputs this is max_y log p(y|x)."""
    if hasattr(model, "objective"):
        return model.objective(x)
    return F.log_softmax(model(x), dim=1).amax(dim=1)


def _to_ball_and_box(u: torch.Tensor, u_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric) -> torch.Tensor:
    """One alternating projection: L2 ball of radius R around u_seed in u, then the [0,1] box in pixels."""
    delta = u - u_seed
    delta = delta * (radius[:, None] / delta.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return metric.whiten(metric.unwhiten(u_seed + delta).clamp(0.0, 1.0))


def _pull_inside(x: torch.Tensor, x_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric) -> torch.Tensor:
    """Move each x towards its seed until d(x, seed) <= R: exact feasibility for ball and box (flat (N, D))."""
    dist = metric.distance(x, x_seed)
    scale = (radius * (1.0 - 1e-6) / dist.clamp_min(1e-30)).clamp(max=1.0)
    return x_seed + (x - x_seed) * scale[:, None]


def _score_and_grad(model: nn.Module, u: torch.Tensor, metric: PCAMetric, shape: tuple) -> tuple:
    u = u.detach().requires_grad_(True)
    with attack_autocast(u.device):  # --amp: the ascent steps only; reported scores are taken in float32
        score = log_conf(model, metric.unwhiten(u).view(-1, *shape)).float()
    (grad,) = torch.autograd.grad(score.sum(), u)
    return score.detach(), grad


def pca_ball_attack(model: nn.Module, x_seed: torch.Tensor, radius: torch.Tensor, metric: PCAMetric,
                    restarts: int = 50, steps: int = 500, step_size: float = 3.0, final_projections: int = 10,
                    generator: torch.Generator | None = None,
                    progress: bool | None = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Most confident point of model within {d(x, x_seed) <= R} cap [0,1]^D, per seed (batched).

    x_seed (N, C, H, W) in [0,1], radius (N,) in the PCA metric. Returns (x_adv (N, C, H, W), log_conf (N,)),
    the best of the seed itself and every restart; both detached.
    """
    shape, n = tuple(x_seed.shape[1:]), x_seed.shape[0]
    metric = metric.to(x_seed.device)
    flat_seed = x_seed.reshape(n, -1).detach()
    radius = radius.to(x_seed.device, x_seed.dtype)
    u_seed = metric.whiten(flat_seed)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            best_score = log_conf(model, x_seed)
        best_x = flat_seed.clone()
        for _ in bar(range(restarts), progress, desc="restarts", leave=False):
            noise = torch.rand(u_seed.shape, generator=generator, dtype=u_seed.dtype).to(u_seed.device) - 0.5
            u = _to_ball_and_box(u_seed + radius[:, None] * noise, u_seed, radius, metric)
            score, grad = _score_and_grad(model, u, metric, shape)
            alpha = torch.full_like(radius, step_size)
            for _ in range(steps):
                cand = _to_ball_and_box(u + alpha[:, None] * grad, u_seed, radius, metric)
                cand_score, cand_grad = _score_and_grad(model, cand, metric, shape)
                better = cand_score >= score  # NaN never accepted
                u = torch.where(better[:, None], cand, u)
                grad = torch.where(better[:, None], cand_grad, grad)
                score = torch.where(better, cand_score, score)
                alpha = torch.where(better, alpha * 1.1, alpha * 0.5)
            for _ in range(final_projections):
                u = _to_ball_and_box(u, u_seed, radius, metric)
            x = _pull_inside(metric.unwhiten(u).clamp(0.0, 1.0), flat_seed, radius, metric)
            with torch.no_grad():
                score = log_conf(model, x.view(-1, *shape))
            better = score > best_score
            best_x = torch.where(better[:, None], x, best_x)
            best_score = torch.where(better, score, best_score)
    return best_x.view(-1, *shape).detach(), best_score.detach()


def attack_in_batches(model: nn.Module, seeds: torch.Tensor, radius: torch.Tensor, metric: PCAMetric,
                      args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    xs, scores = [], []
    for start in range(0, seeds.shape[0], args.batch_size):
        x, score = pca_ball_attack(model, seeds[start:start + args.batch_size], radius[start:start + args.batch_size],
                                   metric, args.restarts, args.steps, args.step_size, generator=generator,
                                   progress=getattr(args, "progress", None))
        xs.append(x.cpu())
        scores.append(score.cpu())
    return torch.cat(xs), torch.cat(scores)


def add_args(parser: argparse.ArgumentParser) -> None:
    model_paths.add_run_args(parser, "attack")
    add_model_args(parser)
    parser.add_argument("--ccu-run", default=None, metavar="DIR",
                        help="CCU run whose certified radii bound the attack (default: the entry labelled CCU "
                             "in model_paths.MODEL_PATHS[dataset])")
    import data

    parser.add_argument("--seeds", default="uniform", type=data.dataset_arg,
                        help="'uniform' (U[0,1]^D, the paper's default), any data.DATASETS key (test split) or "
                             "NAME=PATH (image folder or .npz)")
    parser.add_argument("--n-seeds", type=int, default=200, help="paper: 2 x 100")
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--step-size", type=float, default=3.0, help="initial per-sample step alpha")
    parser.add_argument("--f", type=float, default=1.1, help="certify confidence <= f/K")
    parser.add_argument("--n-test", type=int, default=None, help="in-distribution test samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=200, help="seeds attacked at once")
    parser.add_argument("--test-batch-size", type=int, default=500)
    add_common_args(parser)


def _ccu_run(args: argparse.Namespace) -> Path:
    if args.ccu_run:
        return Path(args.ccu_run)
    if args.dataset is None:
        raise ValueError("pass --ccu-run DIR or --dataset (to find the entry labelled CCU in model_paths)")
    for entry in model_paths.table_entries(args.dataset):
        if entry.label == "CCU":
            return entry.run_dirs(args.runs_root, args.dataset)[0]
    raise ValueError(f"model_paths has no entry labelled CCU for {args.dataset}; pass --ccu-run DIR")


def _targets(args: argparse.Namespace, ccu_dir: Path) -> list[tuple[str, list[Path], str, dict]]:
    """(label, run folders, detector, options) of every table entry: each gets its own column, scored by its own
    detector (Base, ODIN and Maha share a network but not a score); with --model and no --runs, CCU alone."""
    if args.runs:
        pairs = [(Path(d).name, [Path(d)], "msp", {}) for d in args.runs]
    elif getattr(args, "model", None):
        pairs = []
    else:
        pairs = [(entry.label, entry.run_dirs(args.runs_root, args.dataset), entry.detector, dict(entry.options))
                 for entry in model_paths.table_entries(args.dataset)]
    if not any(dirs == [ccu_dir] for _, dirs, _, _ in pairs):
        pairs.append(("CCU", [ccu_dir], "msp", {}))
    return pairs


def _seeds(args: argparse.Namespace, shape: tuple, data_root: str) -> torch.Tensor:
    if args.seeds == "uniform":
        generator = torch.Generator().manual_seed(args.seed)
        return torch.rand((args.n_seeds, *shape), generator=generator)
    import data

    dataset = data.get_dataset(args.seeds, "test", root=data_root, like=args.dataset, n=args.n_seeds,
                               seed=args.seed)
    return torch.stack([dataset[i][0] for i in range(min(args.n_seeds, len(dataset)))])


def reported_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The table's score of x: a column's own detector score (`EntryModel.score`), else its log-confidence."""
    if hasattr(model, "score"):
        return model.score(x).cpu()
    with torch.no_grad():
        return F.log_softmax(model(x), dim=1).amax(1).cpu()


def _test_scores(model: nn.Module, loader, device: str) -> tuple[torch.Tensor, float]:
    """(score per test sample, test error) of one model."""
    scores, wrong, total = [], 0, 0
    for x, y in loader:
        x = x.to(device)
        scores.append(reported_scores(model, x))
        with torch.no_grad():
            wrong += int((model(x).argmax(1).cpu() != y).sum())
        total += y.numel()
    return torch.cat(scores), wrong / total


def attack_row(label: str, in_scores: torch.Tensor, test_error: float, adv_scores: torch.Tensor,
               probability: bool = True) -> dict:
    """TE, MMC, SR, AUC (x100) of one model (docs/methods.md#ccu-attack-study). MMC is the mean confidence only
    for scores that are log-probabilities; a density or a Mahalanobis distance has none (None, "n/a")."""
    from utils import metrics

    median_in = float(np.median(in_scores.numpy()))  # numpy convention: mean of the two middle values
    mmc = 100 * float(adv_scores.exp().mean()) if probability else None
    return {"label": label, "te": 100 * test_error, "mmc": mmc,
            "sr": 100 * float((adv_scores >= median_in).double().mean()),
            "auc": 100 * metrics.auroc(in_scores, adv_scores), "median_in_log_conf": median_in}


def attack_table(rows: list[dict]) -> str:
    """Markdown: columns = labels (latest row of each), rows TE / MMC / SR / AUC."""
    latest = {row["label"]: row for row in rows if row.get("study") == STUDY}
    labels = list(latest)
    r0 = next(iter(latest.values()))
    lines = [f"CCU Table 1 ({r0['dataset']}): {r0['n_seeds']} {r0['seeds']} seeds, attack within CCU's certified "
             f"ball (median R {r0['radius_median']:.3g}, {r0['certified_pct']:.0f}% certified, f={r0['f']}), "
             f"{r0['restarts']} restarts x {r0['steps']} steps. All x100.", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name in (("te", "TE"), ("mmc", "MMC"), ("sr", "SR"), ("auc", "AUC")):
        cells = ["n/a" if latest[lab][key] is None else f"{latest[lab][key]:.1f}" for lab in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    import data
    from torch.utils.data import DataLoader

    from models.ccu import CCUModel
    from utils import runs
    from utils.certify import certified_radius

    ccu_dir = _ccu_run(args)
    ccu_model = load_network([ccu_dir], args.device)
    if not isinstance(ccu_model, CCUModel):
        raise ValueError(f"{ccu_dir} is not a CCU run (its model is a {type(ccu_model).__name__})")
    args.dataset = args.dataset or getattr(ccu_model, "run_config", {}).get("dataset")
    data_root = runs.resolve_data_root(args.data_root)
    _, shape = data.dataset_info(args.dataset)
    external = load_external(args, args.dataset, args.device)  # a network from elsewhere: checked before attacks
    seeds = _seeds(args, shape, data_root).to(args.device)
    radius = certified_radius(ccu_model, seeds, f=args.f).float()
    radius_median = float(np.median(radius.cpu().numpy()))
    print(f"{args.n_seeds} {data.set_name(args.seeds)} seeds: median certified radius {radius_median:.4g}, "
          f"{100 * float((radius > 0).double().mean()):.0f}% certified (CCU run {ccu_dir})")
    test_set = data.get_dataset(args.dataset, "test", root=data_root, n=args.n_test)
    loader = DataLoader(test_set, batch_size=args.test_batch_size)
    common = {"study": STUDY, "dataset": args.dataset, "ccu_run": str(ccu_dir), "seeds": data.set_name(args.seeds),
              "n_seeds": int(seeds.shape[0]), "restarts": args.restarts, "steps": args.steps,
              "step_size": args.step_size, "f": args.f, "seed": args.seed,
              "radius_median": radius_median, "certified_pct": 100 * float((radius > 0).double().mean()),
              "git_sha": runs.git_sha(), "date": runs.now(), **getattr(args, "row_tags", {})}
    rows, dump = [], {"labels": [], "adv": [], "adv_log_conf": [], "in_log_conf": []}
    targets = _targets(args, ccu_dir) + ([(external.name, [], "msp", {})] if external else [])
    for label, dirs, detector, options in bar(targets, getattr(args, "progress", None), desc="models"):
        model = (entry_model(dirs, detector, options, args.dataset, data_root, args.device, args.test_batch_size)
                 if dirs else EntryModel(external.network, MSP(external.network)).to(args.device).eval())
        in_scores, test_error = _test_scores(model, loader, args.device)
        adv, _ = attack_in_batches(model, seeds, radius, ccu_model.metric, args)
        adv_scores = torch.cat([reported_scores(model, batch.to(args.device))
                                for batch in adv.split(args.batch_size)])
        probability = getattr(model, "log_space", True)  # CCU itself and the log-probability columns
        row = {**common, **attack_row(label, in_scores, test_error, adv_scores, probability),
               "runs": [str(d) for d in dirs] or [external.name],
               "detector": detector, "options": options,
               "checkpoints": [runs.file_hash(d / "model.pt") for d in dirs] or [external.checkpoint]}
        mmc = "n/a" if row["mmc"] is None else f"{row['mmc']:.1f}"
        print(f"{label:>10s}: TE {row['te']:.1f}  MMC {mmc}  SR {row['sr']:.1f}  AUC {row['auc']:.1f}")
        rows.append(row)
        for key, value in (("labels", label), ("adv", adv.numpy()), ("adv_log_conf", adv_scores.numpy()),
                           ("in_log_conf", in_scores.numpy())):
            dump[key].append(value)
    results = Path(args.results_root)
    table = runs.record_study(results, args.dataset, f"{args.dataset}_ccu_attack", rows, attack_table)
    scores_path = results / "scores" / f"{args.dataset}_ccu_attack.npz"
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(scores_path, seeds=seeds.cpu().numpy(), radii=radius.cpu().numpy(), f=args.f,
                        num_classes=ccu_model.num_classes, **{k: np.array(v) for k, v in dump.items()})
    print(table)
