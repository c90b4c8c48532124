"""The main job on built-in data: train the demo models on scikit-learn's 8x8 digits, evaluate them on the
digits OOD sets, and print the comparison table. CPU, a few minutes; `make demo` runs it.

Which runs it trains and with which flags is the registry's: the digits table of model_paths.MODEL_PATHS at the
demo's budget (model_paths.DEMO_RUN_FLAGS, DEMO_GMM_FLAGS). Runs that already finished are reused, interrupted ones
are resumed and starts killed before their first checkpoint are moved aside (reproduce.py's rule), so the demo can
be re-run safely.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
import gen_attack_stats  # noqa: E402
import model_paths  # noqa: E402
import reproduce  # noqa: E402

TABLE = "digits"  # the model_paths.MODEL_PATHS key the demo trains and evaluates, at budget model_paths.DEMO_BUDGET
# What the demo does after training, at its budget (global to every run, as reproduce.BUDGETS' evaluate/studies)
ATTACK_FLAGS = ["--n-seeds", "200", "--restarts", "5", "--steps", "100"]
GAUC_FLAGS = ["--ood", "uniform", "natural_patches", "--n-ood", "100", "--apgd-steps", "20", "--apgd-restarts",
              "1", "--pgd-steps", "10"]
EVALUATE_FLAGS = ["--adv-sets", "adv_noise", "--attack-steps", "40", "--n-adv", "360", "--n-ood", "5000"]
DDU_FIGURE_FLAGS = ["--blends", "500", "--n", "2000"]
# --tiny: the same pipeline and output files in seconds (tests/test_notebooks.py runs the notebooks on them);
# appended after the flags above, so argparse's last-wins makes them override.
TINY_FLAGS = {"train": ["--epochs", "1", "--max-batches", "2", "--attack-steps", "2"],
              "gmm": ["--n-components", "2", "--n-in", "200", "--n-out", "200", "--max-iter", "5"],
              "evaluate": ["--adv-sets", "", "--ood", "uniform,natural_patches", "--n-ood", "100"],
              "attack": ["--n-seeds", "6", "--restarts", "1", "--steps", "3", "--n-test", "100"],
              "ddu": ["--blends", "50", "--n", "100"]}


def tiny(args: argparse.Namespace, step: str) -> list[str]:
    """The --tiny overrides of one step (none without --tiny)."""
    return TINY_FLAGS[step] if getattr(args, "tiny", False) else []


def train_table(args: argparse.Namespace) -> None:
    """Every run and mixture of the demo's table that is not finished, dependencies first, through reproduce.py's
    training steps (finished runs are kept, interrupted ones resumed)."""
    steps = reproduce.training_steps(TABLE, model_paths.DEMO_BUDGET, Path(args.runs_root) / "digits",
                                     ["--dataset", "digits", "--runs-root", args.runs_root],
                                     tiny(args, "train"), tiny(args, "gmm"))
    for step in steps:
        start = time.perf_counter()
        step.action()
        print(f"{step.title.split(' (')[0]}: done in {time.perf_counter() - start:.0f}s")


def ddu_figure_scores(args: argparse.Namespace) -> None:
    """Cache the DDU run's entropy / log-density scores for notebooks/ddu_histograms.ipynb (seconds)."""
    from utils.plots import ddu

    ddu.main(ddu.get_args_parser().parse_args(
        ["--runs-root", args.runs_root, "--out", str(Path(args.results_root) / "figures" / "ddu"),
         *DDU_FIGURE_FLAGS, *tiny(args, "ddu")]))


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    train_table(args)
    common = ["--dataset", "digits", "--runs-root", args.runs_root]
    print("\n== OOD detection on digits (evaluate.py) ==")
    evaluate.main(evaluate.get_args_parser().parse_args(
        [*common, "--results-root", args.results_root, "--no-progress", *EVALUATE_FLAGS, *tiny(args, "evaluate"), *args.evaluate_flags]))
    print("== Adversarial noise inside CCU's certified balls (gen_attack_stats.py --study ccu) ==")
    gen_attack_stats.main(["--study", "ccu", *common, "--results-root", args.results_root, *ATTACK_FLAGS, *tiny(args, "attack")])
    print("== DDU entropy and feature density of the DDU run (python -m utils.plots.ddu) ==")
    ddu_figure_scores(args)
    print("== AUC / AAUC / GAUC in the eps = 0.3 ball around each OOD point (gen_attack_stats.py --study gauc) ==")
    gen_attack_stats.main(["--study", "gauc", *common, "--results-root", args.results_root, *GAUC_FLAGS])
    print(f"demo finished in {time.perf_counter() - start:.0f}s; runs in {args.runs_root}, results in "
          f"{args.results_root}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs-root", default="runs/demo")
    parser.add_argument("--results-root", default="results/demo")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=False,
                        help="seconds-long budget with the same outputs (for tests), not meaningful numbers")
    parser.add_argument("--evaluate-flags", nargs="*", default=[], help="extra evaluate.py flags")
    return parser


if __name__ == "__main__":
    from utils import cli

    cli.run(main, get_args_parser())
