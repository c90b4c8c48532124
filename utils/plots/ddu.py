"""DDU's Figure 1 (Mukhoti et al., arXiv 2102.11582): histograms of the softmax entropy (aleatoric) and of the
feature log-density log q(z) = LSE_c log N(z; mu_c, Sigma_c) (epistemic) on in-distribution, ambiguous and OOD
inputs; and the active-learning curves of `active_learning.py`.

    python -m utils.plots.ddu                                   # the demo's DDU run (make demo)
    python -m utils.plots.ddu --run runs/MNIST/plain-s0 --ood FMNIST
    python -m utils.plots.ddu --scores results/figures/ddu/digits_plain-s0.npz   # replot cached scores

The paper's ambiguous set is Ambiguous-MNIST (`data/dirty_mnist.py`); for datasets without one, `--blends N`
adds N half/half blends of two test images of different classes, an ambiguous set made from the test set.
Scores are cached as <out>/<DATASET>_<run>.npz (keys "<score>__<set>"); the figure is <out>/<DATASET>_<run>.png.
"""
from __future__ import annotations

import argparse
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from utils.plots import save_figure

SCORE_LABELS = {"softmax_entropy": "softmax entropy (aleatoric)",
                "log_density": "feature log-density log q(z) (epistemic)"}


def get_args_parser() -> argparse.ArgumentParser:
    import data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run folder (default: the demo's <runs-root>/digits/ddu-s0)")
    p.add_argument("--scores", default=None, help="plot cached scores (.npz) without loading a model")
    p.add_argument("--ood", nargs="+", action=data.DatasetListAction, default=None, metavar="SET",
                   help="OOD sets (default: natural_patches,uniform on digits, else data.OOD_TEST[dataset][:2]); "
                        + data.SET_LIST_FORMS)
    p.add_argument("--blends", type=int, default=500, help="ambiguous blends of test images (0: none)")
    p.add_argument("--ambiguous", default=None, help="a dataset to show as the ambiguous set instead of blends")
    p.add_argument("--n", type=int, default=2000, help="samples per OOD set")
    p.add_argument("--runs-root", default="runs/demo")
    p.add_argument("--out", default="results/figures/ddu")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None)
    return p


