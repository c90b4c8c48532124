"""Random hyperparameter search for the Know-your-limits toy models (Ulmer & Cina, arXiv 2012.05329;
docs/methods.md#hyperparameter-search).

As the original `hyperparameter_search.py`: sklearn `ParameterSampler` draws --n-iter configurations (original:
200 NN, 100 MCDropout, 250 BBB) from hidden sizes [h] * L with h in {15, 20, 25}, L in 1..4, lr log-uniform in
[1e-4, 0.1], dropout U[0, 0.35] (BBB: its prior / posterior initialisation ranges too); each configuration is
trained once on `make_moons(1000, noise=0.125)` and scored by the AUROC of p(class 1) on the TRAINING data (the
original's criterion; `val_auroc` and `val_accuracy` on a held-out quarter are reported beside it, since a
training AUROC rewards overfitting). The top --top configurations go to --out (JSON), best first.

    python scripts/hparam_search.py --model NN --n-iter 10
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/hparam_search.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.studies import toy  # noqa: E402

SEARCHABLE = ("NN", "MCDropout", "BBB")
ORIGINAL_N_ITER = {"NN": 200, "MCDropout": 100, "BBB": 250}


def search_space(model: str) -> dict:
    """The paper's distributions (scipy frozen distributions or lists, as ParameterSampler takes them)."""
    from scipy.stats import loguniform, uniform

    space = {"hidden": [(h,) * n_layers for h in (15, 20, 25) for n_layers in range(1, 5)],
             "lr": loguniform(1e-4, 0.1), "dropout": uniform(0.0, 0.35)}
    if model == "BBB":  # the original's BBB ranges (info.py PARAM_SEARCH); sigma_1 = sigma_2 gives one Gaussian
        space.update(prior_sigma=[float(np.exp(d)) for d in np.arange(-0.8, 0, 0.1)],
                     mu_init=uniform(-0.6, 1.2), rho_init=uniform(-8.0, 6.0), beta=uniform(0.1, 2.4),
                     anneal=[True, False])
    return space


def search_data(seed: int) -> toy.MoonsData:
    """make_moons(1000, 0.125): the first 750 points train, the last 250 are only reported (val_* fields)."""
    return toy.moons_data(n_samples=1000, n_train=750, seed=seed)


def evaluate(model_name: str, params: dict, data: toy.MoonsData, seed: int, epochs: int) -> dict:
    from sklearn.metrics import roc_auc_score

    model = toy.train_toy(model_name, data, preset="paper", seed=seed, epochs=epochs, **params)
    with torch.no_grad():
        p_train = model.predict_proba(data.x_train)[:, 1].numpy()
        p_val = model.predict_proba(data.x_val)[:, 1].numpy()
    return {"train_auroc": float(roc_auc_score(data.y_train.numpy(), p_train)),
            "val_auroc": float(roc_auc_score(data.y_val.numpy(), p_val)),
            "val_accuracy": float(((p_val > 0.5) == data.y_val.numpy().astype(bool)).mean())}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="NN", choices=SEARCHABLE)
    parser.add_argument("--n-iter", type=int, default=8,
                        help="configurations to draw (original: NN 200, MCDropout 100, BBB 250)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--top", type=int, default=10, help="configurations kept in the JSON")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default=None, help="JSON path (default: results/limits/hparams_<MODEL>.json)")
    return parser


def main(args: argparse.Namespace) -> None:
    from sklearn.model_selection import ParameterSampler

    from utils.runs import git_sha, now, write_json

    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    data = search_data(args.seed)
    sampler = ParameterSampler(search_space(args.model), n_iter=args.n_iter, random_state=args.seed)
    trials = []
    for i, params in enumerate(sampler):
        params = {k: tuple(v) if isinstance(v, (list, tuple)) else v.item() if hasattr(v, "item") else v
                  for k, v in params.items()}  # plain Python numbers for the JSON and the log
        start = time.time()
        scores = evaluate(args.model, params, data, args.seed, args.epochs)
        trials.append({"params": params, **scores, "seconds": round(time.time() - start, 2)})
        print(f"[{i + 1}/{args.n_iter}] {params} -> train AUROC {scores['train_auroc']:.4f}, "
              f"val AUROC {scores['val_auroc']:.4f}, val acc {scores['val_accuracy']:.3f}")
    trials.sort(key=lambda trial: trial["train_auroc"], reverse=True)
    out = Path(args.out or f"results/limits/hparams_{args.model}.json")
    write_json(out, {"model": args.model, "criterion": "train_auroc", "n_iter": args.n_iter,
                     "original_n_iter": ORIGINAL_N_ITER[args.model], "epochs": args.epochs, "seed": args.seed,
                     "top": trials[:args.top], "git_sha": git_sha(), "date": now()})
    best = trials[0]
    print(f"best of {len(trials)}: {best['params']} (train AUROC {best['train_auroc']:.4f}); written to {out}")


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
