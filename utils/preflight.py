"""Checks evaluate.py makes before it scores anything: the runs exist, load, and were trained on --dataset.

A paper table (model_paths.MODEL_PATHS) whose runs are missing is answered with the list of the missing runs,
each with the `train.py` command that makes it (model_paths.run_flags; for the digits table, the flags of
the demo's budget, model_paths.DEMO_RUN_FLAGS), instead of a traceback after an hour of
scoring the runs that happen to exist. Every error here is one the user can fix: a ValueError or
FileNotFoundError subclass with a message that says what to do (exit status 2 in evaluate.py).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import model_paths
from model_paths import TableEntry


class MissingRunsError(FileNotFoundError):
    """Runs named by a paper table are not trained; the message lists each with its train.py command."""

    listing = True  # utils.cli prints the whole list, not only its first line


class RunCheckError(ValueError):
    """A run folder that cannot be evaluated (unreadable config, bad checkpoint, another dataset)."""


def run_dataset(run_dir: Path) -> str:
    """The dataset a run was trained on, from its config.json."""
    config_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise RunCheckError(f"run {run_dir}: no such run folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunCheckError(f"run {run_dir}: unreadable config.json ({error})") from None
    if not isinstance(config, dict) or not config.get("dataset"):
        raise RunCheckError(f"run {run_dir}: config.json names no dataset")
    return str(config["dataset"])


def runs_dataset(runs: list[str]) -> str:
    """The one dataset that the runs given with --runs were trained on (the default of --dataset of evaluate.py and
    of the studies of gen_attack_stats.py): a RunCheckError when they mix datasets or a folder has no readable
    config.json naming one."""
    datasets = {run: run_dataset(Path(run)) for run in runs}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{run} ({dataset})" for run, dataset in datasets.items())
        raise RunCheckError(f"--runs mixes datasets: {listed}; pass the runs of one dataset at a time")
    return next(iter(datasets.values()))


def hint_budget(table: str) -> str:
    """The budget whose flags the hints name: the demo's for the digits table (what `make demo` trains, the
    default of evaluate.py --dataset digits), else the papers'."""
    return model_paths.DEMO_BUDGET if model_paths.DEMO_BUDGET in model_paths.table_budgets(table) else "paper"


def train_flags(run: str, table: str) -> tuple[list[str], int] | None:
    """train.py flags and seed of a table's run at the hint budget (model_paths.run_flags), else the papers'."""
    for budget in dict.fromkeys((hint_budget(table), "paper")):
        try:
            return model_paths.run_flags(run, budget, table)
        except ValueError:
            continue
    return None


def train_command(run: str, dataset: str, table: str, runs_root: str, data_root: str | None) -> str:
    """The train.py command that makes run <kind>-s<seed> of a table."""
    flags_seed = train_flags(run, table)
    if flags_seed is None:
        return f"(no recipe for {run!r} in model_paths.RUN_FLAGS: train it with train.py --name {run})"
    where = ([] if runs_root == "runs" else ["--runs-root", runs_root]) + ([] if not data_root else
                                                                          ["--data-root", data_root])
    return shlex.join(["python", "train.py", "--dataset", dataset, "--seed", str(flags_seed[1]), "--name", run,
                       *where, *flags_seed[0]])


def missing_runs(entries: list[TableEntry], runs_root: str, dataset: str) -> list[str]:
    """Run names of the entries without a checkpoint, in table order."""
    names = dict.fromkeys(run for entry in entries for run in entry.runs)
    return [run for run in names if not (Path(runs_root) / dataset / run / "model.pt").exists()]


def missing_runs_message(missing: list[str], entries: list[TableEntry], dataset: str, runs_root: str,
                         data_root: str | None, table: str) -> str:
    lines = [f"{len(missing)} run(s) of the {table} table are not trained under {Path(runs_root) / dataset} "
             f"(labels: {', '.join(e.label for e in entries if set(e.runs) & set(missing))}); train them with:"]
    flags = [(train_flags(run, table) or ([], 0))[0] for run in missing]
    gmms = sorted({run_flags[run_flags.index("--gmm") + 1] for run_flags in flags if "--gmm" in run_flags})
    gmm_flags = list(model_paths.training(hint_budget(table), table).gmm.flags)
    for gmm in gmms:
        if not (Path(runs_root) / dataset / gmm / "gmm.pt").exists():
            where = ([] if runs_root == "runs" else ["--runs-root", runs_root]) + ([] if not data_root else
                                                                                  ["--data-root", data_root])
            lines.append("  " + shlex.join(["python", "gen_gmm.py", "--dataset", dataset, "--name", gmm, *where,
                                            *gmm_flags]))
    lines += ["  " + train_command(run, dataset, table, runs_root, data_root) for run in missing]
    started = [run for run in missing if (Path(runs_root) / dataset / run).exists()]
    if started:
        lines.append(f"  ({', '.join(started)}: the folder exists without model.pt, a start that ended before its "
                     "first checkpoint; delete it first)")
    lines.append(f"or all at once: python reproduce.py --train-only --dataset {dataset}"
                 + ("" if table == dataset else f" --paths {table}")
                 + (f" --runs-root {runs_root}" if runs_root != "runs" else "")
                 + (f" --data-root {data_root}" if data_root else ""))
    if hint_budget(table) == model_paths.DEMO_BUDGET:
        lines[-1] = (f"or all at once (the demo): python scripts/demo.py --runs-root {runs_root} "
                     "--results-root results")
    lines.append("or pass --skip-missing-runs to score the entries whose runs exist")
    return "\n".join(lines)


def drop_missing(entries: list[TableEntry], missing: list[str]) -> list[TableEntry]:
    """The entries all of whose runs exist (an ensemble or seed group with a missing member is left out)."""
    return [entry for entry in entries if not set(entry.runs) & set(missing)]


def check_runs(run_dirs: list[Path], dataset: str) -> None:
    """Every run folder exists, has a readable config.json of `dataset`, and a checkpoint that loads."""
    from utils import methods  # noqa: PLC0415 (torch-heavy; only when there is something to check)

    problems = []
    for run_dir in dict.fromkeys(run_dirs):
        try:
            trained_on = run_dataset(run_dir)
            if trained_on != dataset:
                raise RunCheckError(f"run {run_dir}: trained on {trained_on}, not on --dataset {dataset}; "
                                    f"pass --dataset {trained_on} or leave --dataset out")
            methods.load_run(run_dir, device="cpu")  # builds the model and checks the state dict's keys/shapes
        except RunCheckError as error:
            problems.append(str(error))
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"run {run_dir}: {error}")
    if problems:
        raise RunCheckError("; ".join(problems) if len(problems) == 1 else
                            f"{len(problems)} runs cannot be evaluated:\n  " + "\n  ".join(problems))
