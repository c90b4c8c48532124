"""Deprecated: `python reproduce.py --train-only` trains what a table needs (this forwards to it).

    python scripts/train_table.py --dataset MNIST --dry-run
        = python reproduce.py --train-only --dataset MNIST --dry-run
    python scripts/train_table.py --dataset CIFAR10 --paths CIFAR10/ddu
        = python reproduce.py --train-only --dataset CIFAR10 --paths CIFAR10/ddu
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reproduce  # noqa: E402
from utils.cli import UserError  # noqa: E402


def reproduce_argv(args: argparse.Namespace) -> list[str]:
    """The reproduce.py command line that does what these flags asked for."""
    if args.train_flags:
        raise UserError(f"extra train.py flags ({' '.join(args.train_flags)}) are no longer taken: pick a "
                        "reproduce.py --budget, or train single runs with train.py")
    return (["--train-only", "--dataset", args.dataset, "--runs-root", args.runs_root]
            + (["--paths", args.paths] if args.paths else []) + (["--data-root", args.data_root] if args.data_root
                                                                   else [])
            + (["--download"] if args.download else []) + (["--dry-run"] if args.dry_run else []))


def main(args: argparse.Namespace) -> None:
    argv = reproduce_argv(args)
    print(f"scripts/train_table.py is deprecated; running: python reproduce.py {shlex.join(argv)}", file=sys.stderr)
    reproduce.main(reproduce.get_args_parser().parse_args(argv))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--paths", default=None, help="key of model_paths.MODEL_PATHS (default: --dataset)")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("train_flags", nargs="*", help="no longer taken (refused with a message)")
    return parser


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
