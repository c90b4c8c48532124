"""Figures of CCU's adversarial-noise study, drawn from the dump of `gen_attack_stats.py --study ccu`.

Meinke & Hein, ICLR 2020 (arXiv 1909.12180), Figures 2/3 style: for a few noise seeds, the most confident
point each model reaches inside CCU's certified ball, with its confidence; plus the distribution of certified
radii and of the adversarial confidences per model against CCU's bound f/K.

    python -m utils.plots.ccu --dump results/scores/MNIST_ccu_attack.npz --out results/figures
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # the caller's backend: inline in notebooks (forcing Agg here hid their figures)
import numpy as np

from utils import cli  # noqa: E402


def load_dump(path: str | Path) -> dict:
    """The npz written by utils.studies.ccu.main as a dict of numpy arrays (no pickled objects)."""
    with np.load(path, allow_pickle=False) as dump:
        return {key: dump[key] for key in dump.files}


def _image(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) in [0,1] -> something imshow draws, and its colour map."""
    if x.ndim == 1:  # flat inputs: show as a square if possible, else a strip
        side = int(round(np.sqrt(x.size)))
        return (x.reshape(side, side) if side * side == x.size else x[None, :]), "gray"
    if x.shape[0] == 1:
        return x[0], "gray"
    return np.transpose(x, (1, 2, 0)).clip(0, 1), None


def plot_attack_examples(dump: dict, n_seeds: int = 5, certified_only: bool = True) -> plt.Figure:
    """Rows: seeds (largest radii first); columns: the seed, then each model's adversarial sample with its
    confidence (CCU's bound is f/K inside the ball)."""
    radii, labels = dump["radii"], [str(label) for label in dump["labels"]]
    order = np.argsort(-radii)
    if certified_only:
        order = order[radii[order] > 0]
    order = order[:n_seeds]
    fig, axes = plt.subplots(len(order), len(labels) + 1, squeeze=False,
                             figsize=(1.6 * (len(labels) + 1), 1.7 * max(len(order), 1)))
    for row, index in enumerate(order):
        image, cmap = _image(dump["seeds"][index])
        axes[row, 0].imshow(image, cmap=cmap, vmin=0, vmax=1)
        axes[row, 0].set_title(f"seed, R={radii[index]:.3g}", fontsize=7)
        for col, label in enumerate(labels, start=1):
            image, cmap = _image(dump["adv"][col - 1][index])
            axes[row, col].imshow(image, cmap=cmap, vmin=0, vmax=1)
            axes[row, col].set_title(f"{label}: {np.exp(dump['adv_log_conf'][col - 1][index]):.2f}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"most confident point in CCU's certified ball (bound f/K = "
                 f"{float(dump['f']) / int(dump['num_classes']):.3f})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_radii_hist(dump: dict, bins: int = 30) -> plt.Figure:
    """Histogram of the certified radii (PCA metric); seeds without a certificate (R = 0) are counted apart."""
    radii = dump["radii"]
    positive = radii[radii > 0]
    fig, ax = plt.subplots(figsize=(4, 3))
    if positive.size:
        ax.hist(positive, bins=bins, color="tab:blue")
    ax.set_xlabel("certified radius R (PCA metric)")
    ax.set_ylabel("seeds")
    ax.set_title(f"{positive.size}/{radii.size} seeds certified (R > 0)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_adv_confidences(dump: dict) -> plt.Figure:
    """Adversarial confidence per model (one dot per seed) against the bound f/K and 1/K."""
    labels = [str(label) for label in dump["labels"]]
    bound = float(dump["f"]) / int(dump["num_classes"])
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(labels), 3))
    rng = np.random.default_rng(0)
    for col, label in enumerate(labels):
        conf = np.exp(dump["adv_log_conf"][col])
        ax.scatter(col + 0.15 * rng.standard_normal(conf.size), conf, s=4, alpha=0.6)
    ax.axhline(bound, color="k", ls="--", lw=1, label=f"f/K = {bound:.3f}")
    ax.axhline(1.0 / int(dump["num_classes"]), color="gray", ls=":", lw=1, label="1/K")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("confidence of adversarial noise")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_all(dump_path: str | Path, out_dir: str | Path, n_seeds: int = 5) -> list[Path]:
    """Draw every figure of the dump into out_dir as PNG; returns the paths written."""
    dump, out_dir = load_dump(dump_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(dump_path).stem
    figures = {"examples": plot_attack_examples(dump, n_seeds), "radii": plot_radii_hist(dump),
               "confidences": plot_adv_confidences(dump)}
    paths = []
    for name, fig in figures.items():
        paths.append(out_dir / f"{stem}_{name}.png")
        fig.savefig(paths[-1], dpi=150)
        plt.close(fig)
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", required=True, help="results/scores/<DATASET>_ccu_attack.npz")
    parser.add_argument("--out", default="results/figures", help="folder of the figures")
    parser.add_argument("--n-seeds", type=int, default=5, help="rows of the examples figure")
    cli.add_alias(parser, "--out-dir", "--out", dest="out")
    return parser


def main(args: argparse.Namespace) -> None:
    matplotlib.use("Agg")  # figures are files; no display needed
    for path in save_all(args.dump, args.out, args.n_seeds):
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
