"""ACET's cost inside real `train.py` runs: seconds per training step of `--method acet --attack-steps k` against
`--method plain` on MNIST (same data, augmentation, batch and out-data; LeNet, Adam, batch 128), next to the
isolated step of `bench_acet.py` measured in the same process. Target (DESIGN): ratio <= 1.1 (k + 1).

Each run trains `--batches` batches of one epoch through train.py's `main` (device-side data, CCU's MNIST
augmentation, ACET noise made from every clean batch) into a temporary runs folder; the step time is the epoch's
logged training seconds (evaluation excluded) over the number of batches. Runs are interleaved and repeated, and
the fastest epoch of each method counts, so machine load hits both sides alike.

    python benchmarks/bench_acet_train.py --data-root ../shared/datasets [--k 5] [--batches 10] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bench_acet  # noqa: E402
import train  # noqa: E402


def train_step_seconds(args: Namespace, method: str, runs_root: str, name: str) -> float:
    argv = ["--dataset", "MNIST", "--data-root", args.data_root, "--method", method, "--epochs", "1",
            "--max-batches", str(args.batches), "--runs-root", runs_root, "--name", name, "--no-progress",
            "--attack-steps", str(args.k), "--device", args.device]
    run_dir = train.main(train.get_args_parser().parse_args(argv))
    log = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    return log["seconds"] / args.batches


def main(args: Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"plain": [], "acet": []}
    with tempfile.TemporaryDirectory() as runs_root:
        for repeat in range(args.repeats):
            for method in times:
                times[method].append(train_step_seconds(args, method, runs_root, f"{method}-{repeat}"))
    loop = {method: min(values) for method, values in times.items()}
    isolated = bench_acet.main(Namespace(ks=[args.k], batch_size=128, steps=3, warmup=1, data_root=args.data_root,
                                         threads=args.threads, device=args.device))
    result = {"loop": loop, "loop_ratio": loop["acet"] / loop["plain"], "isolated_ratio": isolated[1]["ratio"],
              "isolated": {row["method"]: row["seconds"] for row in isolated}, "target": 1.1 * (args.k + 1)}
    print(f"\ntrain.py on MNIST, {args.batches} batches of 128, best of {args.repeats} epochs per method\n")
    print("| measured in | plain s/step | acet k=%d s/step | ratio | target |\n|---|---|---|---|---|" % args.k)
    print(f"| train.py epoch | {loop['plain']:.4f} | {loop['acet']:.4f} | {result['loop_ratio']:.2f} | "
          f"<= {result['target']:.1f} |")
    print(f"| isolated step (bench_acet) | {result['isolated']['plain']:.4f} | {result['isolated']['acet']:.4f} | "
          f"{result['isolated_ratio']:.2f} | <= {result['target']:.1f} |")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
