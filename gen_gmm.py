"""Fit CCU's in- and out-distribution Gaussian mixtures and their shared PCA metric (docs/methods.md#ccu-mixtures).

Meinke & Hein, ICLR 2020 (arXiv 1909.12180). Steps:
  1. X_in = `--n-in` flattened training images (all by default: 60 000 for MNIST/FMNIST, 50 000 for
     SVHN/CIFAR), drawn through CCU's augmentation (each sample augmented with probability 1/2) unless
     --no-augment. Fit the PCA metric on X_in (singular values floored at s_1 / --min-sv-factor).
  2. Whiten, X~ = X V^T / sqrt(s), and fit sklearn GaussianMixture(covariance_type='spherical') with
     `--n-components` components (the original used the removed sklearn.mixture.GMM with params='mc').
  3. Keep the means; give every component the mean of the fitted variances; discard the fitted weights
     (CCU's log-weights are uniform and frozen).
  4. Map the means back to pixel space, mu = (mu~ * sqrt(s)) V.
  5. Repeat 2-4 with the same metric on `--n-out` samples of `--out-data` (paper: the first 25 728 images of
     80M Tiny Images, withdrawn). The default here is `natural_patches`: crops of the photographs bundled with
     scikit-learn / scikit-image, resized to the in-distribution shape, the closest offline stand-in for
     "small natural images". Any data.DATASETS key works (e.g. `uniform`, or CIFAR100 for CIFAR10 runs).

Output: <runs-root>/<dataset>/<name>/ with config.json and gmm.pt = {"metric": {V, s, mean},
"gmm_in": {mu, logvar, logweight}, "gmm_out": {...}, "config": {...}} (plain tensors, weights_only-loadable);
`train.py --method ccu --gmm <name>` reads it. An existing run folder is never overwritten.

Example (CPU, seconds):  python gen_gmm.py --dataset digits --n-components 10
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import data
from models.gmm import GMM, PCAMetric
from utils import cli, runs
from utils.checkpoints import save_checkpoint
from utils.cli import AT_LEAST_ONE, POSITIVE, Range

GMM_RANGES = {"n_components": AT_LEAST_ONE, "n_in": AT_LEAST_ONE, "n_out": AT_LEAST_ONE, "min_sv_factor": Range(1.0),
              "max_iter": AT_LEAST_ONE, "tol": POSITIVE, "batch_size": AT_LEAST_ONE,
              "seed": Range(0, 2**32 - 1, integer=True)}  # what scikit-learn's random_state takes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(data.DATASETS), help="in-distribution set")
    parser.add_argument("--out-data", default="natural_patches", type=data.dataset_arg,
                        help="out-distribution set for the out-mixture (paper: 80M Tiny Images): a data key, or "
                             "NAME=PATH (an image folder or a .npz of uint8 images)")
    parser.add_argument("--n-components", type=int, default=100, help="components per mixture (paper: 100)")
    parser.add_argument("--n-in", type=int, default=None, help="in-distribution samples (default: all)")
    parser.add_argument("--n-out", type=int, default=25728, help="out samples (paper: 201 x 128 = 25 728)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="draw X_in through the dataset's CCU augmentation (paper: augm_flag 1)")
    parser.add_argument("--min-sv-factor", type=float, default=1e6, help="floor s_i at s_1 / this")
    parser.add_argument("--max-iter", type=int, default=100, help="EM iterations (sklearn default)")
    parser.add_argument("--tol", type=float, default=1e-3, help="EM convergence tolerance (sklearn default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for whitening and the density summary (the EM itself is sklearn, CPU)")
    parser.add_argument("--data-root", default=None, help="datasets folder (default: $DATA_ROOT or ./datasets)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--name", default=None, help="run folder name, one folder under <runs-root>/<dataset>/ (default: gmm-s<seed>)")
    parser.add_argument("--batch-size", type=int, default=1000, help="loader batch while collecting samples")
    cli.add_debug_flag(parser)
    return parser


def collect(dataset, batch_size: int) -> torch.Tensor:
    """All samples of `dataset`, flattened to (N, D) float32 (one pass: augmentation is drawn once)."""
    chunks = [x.reshape(x.shape[0], -1) for x, _ in DataLoader(dataset, batch_size=batch_size)]
    return torch.cat(chunks)


def fit_mixture(u: np.ndarray, n_components: int, seed: int, max_iter: int,
                tol: float) -> tuple[np.ndarray, float, dict]:
    """Spherical EM in whitened coordinates -> (means (K, D), shared variance = mean fitted variance, info)."""
    from sklearn.mixture import GaussianMixture

    if u.shape[0] < n_components:
        raise ValueError(f"{u.shape[0]} samples cannot fit {n_components} components; lower --n-components")
    mixture = GaussianMixture(n_components=n_components, covariance_type="spherical", random_state=seed,
                              max_iter=max_iter, tol=tol).fit(u)
    info = {"converged": bool(mixture.converged_), "n_iter": int(mixture.n_iter_),
            "lower_bound": float(mixture.lower_bound_),
            "fitted_var_min": float(mixture.covariances_.min()), "fitted_var_max": float(mixture.covariances_.max())}
    return mixture.means_, float(mixture.covariances_.mean()), info


def build_gmm(metric: PCAMetric, x: torch.Tensor, args: argparse.Namespace, what: str) -> tuple[GMM, dict]:
    """Steps 2-4 on the samples x (N, D): fit in whitened space, share the variance, map the means back."""
    start = time.perf_counter()
    u = metric.whiten(x.double()).cpu().numpy()
    means, variance, info = fit_mixture(u, args.n_components, args.seed, args.max_iter, args.tol)
    mu = metric.unwhiten(torch.from_numpy(means).to(metric.V.device, torch.float64)).float()
    logvar = torch.full((args.n_components,), math.log(variance))
    info.update(shared_var=variance, fit_seconds=time.perf_counter() - start, n_samples=int(x.shape[0]))
    print(f"{what}: {x.shape[0]} samples, EM {'converged' if info['converged'] else 'NOT converged'} after "
          f"{info['n_iter']} iterations, shared variance {variance:.4g} ({info['fit_seconds']:.1f}s)")
    return GMM(metric, args.n_components, mu=mu.cpu(), logvar=logvar), info


@torch.no_grad()
def density_summary(gmm_in: GMM, gmm_out: GMM, x_in: torch.Tensor, x_out: torch.Tensor, device: str) -> dict:
    """Mean log p(.|i) and log p(.|o) on both sample sets: the in-mixture should win on X_in, the out on X_out."""
    summary = {}
    for set_name, x in (("in_data", x_in), ("out_data", x_out)):
        for gmm_name, gmm in (("p_in", gmm_in), ("p_out", gmm_out)):
            values = torch.cat([gmm.to(device).log_density(chunk.to(device)) for chunk in x.split(4096)])
            summary[f"{set_name}_mean_log_{gmm_name}"] = float(values.mean())
    return summary


def main(args: argparse.Namespace) -> None:
    cli.check_ranges(args, GMM_RANGES)
    torch.manual_seed(args.seed)  # the augmentation draws
    args.name = args.name or f"gmm-s{args.seed}"
    data_root = runs.resolve_data_root(args.data_root)
    run_dir = runs.run_folder(args.runs_root, args.dataset, args.name)  # one folder name under the runs root
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already exists; choose another --name (GMM runs are never overwritten)")
    data.check_dataset(args.out_data, like=args.dataset, root=data_root)  # unreadable files: fail before any file
    # the folder is made by the first file written, after the fit: a failed fit leaves nothing behind
    config = {**{k: v for k, v in vars(args).items() if k != "debug"}, "data_root": data_root, **runs.provenance(),
              "kind": "gmm"}
    print(f"gen_gmm: {args.dataset} vs {args.out_data}, {args.n_components} components -> {run_dir}")

    in_set = data.get_dataset(args.dataset, "train", root=data_root, augment=args.augment, download=args.download,
                              n=args.n_in, seed=args.seed)
    out_set = data.get_dataset(args.out_data, "train", root=data_root, download=args.download, like=args.dataset,
                               n=args.n_out, seed=args.seed)
    x_in, x_out = collect(in_set, args.batch_size), collect(out_set, args.batch_size)
    if x_in.shape[1] != x_out.shape[1]:
        raise ValueError(f"{args.out_data} samples have D={x_out.shape[1]}, {args.dataset} has D={x_in.shape[1]}")

    start = time.perf_counter()
    metric = PCAMetric.fit(x_in, min_sv_factor=args.min_sv_factor).to(args.device)
    config["pca_seconds"] = time.perf_counter() - start
    gmm_in, config["fit_in"] = build_gmm(metric, x_in.to(args.device), args, "in-mixture")
    gmm_out, config["fit_out"] = build_gmm(metric, x_out.to(args.device), args, "out-mixture")
    config.update(input_dim=int(x_in.shape[1]), n_in_used=int(x_in.shape[0]), n_out_used=int(x_out.shape[0]),
                  s_max=float(metric.s.max()), s_min=float(metric.s.min()),
                  **density_summary(gmm_in, gmm_out, x_in, x_out, args.device))

    def tensors(module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.startswith("metric.")}

    payload = {"metric": tensors(metric), "gmm_in": tensors(gmm_in), "gmm_out": tensors(gmm_out),
               "config": {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    save_checkpoint(run_dir / "gmm.pt", payload)
    runs.write_json(run_dir / "config.json", config)
    print(f"wrote {run_dir / 'gmm.pt'}; in-data mean log p(x|i) {config['in_data_mean_log_p_in']:.1f} vs "
          f"log p(x|o) {config['in_data_mean_log_p_out']:.1f}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
