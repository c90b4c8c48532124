"""The main job on built-in data: train the demo models on scikit-learn's 8x8 digits, evaluate them on the
digits OOD sets, and print the comparison table. CPU, a few minutes; `make demo` runs it.

Runs that already finished are reused and interrupted ones are resumed, so the demo can be re-run safely.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
import train  # noqa: E402

# (run name, train.py flags) in training order; model_paths.MODEL_PATHS["digits"] names them in the table.
DEMO_RUNS: list[tuple[str, list[str]]] = [
    ("plain-s0", ["--method", "plain"]),
]


def train_once(name: str, flags: list[str], runs_root: str) -> None:
    """Train a demo run unless it is complete; resume it if it was interrupted."""
    run_dir = Path(runs_root) / "digits" / name
    argv = ["--dataset", "digits", "--seed", "0", "--name", name, "--runs-root", runs_root, "--no-progress", *flags]
    if (run_dir / "model.pt").exists():
        checkpoint = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        if checkpoint["epoch"] >= checkpoint["config"]["epochs"]:
            print(f"{run_dir}: finished earlier, reused")
            return
        argv.append("--resume")
    start = time.perf_counter()
    train.main(train.get_args_parser().parse_args(argv))
    print(f"{run_dir}: trained in {time.perf_counter() - start:.0f}s")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, flags in DEMO_RUNS:
        train_once(name, flags, args.runs_root)
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs-root", args.runs_root, "--results-root", args.results_root,
         "--no-progress", *args.evaluate_flags]))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs-root", default="runs/demo")
    parser.add_argument("--results-root", default="results/demo")
    parser.add_argument("--evaluate-flags", nargs="*", default=[], help="extra evaluate.py flags")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
