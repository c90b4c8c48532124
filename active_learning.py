"""Active learning with DDU's feature density (Mukhoti et al., arXiv 2102.11582;
docs/methods.md#dirty-mnist-and-active-learning).

    python active_learning.py --dataset digits --acquisition ddu          # CPU, about a minute
    python active_learning.py --dataset MNIST --acquisition softmax --seed 1
    python active_learning.py --dataset DirtyMNIST --acquisition ddu --spectral-norm-coeff 3 --mod

Start from a class-balanced labelled set (--initial-size), then per round: train a fresh model (--epochs epochs
of --samples-per-epoch samples drawn with replacement, Adam), keep the weights with the best validation accuracy,
record its test accuracy, and move the --acquire-size pool samples with the lowest confidence into the labelled
set, until it holds --max-pool samples. Acquisitions (confidence = higher is more in-distribution):

    random        uniform at random (baseline)
    softmax       highest softmax entropy (DDU.softmax_entropy)
    ensemble_pe   highest predictive entropy of --ensemble-size members (Ensemble, score "entropy")
    ensemble_mi   highest mutual information of the members (Ensemble, score "mutual_info")
    ddu           lowest feature density sum_c pi_c N(z; mu_c, Sigma_c), pi_c = labelled-class frequencies
                  (DDU, priors="class"), fitted on the labelled set's features every round

Dirty-MNIST pool: --clean-pool-size random MNIST images plus every Ambiguous-MNIST image; the initial
set is drawn from the clean part, test = MNIST test; rows record the ambiguous fraction of the labelled set.
Validation is --val-fraction of the training set (np seed = run seed), held out before the pool is formed.

Rows (one per round) go to <results-root>/active_learning/<DATASET>_<acquisition>.jsonl: dataset, acquisition,
seed, round, acquired (labelled-set size), test_accuracy, val_accuracy, ambiguous_fraction (Dirty-MNIST), arch,
jitter (ddu), git_sha, date. <DATASET>.png plots every acquisition's rows for the dataset.

Differences from the original `active_learning_script.py`: the best-on-validation model is deep-copied (the
original kept a reference to the live model, docs/methods.md#ddu-deviations); the sampler draws with replacement instead
of cycling a fixed-length permutation.
"""
from __future__ import annotations

import argparse
import copy
import itertools
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Subset

import data
import models
from data.base import holdout_indices
from utils import training
from utils.detectors.base import Detector
from utils.detectors.bayes import Ensemble
from utils.detectors.ddu import DDU
from utils.methods import METHODS
from utils.runs import git_sha, now, read_jsonl, resolve_data_root
from utils.store import KEYS, upsert_rows

ACQUISITIONS = ("random", "softmax", "ensemble_pe", "ensemble_mi", "ddu")
DIRTY = "DirtyMNIST"
# the paper's settings (docs/methods.md#dirty-mnist-and-active-learning), and a laptop-sized variant for the built-in
# digits (1437 training images)
AL_DEFAULTS: dict[str, dict] = {
    "paper": dict(arch="resnet18", initial_size=20, acquire_size=5, max_pool=300, epochs=20,
                  samples_per_epoch=5056, batch_size=64, ensemble_size=5),
    "digits": dict(arch="lenet", initial_size=20, acquire_size=10, max_pool=100, epochs=6,
                   samples_per_epoch=384, batch_size=64, ensemble_size=3),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="a key of data.DATASETS (digits, MNIST, DirtyMNIST, ...)")
    p.add_argument("--acquisition", default="ddu", choices=ACQUISITIONS)
    p.add_argument("--arch", default=None, choices=sorted(models.MODELS))
    p.add_argument("--initial-size", type=int, default=None, help="class-balanced initial labelled set")
    p.add_argument("--acquire-size", type=int, default=None, help="samples acquired per round")
    p.add_argument("--max-pool", type=int, default=None, help="stop once the labelled set has this many")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per round")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="samples drawn (with replacement) per epoch")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--ensemble-size", type=int, default=None, help="members for ensemble_pe / ensemble_mi")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--clean-pool-size", type=int, default=1000, help="Dirty-MNIST: MNIST images in the pool")
    p.add_argument("--spectral-norm-coeff", type=float, default=None)
    p.add_argument("--mod", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--results-root", default="results")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace earlier rows of the same seed instead of refusing")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    return p