@torch.no_grad()
def outputs(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features float64, logits, labels) of a dataset, one forward pass per batch."""
    from utils.detectors.base import model_outputs
    model.eval()
    features, logits, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        f, out = model_outputs(model, x.to(device))
        features.append(f.double().cpu())
        logits.append(out.cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def blend_pairs(dataset: Dataset, n: int, seed: int = 0) -> TensorDataset:
    """n half/half blends x = (x_a + x_b) / 2 of two test images with different labels (label -1)."""
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randint(len(x), (2, 4 * n), generator=generator)
    keep = (y[first] != y[second]).nonzero().flatten()[:n]
    return TensorDataset((x[first[keep]] + x[second[keep]]) / 2, torch.full((len(keep),), -1))


def ddu_scores(model: nn.Module, train_set: Dataset, sets: dict[str, Dataset], batch_size: int,
               device: torch.device) -> dict[str, np.ndarray]:
    """{"<score>__<set>": values}: softmax entropy and DDU log-density (equal priors), fitted on train_set."""
    from utils.detectors.ddu import DDU
    train_features, train_logits, train_labels = outputs(model, train_set, batch_size, device)
    detector = DDU(model, score="density").fit_features(train_features, train_labels, train_logits.shape[1])
    scores = {}
    for name, dataset in sets.items():
        features, logits, _ = outputs(model, dataset, batch_size, device)
        scores[f"softmax_entropy__{name}"] = -DDU(model, "softmax_entropy").from_outputs(features, logits).numpy()
        scores[f"log_density__{name}"] = detector.from_outputs(features, logits).numpy()
    return scores


def _by_score(scores: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, values in scores.items():
        score, name = key.split("__", 1)
        grouped.setdefault(score, {})[name] = np.asarray(values, dtype=np.float64)
    return grouped


def histogram_figure(scores: dict[str, np.ndarray], path: str | Path, title: str = "", in_name: str = "in"):
    """Two panels (entropy, log-density), one histogram per set; legends give AUROC(in vs set) per score.

    Log-densities of far-away inputs can be orders of magnitude below the in-distribution ones; values below
    the 2nd percentile of all sets are piled into the left-most bin so the in-distribution shape stays visible.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.metrics import auroc
    grouped = _by_score(scores)
    fig, axes = plt.subplots(1, len(grouped), figsize=(5.5 * len(grouped), 3.8))
    for ax, (score, sets) in zip(np.atleast_1d(axes), grouped.items()):
        finite = np.concatenate([v[np.isfinite(v)] for v in sets.values()])
        low, high = np.percentile(finite, 2), finite.max()
        bins = np.linspace(low, high, 50)
        for name, values in sets.items():
            label = name
            if name != in_name and in_name in sets:  # confidence = -entropy; density is already a confidence
                sign = -1.0 if score == "softmax_entropy" else 1.0
                label += f" (AUROC {100 * auroc(sign * sets[in_name], sign * values):.1f})"
            ax.hist(np.clip(values, low, high), bins=bins, alpha=0.5, density=True, label=label)
        ax.set_xlabel(SCORE_LABELS.get(score, score))
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_active_learning(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy vs labelled-set size, one line per acquisition: mean over seeds ± standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for acquisition in sorted({row["acquisition"] for row in rows}):
        per_size: dict[int, list[float]] = {}
        for row in rows:
            if row["acquisition"] == acquisition:
                per_size.setdefault(row["acquired"], []).append(row["test_accuracy"])
        sizes = sorted(per_size)
        mean = np.array([np.mean(per_size[s]) for s in sizes])
        error = np.array([np.std(per_size[s], ddof=1) / np.sqrt(len(per_size[s])) if len(per_size[s]) > 1 else 0.0
                          for s in sizes])
        n_seeds = max(len(v) for v in per_size.values())
        ax.plot(sizes, 100 * mean, marker="o", markersize=3, label=f"{acquisition} ({n_seeds} seed(s))")
        ax.fill_between(sizes, 100 * (mean - error), 100 * (mean + error), alpha=0.2)
    ax.set_xlabel("labelled training samples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def default_run(runs_root: str | Path) -> Path:
    """The demo's DDU network, <runs-root>/digits/ddu-s0 (made by `make demo`); this module never trains."""
    run_dir = Path(runs_root) / "digits" / "ddu-s0"
    if not (run_dir / "model.pt").exists():
        raise FileNotFoundError(f"no trained run at {run_dir}: run `make demo` first, or pass --run RUN_DIR")
    return run_dir


def compute_for_run(run_dir: Path, args: Namespace) -> tuple[str, dict[str, np.ndarray]]:
    """(dataset, scores) of a run on its test set, an ambiguous set and the OOD sets."""
    import data
    from utils import methods
    from utils.runs import resolve_data_root
    device = torch.device(args.device)
    model = methods.load_run(run_dir, device=device)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    dataset, root = config["dataset"], resolve_data_root(args.data_root)
    train_set = data.get_dataset(dataset, "train", root=root, val_fraction=config.get("val_fraction") or 0.0,
                                 seed=config.get("seed", 0))
    sets = {"in": data.get_dataset(dataset, "test", root=root)}
    if args.ambiguous:
        sets[args.ambiguous] = data.get_dataset(args.ambiguous, "test", root=root, n=args.n)
    elif args.blends > 0:
        sets["blends"] = blend_pairs(sets["in"], args.blends)
    default_ood = ["natural_patches", "uniform"] if dataset == "digits" else data.OOD_TEST[dataset][:2]
    for name in args.ood or default_ood:
        sets[name] = data.get_dataset(name, "test", root=root, like=dataset, n=args.n)
    return dataset, ddu_scores(model, train_set, sets, args.batch_size, device)


def main(args: Namespace) -> Path:
    out = Path(args.out)
    if args.scores:
        cache = Path(args.scores)
        scores = dict(np.load(cache))
        name = cache.stem
    else:
        run_dir = Path(args.run) if args.run else default_run(args.runs_root)
        dataset, scores = compute_for_run(run_dir, args)
        name = f"{dataset}_{run_dir.name}"
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / f"{name}.npz", **scores)
    path = histogram_figure(scores, out / f"{name}.png", title=f"DDU Figure 1 style: {name}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
