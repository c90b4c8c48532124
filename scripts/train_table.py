"""Train every run that a dataset's paper table names in model_paths.MODEL_PATHS, in order.

    python scripts/train_table.py --dataset MNIST --data-root ../shared/datasets --dry-run   # print the commands
    python scripts/train_table.py --dataset CIFAR10 --download -- --epochs 100               # extra train.py flags
    python scripts/train_table.py --dataset CIFAR10 --paths CIFAR10/ddu --download            # DDU's 5 seeds

What a run needs is made first: CCU's mixtures (gen_gmm.py, run gmm-s0), ProoD's classifier run (oe-s0).
Finished runs are skipped; interrupted ones are resumed.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_paths import run_flags, table_entries, training_order  # noqa: E402
from utils.resume import run_state  # noqa: E402


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The gen_gmm.py and train.py commands still to run, everything a run needs (model_paths.training_order: CCU's
    mixtures, ProoD's classifier run) before the run."""
    common = ["--dataset", args.dataset, "--runs-root", args.runs_root]
    if args.data_root:
        common += ["--data-root", args.data_root]
    download = ["--download"] if args.download else []
    runs = list(dict.fromkeys(run for entry in table_entries(args.dataset, args.paths) for run in entry.runs))
    todo = []
    for what, name, _ in training_order(runs):
        folder = Path(args.runs_root) / args.dataset / name
        if what == "gmm":
            if not folder.exists():
                todo.append([sys.executable, "gen_gmm.py", *common, "--name", name])
            continue
        flags, seed = run_flags(name)
        state = run_state(folder)
        if state == "finished":
            continue
        resume = ["--resume"] if state == "interrupted" else []
        todo.append([sys.executable, "train.py", *common, *download, "--seed", str(seed), "--name", name, *flags,
                     *resume, *args.train_flags])
    return todo


def main(args: argparse.Namespace) -> None:
    for command in commands(args):
        print("$", shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, cwd=ROOT, check=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--paths", default=None, help="key of model_paths.MODEL_PATHS (default: --dataset)")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("train_flags", nargs="*", help="extra train.py flags, after --")
    return parser


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
