"""Training throughput of train.py against a bare PyTorch loop, in one run (issue: target >= 0.9x).

The reference trains the same model (lenet) with the same batch size and optimiser on MNIST tensors that are
pre-loaded in memory and sliced by a random permutation, so it has no data-loading cost at all. Our number is
one epoch of `utils.training.train_epoch` on `data.get_dataset("MNIST")` through a DataLoader, as train.py runs
it. Both run --batches batches after one warm-up epoch segment, on the CPU by default.

    python benchmarks/bench_train.py --data-root ../shared/datasets
"""
from __future__ import annotations

import argparse
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import models  # noqa: E402
from utils import training  # noqa: E402
from utils.methods import METHODS  # noqa: E402
from utils.runs import benchmark_data_root  # noqa: E402


def make_model(device):
    torch.manual_seed(0)
    model = models.build_model({"arch": "lenet", "num_classes": 10, "in_channels": 1, "input_size": 28}).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def bare_loop(x_all, y_all, batches: int, batch_size: int, device) -> float:
    model, optimizer = make_model(device)
    model.train()
    order = torch.randperm(len(x_all))
    start = time.perf_counter()
    for step in range(batches):
        idx = order[step * batch_size:(step + 1) * batch_size]
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batches * batch_size / (time.perf_counter() - start)


def our_loop(train_set, batches: int, batch_size: int, device, num_workers: int) -> float:
    model, optimizer = make_model(device)
    loader = training.train_loader(train_set, batch_size, seed=0, epoch=0, num_workers=num_workers)
    opts = Namespace()
    start = time.perf_counter()
    training.train_epoch(model, loader, optimizer, METHODS["plain"], opts, None, device, batches, False)
    return batches * batch_size / (time.perf_counter() - start)


def main(args: Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py does, for both loops
    device = torch.device(args.device)
    train_set = data.get_dataset("MNIST", "train", root=args.data_root)
    x_all, y_all = next(iter(torch.utils.data.DataLoader(train_set, batch_size=len(train_set))))
    bare_loop(x_all, y_all, 5, args.batch_size, device)  # warm-up (allocator, kernels)
    results = {"bare": [], "ours": []}
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        results["bare"].append(bare_loop(x_all, y_all, args.batches, args.batch_size, device))
        results["ours"].append(our_loop(train_set, args.batches, args.batch_size, device, args.num_workers))
    bare, ours = max(results["bare"]), max(results["ours"])
    print("| loop | images/s (best of %d) |\n|---|---|" % args.repeats)
    print(f"| bare PyTorch, pre-loaded tensors | {bare:,.0f} |\n| train.py loop (DataLoader) | {ours:,.0f} |")
    print(f"ratio ours / bare = {ours / bare:.3f} (target >= 0.9)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=benchmark_data_root(), help="default: $DATA_ROOT, else ../shared/datasets beside the repository")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
