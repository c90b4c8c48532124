"""Evaluation speed and memory: the four logit scores (msp, maxlogit, energy, entropy) and every metric on
MNIST test against a uniform-noise OOD set of the same size, through evaluate.py's scoring path (one forward
pass per batch feeds all four detectors). Reports images/s and peak resident memory.

    python benchmarks/bench_eval.py --data-root ../shared/datasets
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import models  # noqa: E402
from utils import metrics  # noqa: E402
from utils.detectors import DETECTORS  # noqa: E402
from utils.scoring import score_dataset  # noqa: E402
from utils.runs import benchmark_data_root  # noqa: E402

SCORES = ("msp", "maxlogit", "energy", "entropy")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as evaluate.py
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build_model({"arch": "lenet", "num_classes": 10, "in_channels": 1, "input_size": 28})
    model = model.to(device).eval()
    test = data.get_dataset("MNIST", "test", root=args.data_root)
    noise = data.get_dataset("uniform", "test", like="MNIST", n=len(test))
    detectors = {name: DETECTORS[name](model) for name in SCORES}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scores_in = score_dataset(model, detectors, test, args.batch_size, device, progress=False)
    scores_out = score_dataset(model, detectors, noise, args.batch_size, device, progress=False)
    for name in SCORES:
        metrics.ood_metrics(scores_in.confidences[name], scores_out.confidences[name])
    metrics.ece(scores_in.probs, scores_in.labels)
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images = len(test) + len(noise)
    print("| images | seconds | images/s | peak RSS (MiB) | RSS growth during scoring (MiB) |\n|---|---|---|---|---|")
    print(f"| {images} | {seconds:.2f} | {images / seconds:,.0f} | {rss_after / 1024:.0f} | "
          f"{(rss_after - rss_before) / 1024:.0f} |")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=benchmark_data_root(), help="default: $DATA_ROOT, else ../shared/datasets beside the repository")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
