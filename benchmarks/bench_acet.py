"""Cost of an ACET training step relative to a plain one (DESIGN: "ACET with k attack steps is about k+1
forward/backward passes per batch, no more").

One training step = loss + backward + optimiser step on a batch of 128 28x28 images with LeNet
(docs/methods.md#acet-schedules):
  plain      mean CE on the clean batch;
  acet(k)    k PGD steps on ACET noise made from the batch (input gradients only, BN in inference mode), one
             scoring forward, then one joint forward/backward on cat(x, z^) (2x the batch).
The ratio acet/plain is compared with the target 1.1 * (k + 1). Real MNIST is used when --data-root holds it,
else uniform random images (the timing does not depend on pixel values).

    python benchmarks/bench_acet.py [--ks 5 10 40] [--steps 5] [--device cpu]

Recorded (MNIST batch, CPU shared with other jobs (load ~8 on 2 cores), --threads 1 --steps 3, one run):

| method | k | s / step | ratio to plain | target 1.1(k+1) | within |
|---|---|---|---|---|---|
| plain | 0 | 0.3223 | 1.00 |  |  |
| acet | 5 | 1.6639 | 5.16 | 6.6 | yes |
| acet | 10 | 2.3300 | 7.23 | 12.1 | yes |
| acet | 40 | 8.3211 | 25.82 | 45.1 | yes |

Isolated passes on the same machine (1 thread, batch 128): forward 0.12 s, forward+backward 0.24 s, attack step
(forward + input-only backward) 0.19 s, forward+backward on the joint batch of 256 0.51 s. An ACET step is thus
k attack steps + one scoring forward on 2B (last iterate and seed) + one training pass on 2B; the 2B training
batch (128 clean + 128 noise, as in the paper) alone costs about two plain steps.
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

from utils.runs import benchmark_data_root  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 40], help="ACET attack steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--data-root", default=benchmark_data_root(), help="default: $DATA_ROOT, else ../shared/datasets beside the repository")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_batch(root: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if (Path(root) / "MNIST" / "raw").is_dir():
        import data

        dataset = data.get_dataset("MNIST", split="train", root=root)
        xs, ys = zip(*(dataset[i] for i in range(batch_size)))
        return torch.stack(xs), torch.as_tensor(ys), "MNIST"
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch_size, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen), \
        "random"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(loss_fn, opts: Namespace, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> float:
    """Median seconds of one training step of a fresh LeNet with `loss_fn`."""
    import models

    torch.manual_seed(0)
    model = models.MODELS["lenet"](num_classes=10, in_channels=1, input_size=28).to(args.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    times = []
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        loss, _ = loss_fn(model, x, y, None, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> list[dict]:
    from utils.methods.noise import NOISE_METHODS
    from utils.methods.plain import plain_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train.py: denormal input gradients slow long CPU attacks several-fold
    x, y, source = load_batch(args.data_root, args.batch_size)
    x, y = x.to(args.device), y.to(args.device)
    plain = time_steps(plain_loss, Namespace(), x, y, args)
    rows = [{"method": "plain", "k": 0, "seconds": plain, "ratio": 1.0, "target": None}]
    for k in args.ks:
        opts = Namespace(out_loss="max_conf", attack_eps=0.3, attack_steps=k, attack_step_size=None,
                         attack_norm="linf")
        seconds = time_steps(NOISE_METHODS["acet"].loss, opts, x, y, args)
        rows.append({"method": "acet", "k": k, "seconds": seconds, "ratio": seconds / plain,
                     "target": 1.1 * (k + 1)})
    print(f"LeNet, batch {args.batch_size} ({source}), device {args.device}, torch threads "
          f"{torch.get_num_threads()}, median of {args.steps} steps\n")
    print("| method | k | s / step | ratio to plain | target 1.1(k+1) | within |\n|---|---|---|---|---|---|")
    for row in rows:
        target = "" if row["target"] is None else f"{row['target']:.1f}"
        within = "" if row["target"] is None else ("yes" if row["ratio"] <= row["target"] else "NO")
        print(f"| {row['method']} | {row['k']} | {row['seconds']:.4f} | {row['ratio']:.2f} | {target} | {within} |")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
