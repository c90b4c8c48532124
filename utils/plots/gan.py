"""Generated samples of a confident-classifier GAN run (Lee et al., arXiv 1711.09325) next to real test images,
with the classifier's max-softmax confidence on each: the generator should make data-like images on which the
classifier is close to uniform (1/K), while it stays confident on the real ones.

    python -m utils.plots.gan                                  # the demo's GAN run (make demo)
    python -m utils.plots.gan --run runs/MNIST/gan-s0 --out results/figures/gan

Reads the run folder only (`utils.methods.load_auxiliary`: the classifier and G from model.pt); never trains.
The figure is <out>/<DATASET>_<run>.png.
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.plots import save_figure


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a --method gan run folder (default: <runs-root>/digits/gan-s0)")
    p.add_argument("--runs-root", default="runs/demo")
    p.add_argument("--n", type=int, default=64, help="images per panel")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes z")
    p.add_argument("--out", default="results/figures/gan")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None)
    return p


@torch.no_grad()
def samples(run_dir: Path, n: int = 64, seed: int = 0, device: str = "cpu",
            data_root: str | None = None) -> dict[str, torch.Tensor]:
    """{"real", "generated"}: (n, C, H, W) images on the CPU, and "conf_real", "conf_generated": (n,) max softmax
    of the run's classifier. Real images are the first n of the test set; codes z come from `seed`."""
    import data
    from utils.methods import load_auxiliary
    from utils.runs import resolve_data_root

    model, aux = load_auxiliary(run_dir, device)
    generator = aux.nets["generator"]
    dataset = data.get_dataset(model.run_config["dataset"], "test", root=resolve_data_root(data_root))
    real = next(iter(DataLoader(dataset, batch_size=n)))[0].to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    generated = generator(generator.sample_latent(n, device, gen))
    out = {"real": real, "generated": generated}
    for name, images in list(out.items()):
        out[f"conf_{name}"] = model(images).softmax(dim=1).max(dim=1).values
    return {key: value.cpu() for key, value in out.items()}


def samples_figure(images: dict[str, torch.Tensor], title: str = ""):
    """Two panels, real | generated, each a grid with the classifier's confidence printed on every image."""
    import math

    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.8))
    for ax, name in zip(axes, ("real", "generated")):
        batch, conf = images[name], images[f"conf_{name}"]
        per_row = math.ceil(math.sqrt(len(batch)))
        grid = make_grid(batch, nrow=per_row, padding=2, pad_value=1.0)  # (3, H', W'), grey repeated to RGB
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        side, pad = batch.shape[-1], 2
        for index, value in enumerate(conf.tolist()):
            row, col = divmod(index, per_row)
            ax.text(pad + col * (side + pad), pad + row * (side + pad), f"{value:.2f}", fontsize=6,
                    color="red" if value > 0.5 else "blue", va="top", ha="left")
        ax.set_title(f"{name}: mean confidence {conf.mean():.3f}", fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def main(args: Namespace) -> Path:
    from utils.checkpoints import read_run_config
    from utils.cli import UserError

    run_dir = Path(args.run) if args.run else Path(args.runs_root) / "digits" / "gan-s0"
    config = read_run_config(run_dir)
    if config is None or config.get("method") != "gan":
        found = "no config.json" if config is None else f"a --method {config.get('method')} run"
        raise UserError(f"{run_dir}: {found}; pass --run with a train.py --method gan run folder")
    images = samples(run_dir, args.n, args.seed, args.device, args.data_root)
    title = (f"{config['dataset']} {run_dir.name}: real test images vs G(z); numbers = max softmax of the "
             f"classifier (1/K = {1 / config['num_classes']:.2f})")
    path = save_figure(samples_figure(images, title), Path(args.out) / f"{config['dataset']}_{run_dir.name}.png")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())  # a refused or missing checkpoint: one line, exit 2