def resolve(args: Namespace) -> Namespace:
    """Fill None flags from AL_DEFAULTS (digits, else the paper's) and add the data shape."""
    opts = Namespace(**vars(args))
    for key, value in AL_DEFAULTS.get(args.dataset, AL_DEFAULTS["paper"]).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.num_classes, shape = data.dataset_info(args.dataset)
    opts.in_channels, opts.input_size = shape[0], shape[1]
    opts.data_root = resolve_data_root(args.data_root)
    if opts.initial_size < opts.num_classes:
        raise ValueError(f"--initial-size {opts.initial_size} cannot hold every one of {opts.num_classes} classes")
    return opts


def targets_of(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset without loading its images where it keeps them (`targets`)."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


def build_splits(opts: Namespace) -> dict:
    """train set, its pool / validation indices, the ambiguous mask (Dirty-MNIST) and the test set."""
    kwargs = dict(root=opts.data_root, download=opts.download)
    train_set = data.get_dataset(opts.dataset, "train", **kwargs)
    train_indices, val_indices = holdout_indices(len(train_set), opts.val_fraction, opts.seed)
    ambiguous = torch.zeros(len(train_set), dtype=torch.bool)
    test_set = data.get_dataset("MNIST" if opts.dataset == DIRTY else opts.dataset, "test", **kwargs)
    if opts.dataset == DIRTY and isinstance(train_set, ConcatDataset):
        n_clean = len(train_set.datasets[0])               # MNIST first, Ambiguous-MNIST second
        ambiguous[n_clean:] = True
        clean = train_indices[train_indices < n_clean]
        clean = np.random.RandomState(opts.seed).permutation(clean)[: opts.clean_pool_size]
        train_indices = np.concatenate([clean, train_indices[train_indices >= n_clean]])
        val_indices = val_indices[val_indices < n_clean]   # validate on clean digits
    return {"train": train_set, "pool": torch.as_tensor(train_indices), "val": torch.as_tensor(val_indices),
            "ambiguous": ambiguous, "test": test_set, "targets": targets_of(train_set)}


def initial_indices(pool: torch.Tensor, targets: torch.Tensor, ambiguous: torch.Tensor, size: int,
                    num_classes: int, seed: int) -> torch.Tensor:
    """A class-balanced random draw of `size` pool indices (remainder spread over the first classes)."""
    generator = torch.Generator().manual_seed(seed)
    candidates = pool[~ambiguous[pool]]
    chosen = []
    for c in range(num_classes):
        of_class = candidates[targets[candidates] == c]
        quota = size // num_classes + (c < size % num_classes)
        if len(of_class) < quota:
            raise ValueError(f"class {c} has only {len(of_class)} pool samples, the initial set needs {quota}")
        chosen.append(of_class[torch.randperm(len(of_class), generator=generator)[:quota]])
    return torch.cat(chosen)


def train_model(opts: Namespace, train_subset: Dataset, val_loader: DataLoader, seed: int,
                device: torch.device) -> tuple[nn.Module, float]:
    """A fresh model trained on the labelled set; returns the weights of its best validation epoch."""
    training.seed_everything(seed)
    model = models.build_model(vars(opts)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    sampler = RandomSampler(train_subset, replacement=True, num_samples=opts.samples_per_epoch,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(train_subset, batch_size=opts.batch_size, sampler=sampler, drop_last=True)
    best_accuracy, best_state = -1.0, None
    for _ in range(opts.epochs):
        training.train_epoch(model, loader, optimizer, METHODS["plain"], opts, None, device, None, False)
        accuracy = training.evaluate_clean(model, val_loader, device)["test_acc"]
        if accuracy > best_accuracy:
            # a copy, not a reference: the original's best_model kept training along (docs/methods.md#ddu-deviations)
            best_accuracy, best_state = accuracy, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), best_accuracy


@torch.no_grad()
def ensemble_accuracy(members: list[nn.Module], loader: DataLoader, device: torch.device) -> float:
    """Accuracy of the mean softmax of the members (one member: its own accuracy)."""
    correct, seen = 0, 0
    for x, y in loader:
        probs = torch.stack([m(x.to(device)).softmax(dim=1) for m in members]).mean(0)
        correct += int((probs.argmax(dim=1).cpu() == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def acquisition_detector(acquisition: str, members: list[nn.Module], labelled: Dataset, batch_size: int
                         ) -> Detector | None:
    """The detector whose lowest confidences are acquired (None for random)."""
    if acquisition == "softmax":
        return DDU(members[0], score="softmax_entropy")
    if acquisition in ("ensemble_pe", "ensemble_mi"):
        return Ensemble(members, score="entropy" if acquisition == "ensemble_pe" else "mutual_info")
    if acquisition == "ddu":
        return DDU(members[0], score="density", priors="class").fit(DataLoader(labelled, batch_size=batch_size))
    return None


@torch.no_grad()
def pool_confidences(detector: Detector, pool_set: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    scores = [detector.confidence(x.to(device)).double().cpu() for x, _ in DataLoader(pool_set, batch_size=batch_size)]
    return torch.cat(scores)


def acquire(confidences: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k lowest confidences (the most uncertain / least dense samples)."""
    return torch.topk(-confidences, min(k, len(confidences))).indices


def rows_path(opts: Namespace) -> Path:
    return Path(opts.results_root) / "active_learning" / f"{opts.dataset}_{opts.acquisition}.jsonl"


def check_previous_rows(opts: Namespace) -> None:
    """Rows of this seed make the run refuse to start unless --overwrite."""
    rows = read_jsonl(rows_path(opts))
    if any(row["seed"] == opts.seed for row in rows) and not opts.overwrite:
        raise FileExistsError(f"{rows_path(opts)} already holds seed {opts.seed}; pass --overwrite to replace it")


def main(args: Namespace) -> list[dict]:
    opts = resolve(args)
    print({k: v for k, v in sorted(vars(opts).items())})
    check_previous_rows(opts)
    device = torch.device(opts.device)
    splits = build_splits(opts)
    train_set, targets, ambiguous = splits["train"], splits["targets"], splits["ambiguous"]
    val_loader = DataLoader(Subset(train_set, splits["val"].tolist()), batch_size=500)
    test_loader = DataLoader(splits["test"], batch_size=500)
    labelled = initial_indices(splits["pool"], targets, ambiguous, opts.initial_size, opts.num_classes, opts.seed)
    pool = splits["pool"][~torch.isin(splits["pool"], labelled)]
    n_members = opts.ensemble_size if opts.acquisition.startswith("ensemble") else 1
    rows, generator = [], torch.Generator().manual_seed(opts.seed)
    for round_index in itertools.count():
        labelled_set = Subset(train_set, labelled.tolist())
        trained = [train_model(opts, labelled_set, val_loader, opts.seed * 1000 + round_index * n_members + m,
                               device) for m in range(n_members)]
        members = [model for model, _ in trained]
        row = {"dataset": opts.dataset, "acquisition": opts.acquisition, "seed": opts.seed, "round": round_index,
               "acquired": len(labelled), "test_accuracy": ensemble_accuracy(members, test_loader, device),
               "val_accuracy": float(np.mean([acc for _, acc in trained])), "arch": opts.arch,
               "git_sha": git_sha(), "date": now()}
        if opts.dataset == DIRTY:
            row["ambiguous_fraction"] = float(ambiguous[labelled].double().mean())
        if len(labelled) >= opts.max_pool or len(pool) == 0:
            rows.append(row)
            break
        detector = acquisition_detector(opts.acquisition, members, labelled_set, 500)
        if detector is None:
            picked = torch.randperm(len(pool), generator=generator)[: opts.acquire_size]
        else:
            picked = acquire(pool_confidences(detector, Subset(train_set, pool.tolist()), 500, device),
                             opts.acquire_size)
            row["jitter"] = getattr(detector, "jitter_", None)
        rows.append(row)
        print(f"round {round_index:3d}  labelled {len(labelled):4d}  test acc {row['test_accuracy']:.4f}", flush=True)
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[picked] = False
        labelled, pool = torch.cat([labelled, pool[picked]]), pool[keep]
    print(f"final: labelled {len(labelled)}  test acc {rows[-1]['test_accuracy']:.4f}")
    write_rows(rows_path(opts), rows, opts.seed)
    if opts.plot:
        plot_dataset(opts.results_root, opts.dataset)
    return rows


def write_rows(path: Path, rows: list[dict], seed: int) -> None:
    """Replace this seed's rows in the store (utils.store: locked, atomic), keeping the rows that other seeds,
    possibly running at the same time, wrote meanwhile."""
    upsert_rows(path, rows, KEYS["active_learning"], drop=lambda row: row.get("seed") == seed)


def plot_dataset(results_root: str | Path, dataset: str) -> Path:
    """<results-root>/active_learning/<DATASET>.png from every acquisition's rows of the dataset."""
    from utils.plots.ddu import plot_active_learning
    folder = Path(results_root) / "active_learning"
    rows = [row for path in sorted(folder.glob(f"{dataset}_*.jsonl")) for row in read_jsonl(path)
            if row.get("dataset") == dataset]
    path = plot_active_learning(rows, folder / f"{dataset}.png", title=f"Active learning on {dataset}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
