"""Cost of a confident-classifier GAN training step (Lee et al., arXiv 1711.09325) relative to a plain one.

One step on a batch of B images, each configuration on fresh networks of the same seed:
  plain    CE on the clean batch: forward + backward + Adam step of the classifier;
  D alone  G(z) without gradients, D on the real and the generated batch, backward, Adam step of D;
  G alone  G(z), D(G(z)) and f(G(z)) for GAN loss + beta * KL, backward into G only, Adam step of G;
  gan      the method's whole step (`gan_step`: D and G updates sharing one G(z), then fresh G(z') for the
           classifier's CE + beta * KL and its Adam step), as `train.py --method gan` runs it.
Target: gan <= 1.2 * (plain + G alone + D alone), all measured in this run. The MNIST setting (28x28, LeNet,
dcgan28 of width 64, batch 128) reads real MNIST from --data-root when it is there, else uniform images (timing
does not depend on pixel values); `--size 8` times the digits demo's networks (dcgan8 width 32, batch 64).

    python benchmarks/bench_gan.py [--size 28|8] [--steps 10] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SETTINGS = {28: dict(arch="dcgan28", width=64, batch=128), 8: dict(arch="dcgan8", width=32, batch=64)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=28, choices=sorted(SETTINGS), help="image side")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 at 28x28, 64 at 8x8")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_batch(args: argparse.Namespace, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    import data

    if args.size == 8:
        dataset, source = data.get_dataset("digits", split="train"), "digits"
    elif (Path(args.data_root) / "MNIST" / "raw").is_dir():
        dataset, source = data.get_dataset("MNIST", split="train", root=args.data_root), "MNIST"
    else:
        gen = torch.Generator().manual_seed(0)
        return (torch.rand(batch_size, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen),
                "random")
    xs, ys = zip(*(dataset[i] for i in range(batch_size)))
    return torch.stack(xs), torch.as_tensor(ys), source


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fresh_networks(args: argparse.Namespace, setting: dict):
    """A LeNet classifier with Adam 2e-4 and the method's G, D and their optimisers, seeded identically."""
    import models
    from utils.methods.gan import build_gan

    torch.manual_seed(0)
    model = models.MODELS["lenet"](num_classes=10, in_channels=1, input_size=args.size).to(args.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    opts = Namespace(data_shape=[1, args.size, args.size], in_channels=1, input_size=args.size,
                     gan_arch=setting["arch"], gan_latent_dim=100, gan_width=setting["width"], gan_lr=2e-4,
                     gan_betas=(0.5, 0.999), gan_beta=1.0, epochs=100, milestones=[0.6], gamma=0.1)
    return model, optimizer, build_gan(model, opts), opts


def step_functions(x: torch.Tensor, y: torch.Tensor):
    """name -> fn(model, optimizer, aux, opts) running one training step of that kind."""
    from utils.methods.gan import gan_loss, gan_step, kl_uniform_to_softmax

    def classifier_step(model, optimizer, loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def plain(model, optimizer, aux, opts):
        classifier_step(model, optimizer, F.cross_entropy(model(x), y))

    def d_alone(model, optimizer, aux, opts):
        generator, discriminator = aux.nets["generator"], aux.nets["discriminator"]
        with torch.no_grad():
            fake = generator(generator.sample_latent(len(x), x.device))
        d_real, d_fake = discriminator(x), discriminator(fake)
        aux.update("discriminator", F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                   + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))

    def g_alone(model, optimizer, aux, opts):
        generator, discriminator = aux.nets["generator"], aux.nets["discriminator"]
        fake = generator(generator.sample_latent(len(x), x.device))
        d_fooled = discriminator(fake)
        aux.update("generator", F.binary_cross_entropy_with_logits(d_fooled, torch.ones_like(d_fooled))
                   + opts.gan_beta * kl_uniform_to_softmax(model(fake)).mean())

    def gan(model, optimizer, aux, opts):
        x_out = gan_step(model, aux, x, y, None, opts)
        classifier_step(model, optimizer, gan_loss(model, x, y, x_out, opts)[0])

    return {"plain": plain, "D alone": d_alone, "G alone": g_alone, "gan": gan}


def time_steps(step, args: argparse.Namespace, setting: dict) -> float:
    """Median seconds of one step of `step` on fresh networks."""
    model, optimizer, aux, opts = fresh_networks(args, setting)
    times = []
    for index in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        step(model, optimizer, aux, opts)
        _sync(args.device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py
    setting = SETTINGS[args.size]
    batch_size = args.batch_size or setting["batch"]
    x, y, source = load_batch(args, batch_size)
    x, y = x.to(args.device), y.to(args.device)
    seconds = {name: time_steps(step, args, setting) for name, step in step_functions(x, y).items()}
    reference = seconds["plain"] + seconds["G alone"] + seconds["D alone"]
    print(f"LeNet + {setting['arch']} (width {setting['width']}), batch {batch_size} ({source}), device "
          f"{args.device}, torch threads {torch.get_num_threads()}, median of {args.steps} steps\n")
    print("| step | s / step | ratio to plain |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.4f} | {value / seconds['plain']:.2f} |")
    ratio = seconds["gan"] / reference
    print(f"\ngan / (plain + G alone + D alone) = {ratio:.2f} (target <= 1.2: {'yes' if ratio <= 1.2 else 'NO'})")
    return {**seconds, "ratio": ratio}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
