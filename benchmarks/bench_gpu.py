"""GPU throughput of train.py's loop and evaluation, ResNet-18 on CIFAR-shaped data (3x32x32, 10 classes), batch 128,
all measured in one run (targets from the issue that asked for it; results go to benchmarks/README.md):

  bare fp32          a bare PyTorch loop: float tensors pre-loaded on the GPU, sliced by a permutation,
                     CE + SGD; no augmentation
  train.py fp32      `utils.training.train_epoch` as train.py runs it: uint8 set on the GPU (data.device_loader),
                     batches gathered there; `--augment` none by default (like the bare loop), or the CIFAR recipe
  train.py bf16      the same under `--amp bf16`; then + `--channels-last`; then + `--compile` (if it compiles)
  ACET k=10 / plain  seconds per step of `--method acet --attack-steps 10` against plain, at bf16 + channels-last
  eval               images/s of evaluation's one-pass detectors (msp, maxlogit, energy, entropy from one forward
                     pass per batch, `utils.scoring.score_dataset`, float32 scores as evaluate.py's default)
  peak memory        torch.cuda.max_memory_allocated over the whole run

Targets: train.py >= 0.9x the bare loop at the same precision (fp32); bf16 + channels-last >= 1.8x train.py fp32;
ACET <= 1.1 (k + 1). Runs in about 2 minutes on one modern GPU (compile adds up to a minute).

    python benchmarks/bench_gpu.py                 # on a CUDA GPU
    python benchmarks/bench_gpu.py --tiny          # seconds on CPU: a ResNet-18 of width 4 (the test suite runs this)
"""
from __future__ import annotations

import argparse
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from data.base import TensorImageDataset  # noqa: E402
from data.device_loader import DeviceDataset, batch_augment  # noqa: E402
from utils import amp, training  # noqa: E402
from utils.methods import METHODS  # noqa: E402

SHAPE, CLASSES = (3, 32, 32), 10


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per training configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each configuration")
    p.add_argument("--images", type=int, default=10_000, help="synthetic training / evaluation images")
    p.add_argument("--acet-k", type=int, default=10)
    p.add_argument("--acet-steps", type=int, default=15)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = the papers' network)")
    p.add_argument("--augment", default="none", help="train.py loop's augmentation: none or a data.AUGMENTATIONS key")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=False,
                   help="CPU smoke run: width 4, batch 8, 2 steps, k=2 (numbers meaningless, code paths real)")
    return p


def tiny(args: Namespace) -> Namespace:
    return Namespace(**{**vars(args), "device": "cpu", "batch_size": 8, "steps": 2, "warmup": 1, "images": 64,
                        "acet_k": 2, "acet_steps": 2, "width": 4, "compile": False})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args: Namespace, device: torch.device, channels_last: bool = False):
    torch.manual_seed(0)
    model = models.build_model({"arch": "resnet18", "num_classes": CLASSES, "in_channels": 3, "input_size": 32,
                                "arch_kwargs": {"width": args.width}}).to(device)
    if channels_last:
        model = amp.to_channels_last(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def synthetic_set(args: Namespace) -> TensorImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, *SHAPE), dtype=torch.uint8, generator=gen)
    return TensorImageDataset(images, torch.randint(0, CLASSES, (args.images,), generator=gen))


