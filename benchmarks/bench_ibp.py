"""Cost of interval bound propagation and of an APGD iteration, against plain passes of the same network.

  ibp     `utils.ibp.logit_difference_bounds` (IBP + the elided last layer, what GOOD's loss uses) on a batch,
          vs one forward pass of the batch; target <= 2.5x (every affine layer runs twice: centre and radius).
  ibp64   the float64 certificate `confidence_upper_bound` (one float32 check forward + IBP in float64), for
          information: float64 is slower on every device, and certificates never run in reduced precision.
  apgd    one iteration of `utils.attacks.apgd_maximize` (averaged over --apgd-steps), vs one forward pass plus
          the backward pass to the input that every gradient attack needs; target <= 1.2x.

Network: GOOD's MNIST CNN (size L; `--width` scales its channels), batch of 28x28 uniform images (the timing
does not depend on pixel values).

    python benchmarks/bench_ibp.py [--width 0.5] [--batch-size 128] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.5, help="channel scale of the size-L CNN (1 = paper)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--apgd-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> list[dict]:
    import models
    from utils.attacks import apgd_maximize, max_log_conf
    from utils.ibp import confidence_upper_bound, input_box, logit_difference_bounds

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.MODELS["good_cnn_l"](num_classes=10, in_channels=1, input_size=28, width=args.width)
    model = model.to(args.device).eval()
    x = torch.rand(args.batch_size, 1, 28, 28, device=args.device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def ibp() -> None:
        with torch.no_grad():
            logit_difference_bounds(model, *input_box(x, args.eps))

    def forward_backward() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(max_log_conf(model(xg)).sum(), xg)

    def apgd() -> None:
        apgd_maximize(model, x, max_log_conf, args.eps, steps=args.apgd_steps, restarts=1)

    t_forward = median_seconds(forward, args.repeats, args.device)
    t_ibp = median_seconds(ibp, args.repeats, args.device)
    t_ibp64 = median_seconds(lambda: confidence_upper_bound(model, x, args.eps), args.repeats, args.device)
    t_fb = median_seconds(forward_backward, args.repeats, args.device)
    # an APGD call also scores the seed once (a forward pass): remove it before dividing by the steps
    t_apgd = (median_seconds(apgd, max(1, args.repeats // 2), args.device) - t_forward) / args.apgd_steps
    rows = [{"what": "IBP bound (float32, elided) vs forward", "seconds": t_ibp, "ratio": t_ibp / t_forward,
             "target": 2.5},
            {"what": "float64 certificate vs forward", "seconds": t_ibp64, "ratio": t_ibp64 / t_forward,
             "target": None},
            {"what": "APGD iteration vs forward + input backward", "seconds": t_apgd, "ratio": t_apgd / t_fb,
             "target": 1.2}]
    print(f"good_cnn_l width {args.width}, batch {args.batch_size}, {args.device}: forward {t_forward:.4f} s, "
          f"forward + input backward {t_fb:.4f} s\n")
    print("| comparison | s / batch | ratio | target | within |\n|---|---|---|---|---|")
    for row in rows:
        target = "" if row["target"] is None else f"<= {row['target']}"
        within = "" if row["target"] is None else ("yes" if row["ratio"] <= row["target"] else "no")
        print(f"| {row['what']} | {row['seconds']:.4f} | {row['ratio']:.2f} | {target} | {within} |")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
