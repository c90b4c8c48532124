"""The data path's share of train.py's step time: device-side batches vs the per-sample DataLoader, in one run.

One epoch of ResNet-18 (plain CE, SGD) on CIFAR-shaped synthetic uint8 images with the papers' CIFAR augmentation
(CCU's recipe: half the images flipped and randomly cropped with reflect padding 4), through
`utils.training.train_epoch` exactly as train.py runs it, once with each data path:

  loader   today's per-sample path: DataLoader(num_workers=0) over TensorImageDataset, a torchvision transform
           per image, then the batch copied to --device;
  device   data.device_loader: the uint8 set on --device, batches gathered there by index, augmentation batched.

The time spent fetching batches (the iterator's __next__, including the copy) is measured inside the epoch and
divided by the epoch's time. Target: the device path's share <= 10%.

    python benchmarks/bench_data_path.py [--images 512] [--batch-size 64] [--device cpu]
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

from data.base import TensorImageDataset, with_transform  # noqa: E402
from data.device_loader import DeviceDataset, batch_augment  # noqa: E402
from data.transforms import AUGMENTATIONS  # noqa: E402
from utils import training  # noqa: E402
from utils.methods import METHODS  # noqa: E402

SHAPE = (3, 32, 32)


class TimedBatches:
    """Wraps an epoch's batches and adds up the seconds spent producing them."""

    def __init__(self, batches) -> None:
        self.batches, self.seconds = batches, 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        iterator = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch


def synthetic(images: int, transform=None) -> TensorImageDataset:
    gen = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randint(0, 256, (images, *SHAPE), dtype=torch.uint8, generator=gen),
                              torch.randint(0, 10, (images,), generator=gen))
    return with_transform(data, transform)


def epoch(args: Namespace, path: str) -> tuple[float, float]:
    """(seconds fetching batches, seconds of the whole epoch) of one ResNet-18 epoch on `path`."""
    import models

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build_model({"arch": "resnet18", "num_classes": 10, "in_channels": 3, "input_size": 32}).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if path == "device":
        dataset = DeviceDataset(synthetic(args.images), device, batch_augment(args.augment, "CIFAR10", SHAPE))
    else:
        dataset = synthetic(args.images, AUGMENTATIONS[args.augment]("CIFAR10", SHAPE))
    batches = TimedBatches(training.epoch_batches(dataset, args.batch_size, 0, 0, 0))
    start = time.perf_counter()
    training.train_epoch(model, batches, optimizer, METHODS["plain"], Namespace(), None, device, None, False)
    return batches.seconds, time.perf_counter() - start


def main(args: Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py
    rows = {}
    for path in ("loader", "device"):
        data_seconds, total = epoch(args, path)
        rows[path] = {"data_s": data_seconds, "epoch_s": total, "share": data_seconds / total}
    print(f"ResNet-18, {args.images} CIFAR-shaped uint8 images, batch {args.batch_size}, augment {args.augment} "
          f"(CIFAR recipe), device {args.device}, {torch.get_num_threads()} threads\n")
    print("| data path | fetching batches (s) | epoch (s) | data share | target |\n|---|---|---|---|---|")
    for path, row in rows.items():
        target = "<= 10%" if path == "device" else ""
        print(f"| {path} | {row['data_s']:.3f} | {row['epoch_s']:.2f} | {100 * row['share']:.2f}% | {target} |")
    print(f"\ndata path speed-up (fetch time loader / device): {rows['loader']['data_s'] / rows['device']['data_s']:.1f}x")
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="ccu", choices=sorted(AUGMENTATIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