def bare_loop(args: Namespace, device: torch.device, x_all: torch.Tensor, y_all: torch.Tensor) -> float:
    """Seconds per step of the reference: pre-loaded float tensors, no data path, no framework around the step."""
    model, optimizer = make_model(args, device)
    model.train()
    order = torch.randperm(len(x_all), device=device)

    def run(steps: int) -> None:
        for step in range(steps):
            idx = order[step * args.batch_size: (step + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return _timed(run, args, device)


def _timed(run, args: Namespace, device: torch.device, steps: int = 0) -> float:
    """Seconds per step of `run(steps)`, after `run(args.warmup)`."""
    steps = steps or args.steps
    run(args.warmup)
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return (time.perf_counter() - start) / steps


def loop_seconds(args: Namespace, device: torch.device, train_set: DeviceDataset, precision_name: str,
                 channels_last: bool, compile_model: bool = False, method: str = "plain", steps: int = 0) -> float:
    """Seconds per step of train.py's loop: `train_epoch` over the device-side batches of one epoch."""
    model, optimizer = make_model(args, device, channels_last)
    precision = amp.Precision(device, precision_name, channels_last)
    opts = Namespace(out_loss="max_conf", attack_eps=0.3, attack_steps=args.acet_k, attack_step_size=None,
                     attack_norm="linf", attack_random_start=True)
    if compile_model:
        example = train_set.gather(torch.arange(args.batch_size))[0]
        if not amp.try_compile(model, precision.prepare_input(example), precision=precision):
            return float("nan")
    # what train.py's OutSource does for --out-data acet_noise: noise made from the clean batch on its device
    make_out = (lambda x: data.acet_noise_batch(x)) if METHODS[method].uses_out_data else None
    epochs = iter(range(1_000_000))

    def run(count: int) -> None:
        loader = training.epoch_batches(train_set, args.batch_size, 0, next(epochs), 0)
        training.train_epoch(model, loader, optimizer, METHODS[method], opts, make_out, device, count, False,
                             precision)
    return _timed(run, args, device, steps)


def eval_rate(args: Namespace, device: torch.device, dataset: TensorImageDataset) -> float:
    """Images/s of the one-pass detectors through evaluation's scorer."""
    from utils.detectors import DETECTORS
    from utils.scoring import score_dataset

    model, _ = make_model(args, device)
    model.eval()
    detectors = {name: DETECTORS[name](model) for name in ("msp", "maxlogit", "energy", "entropy")}
    x, y = dataset.tensors()
    eval_set = torch.utils.data.TensorDataset(x, y)
    score_dataset(model, detectors, torch.utils.data.Subset(eval_set, range(min(len(x), 2 * 500))), 500, device,
                  progress=False)  # warm-up
    _sync(device)
    start = time.perf_counter()
    score_dataset(model, detectors, eval_set, 500, device, progress=False)
    _sync(device)
    return len(x) / (time.perf_counter() - start)


def main(args: Namespace) -> dict:
    args = tiny(args) if args.tiny else args
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # as train.py (CPU only; harmless elsewhere)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    dataset = synthetic_set(args)
    if args.steps * args.batch_size > len(dataset):
        raise ValueError(f"--images {args.images} holds fewer than --steps x --batch-size images")
    augment = None if args.augment == "none" else batch_augment(args.augment, "CIFAR10", SHAPE)
    train_set = DeviceDataset(dataset, device, augment)
    x_all, y_all = (t.to(device) for t in dataset.tensors())
    fast = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    seconds = {"bare fp32": bare_loop(args, device, x_all, y_all),
               "train.py fp32": loop_seconds(args, device, train_set, "off", False),
               f"train.py {fast}": loop_seconds(args, device, train_set, fast, False),
               f"train.py {fast} + channels-last": loop_seconds(args, device, train_set, fast, True)}
    if args.compile:
        seconds[f"train.py {fast} + channels-last + compile"] = loop_seconds(args, device, train_set, fast, True,
                                                                             compile_model=True)
    plain = seconds[f"train.py {fast} + channels-last"]
    acet = loop_seconds(args, device, train_set, fast, True, method="acet", steps=args.acet_steps)
    result = {"images_per_s": {name: args.batch_size / s for name, s in seconds.items()},
              "acet_ratio": acet / plain, "acet_target": 1.1 * (args.acet_k + 1),
              "eval_images_per_s": eval_rate(args, device, dataset),
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    report(result, args, device, fast)
    return result


def report(result: dict, args: Namespace, device: torch.device, fast: str) -> None:
    rates = result["images_per_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, ResNet-18 (width {args.width}), batch {args.batch_size}, "
          f"augment {args.augment}{' (TINY: numbers meaningless)' if args.tiny else ''}\n")
    print("| configuration | images/s | ratio | target |\n|---|---|---|---|")
    print(f"| bare fp32 loop | {rates['bare fp32']:,.0f} | 1.00 | |")
    print(f"| train.py fp32 | {rates['train.py fp32']:,.0f} | {rates['train.py fp32'] / rates['bare fp32']:.2f} "
          f"vs bare | >= 0.9 |")
    for key, rate in rates.items():
        if key.startswith(f"train.py {fast}"):
            print(f"| {key} | {rate:,.0f} | {rate / rates['train.py fp32']:.2f} vs train.py fp32 | "
                  f"{'>= 1.8' if key.endswith('channels-last') else ''} |")
    print(f"| ACET k={args.acet_k} / plain ({fast} + channels-last), s/step | | {result['acet_ratio']:.2f} | "
          f"<= {result['acet_target']:.1f} |")
    print(f"| evaluation, msp+maxlogit+energy+entropy (fp32) | {result['eval_images_per_s']:,.0f} | | |")
    memory = result["peak_memory_gib"]
    print(f"| peak GPU memory | {'n/a (CPU)' if memory is None else f'{memory:.2f} GiB'} | | |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
