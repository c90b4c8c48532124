"""One command per paper table: train what is missing, evaluate, attack, write the table.

    python reproduce.py --list
    python reproduce.py ccu-table2 --dataset MNIST --budget small --data-root ../shared/datasets
    python reproduce.py acet-table1 --dataset SVHN --download --ood mine=/path/to/images
    python reproduce.py ccu-table2 --dataset CIFAR10 --download --train-only    # only train what the table needs
    python reproduce.py --train-only --dataset CIFAR10 --paths CIFAR10/ddu      # the runs of a model_paths key

Every run the table needs (model_paths.MODEL_PATHS, trained as model_paths.RUN_FLAGS says; CCU's mixtures by
gen_gmm.py first) is trained unless its checkpoint is finished, resumed (`train.py --resume`) when interrupted,
and a start killed before its first checkpoint is moved aside and trained again; `--train-only` stops there. Then
evaluate.py and/or a study of gen_attack_stats.py run and the table goes to
<results>/tables/<DATASET>_<TABLE>.md with a caption naming the budget. Killing it and running it again keeps
every finished run. `--budget paper` trains and attacks as the papers do; `small` and `tiny` shorten epochs,
attacks and sample counts (recorded in every result row and in the caption) and keep their runs and results
apart from the paper's: <runs-root>/budget-<name>/ and <results-root>/budget-<name>/.
"""
from __future__ import annotations

import argparse
import shlex
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import data
import model_paths
from utils import cli
from utils.cli import UserError
from utils.eta import Eta, duration
from utils.resume import run_state
from utils.runs import resolve_data_root

STUDY_RESULTS_FLAG = "--results-root"  # the studies' results-root flag


@dataclass(frozen=True)
class Table:
    """A paper table: which runs (a MODEL_PATHS key, "{dataset}" filled in) and which steps after training."""

    what: str
    paths: str
    evaluate: tuple[str, ...] | None = None  # evaluate.py flags, None = no evaluation
    study: str | None = None                 # a gen_attack_stats.py study
    output: str = "{dataset}_ood.md"         # the table file the step writes under <results>/tables/
    needs_label: str | None = None           # an entry the step cannot do without (the ccu study: "CCU")
    steps: str | None = None                 # a module whose steps(...) run after training (its own table)


TABLES: dict[str, Table] = {
    "ccu-table2": Table("CCU Table 2: MMC and AUROC of every method of the CCU paper on the OOD sets", "{dataset}",
                        evaluate=("--layout", "ccu", "--metrics", "auroc,mmc")),
    "ccu-table1": Table("CCU Table 1: adversarial noise inside CCU's certified balls (TE/MMC/SR/AUC)", "{dataset}",
                        study="ccu", output="{dataset}_ccu_attack.md", needs_label="CCU"),
    "acet-table1": Table("ACET Table 1: Plain/CEDA/ACET on OOD sets, adversarial noise and adversarial samples",
                         "{dataset}/acet", evaluate=("--layout", "ccu", "--metrics", "mmc,auroc,fpr95",
                                                     "--adv-sets", "adv_noise,adv_samples")),
    "acet-alpha": Table("ACET Table 2: how far uniform noise is scaled before Plain/CEDA/ACET are 99.9% confident",
                        "{dataset}/acet", study="alpha", output="{dataset}_alpha.md"),
    "odin-table2": Table("ODIN Table 2: the max-softmax baseline vs ODIN, five metrics per OOD set",
                         "{dataset}/odin", evaluate=("--layout", "odin"), output="{dataset}_odin.md"),
    "ddu-table": Table("DDU's table: softmax entropy, energy, 5-ensemble and DDU (WRN-28-10 + SN), 5 seeds",
                       "{dataset}/ddu", evaluate=("--layout", "ddu"), output="{dataset}_ddu.md"),
    "limits-audit": Table("Know your limits: exact confidence limits of Plain/CEDA/ACET far from the data",
                          "{dataset}/acet", study="audit", output="{dataset}_audit.md"),
    "detector-stress": Table("Every post-hoc detector of the plain run: AUROC per OOD set, AAUC on adversarial noise "
                             "(the detector's own score attacked), far_accept of its exact far-away limit",
                             "{dataset}/odin", steps="utils.studies.detector_stress",
                             output="{dataset}_detector_stress.md"),
}


@dataclass(frozen=True)
class Budget:
    """Extra flags per script that every run or step of a budget shares; the empty paper budget keeps every script's
    (the papers') defaults. What one kind of run adds at a budget, and the mixtures' flags, are model_paths.RUN_FLAGS's
    and model_paths.GMM_FLAGS's (`shortened`)."""

    train: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    studies: dict = field(default_factory=dict)   # study -> extra flags


BUDGETS: dict[str, Budget] = {
    "paper": Budget(),
    # real MNIST on 2 CPU cores within an hour: one epoch, short attacks, fewer samples
    "small": Budget(train=("--epochs", "1"),
                    evaluate=("--n-ood", "2000", "--n-adv", "200", "--attack-steps", "20"),
                    studies={"ccu": ("--n-seeds", "100", "--restarts", "2", "--steps", "50"), "alpha": ("--n", "2000"),
                             "audit": ("--n-directions", "200")}),
    # tests: seconds on digits
    "tiny": Budget(train=("--epochs", "1", "--max-batches", "3"),
                   evaluate=("--n-ood", "200", "--n-adv", "20", "--attack-steps", "3", "--tune-n", "50"),
                   studies={"ccu": ("--n-seeds", "10", "--restarts", "1", "--steps", "3", "--n-test", "200"),
                            "alpha": ("--n", "100"), "audit": ("--n-directions", "20")}),
}


class _OodAction(data.DatasetListAction):
    """--ood's list, which would swallow a table named after it: say so instead of "unknown dataset"."""

    def __call__(self, parser, namespace, values, option_string=None):
        tables = [value for value in values if value in TABLES]
        if tables:
            parser.error(f"argument --ood: {tables[0]!r} is a table, not an OOD set; name the table before --ood")
        super().__call__(parser, namespace, values, option_string)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", choices=sorted(TABLES), help="the paper table to reproduce")
    p.add_argument("--list", action="store_true", help="print the tables and the runs each trains")
    p.add_argument("--dataset", default="MNIST", help="in-distribution: a key of data.DATASETS")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS))
    p.add_argument("--ood", nargs="+", action=_OodAction, default=[], metavar="SET",
                   help="extra OOD sets for evaluated tables, added to data.OOD_TEST[dataset]: data keys or NAME=PATH "
                        f"(image folder or .npz); {data.SET_LIST_FORMS}")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--results-root", default="results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="print the steps that would run, run nothing")
    p.add_argument("--train-only", action="store_true",
                   help="train what the table (or --paths) needs and stop: no evaluation, study or table")
    p.add_argument("--paths", default=None, metavar="KEY",
                   help="with --train-only and no table: the model_paths.MODEL_PATHS key whose runs to train "
                        "(default: --dataset), e.g. CIFAR10/ddu")
    return p


def roots(args: Namespace) -> tuple[Path, Path]:
    """Runs and results roots of the budget: a shortened budget never mixes with the papers' runs and rows."""
    if args.budget == "paper":
        return Path(args.runs_root), Path(args.results_root)
    sub = f"budget-{args.budget}"
    return Path(args.runs_root) / sub, Path(args.results_root) / sub


def table_key(table: Table, dataset: str) -> str:
    """The model_paths.MODEL_PATHS key whose runs the table reads ("MNIST", "MNIST/acet")."""
    key = table.paths.format(dataset=dataset)
    model_paths.table_entries(dataset, key)  # a table not defined for this dataset: one line listing those that are
    return key


def table_runs(table: Table, dataset: str) -> list[str]:
    """The run folder names the table's entries name, in table order."""
    return model_paths.table_runs(table_key(table, dataset))


def table_needs(table: Table, dataset: str, budget: str = "paper") -> list[tuple[str, str, tuple[str, ...]]]:
    """(what, name, needed_by) of everything the table's runs need, dependencies first (model_paths.training_order):
    the runs, the runs they train beside (ProoD's classifier) and the mixtures (CCU's)."""
    return [(what, name, users) for what, name, users, _ in model_paths.table_plan(table_key(table, dataset), budget)]


@dataclass
class Step:
    title: str
    kind: str                    # what its time depends on (eta.Eta times each kind): "train acet", "evaluate.py"
    action: Callable[[], None]
    argv: list[str] = field(default_factory=list)


def _train_step(run: str, users: tuple[str, ...], base: list[str], flags: list[str], run_dir: Path) -> Step | None:
    """The step that trains (or resumes) one run, or None (with a note) when it finished earlier."""
    state = run_state(run_dir)
    if state == "finished":
        print(f"{run_dir}: finished earlier, kept")
        return None
    kind, seed = model_paths.run_kind(run)
    argv = [*base, "--seed", str(seed), "--name", run, *flags, "--no-progress"] + \
        (["--resume"] if state == "interrupted" else [])
    why = f"; needed by {', '.join(users)}" if users else ""
    return Step(f"train {run} ({state}{why})", f"train {kind}", lambda: train_run(argv, run_dir), argv)


def training_steps(key: str, budget: str, dataset_dir: Path, base: list[str], train_extra: Sequence[str] = (),
                   gmm_extra: Sequence[str] = ()) -> list[Step]:
    """Each mixture fit and run of model_paths key `key` at `budget` (`model_paths.table_plan`) that is not finished
    under dataset_dir, dependencies first: train.py / gen_gmm.py with `base`, the flags of the run's kind, then
    `train_extra` / `gmm_extra` (what every run of the budget shares), then the kind's own shortening. reproduce.py
    and scripts/demo.py both train through this."""
    steps = []
    for what, name, users, flags in model_paths.table_plan(key, budget):
        folder = dataset_dir / name
        shortened = flags.shortened.get(budget, ())
        if what == "gmm":
            if not (folder / "gmm.pt").exists():
                argv = [*base, "--name", name, *flags.flags, *gmm_extra, *shortened]
                steps.append(Step(f"gen_gmm {name} (needed by {', '.join(users)})", "gen_gmm",
                                  lambda argv=argv, folder=folder: fit_gmm(argv, folder), argv))
        elif (step := _train_step(name, users, base, [*flags.flags, *train_extra, *shortened], folder)) is not None:
            steps.append(step)
    return steps


def plan(args: Namespace, table: Table, budget: Budget) -> list[Step]:
    """Every step still to do, in order: each unfinished run and what it needs, then evaluation and/or the study."""
    runs_root, results_root = roots(args)
    common = ["--dataset", args.dataset, "--runs-root", str(runs_root), "--device", args.device]
    data_flags = (["--data-root", args.data_root] if args.data_root else []) + (["--download"] if args.download else [])
    steps = training_steps(table_key(table, args.dataset), args.budget, runs_root / args.dataset,
                           [*common, *data_flags], budget.train)
    results = ["--results-root", str(results_root)]
    if table.evaluate is not None:
        ood = list(dict.fromkeys([*data.OOD_TEST.get(args.dataset, []), *args.ood]))
        argv = [*common, *data_flags, *results, "--paths", table.paths.format(dataset=args.dataset),
                "--skip-missing-ood", "--no-progress", "--no-print", *table.evaluate, *budget.evaluate] + \
            (["--ood", *ood] if ood else [])
        steps.append(Step("evaluate.py", "evaluate.py", lambda: _evaluate(argv, args.budget), argv))
    if table.study is not None:
        study_data = ["--data-root", args.data_root] if args.data_root and table.study != "alpha" else []
        study = ["--study", table.study, *common, *study_data, STUDY_RESULTS_FLAG, str(results_root),
                 *budget.studies.get(table.study, ())]
        if table.study != "ccu":  # the ccu study finds the table's runs (and its CCU run) itself
            study += ["--runs", *[str(runs_root / args.dataset / run) for run in table_runs(table, args.dataset)]]
        title = f"gen_attack_stats.py --study {table.study}"
        steps.append(Step(title, title, lambda: _study(study, args.budget), study))
    if table.steps is not None:
        import importlib

        made = importlib.import_module(table.steps).steps(
            args, runs_root, results_root, table_runs(table, args.dataset), budget.evaluate,
            run_evaluate=lambda argv: _evaluate(argv, args.budget), run_study=lambda argv: _study(argv, args.budget))
        steps += [Step(*step) for step in made]
    return steps


def fit_gmm(argv: list[str], gmm_dir: Path) -> None:
    """gen_gmm.py with `argv` into gmm_dir, which has no gmm.pt: the one rule of every training driver (this and
    scripts/demo.py) for a fit that is missing or was stopped."""
    import gen_gmm

    if gmm_dir.exists() and not any(gmm_dir.iterdir()):
        gmm_dir.rmdir()  # an empty folder left by a fit that was killed
    elif gmm_dir.exists():  # files but no gmm.pt: a fit that was stopped; keep it aside, never overwrite it
        gmm_dir.rename(gmm_dir.with_name(f"{gmm_dir.name}.interrupted-{int(time.time())}"))
    gen_gmm.main(gen_gmm.get_args_parser().parse_args(argv))


def train_run(argv: list[str], run_dir: Path) -> None:
    """train.py with `argv` (which says --resume for an interrupted run) into run_dir, which is not finished: the one
    rule of every training driver (this and scripts/demo.py) for a run that is missing, stale or interrupted."""
    import train

    if run_state(run_dir) == "stale":  # stopped before its first checkpoint: nothing to resume, keep it aside
        aside = run_dir.with_name(f"{run_dir.name}.interrupted-{int(time.time())}")
        run_dir.rename(aside)
        print(f"{run_dir} stopped before its first epoch ended; moved to {aside} and started again")
    train.main(train.get_args_parser().parse_args(argv))


def _evaluate(argv: list[str], budget: str) -> None:
    import evaluate

    args = evaluate.get_args_parser().parse_args(argv)
    args.row_tags = {"budget": budget}
    evaluate.main(args)


def _study(argv: list[str], budget: str) -> None:
    import gen_attack_stats

    args = gen_attack_stats.get_args_parser(argv[1]).parse_args(argv)
    args.row_tags = {"budget": budget}
    gen_attack_stats.run_study(args)  # its number checks and attack precision, as on the command line


def run_steps(steps: list[Step], label: str, eta: Eta | None = None) -> None:
    """Run the steps, printing one progress line per stage; its ETA counts only stages of kinds already timed
    (utils.eta.Eta), and says which kinds it cannot count yet."""
    eta = eta or Eta()
    start = time.perf_counter()
    for index, step in enumerate(steps, 1):
        elapsed = time.perf_counter() - start
        print(f"[{label}] stage {index}/{len(steps)}: {step.title} | elapsed {duration(elapsed)} | "
              f"{eta.describe([s.kind for s in steps[index - 1:]])}", flush=True)
        began = time.perf_counter()
        step.action()
        eta.record(step.kind, time.perf_counter() - began)
    print(f"[{label}] all {len(steps)} stages done in {duration(time.perf_counter() - start)} "
          f"({duration(time.process_time())} of CPU time in this process)", flush=True)


def caption(args: Namespace, table: Table, budget: Budget) -> str:
    """What the table shows, with the budget it was made under and the flags that shortened it."""
    text = f"{table.what}. In-distribution {args.dataset}; budget `{args.budget}`"
    if args.budget == "paper":
        return text + " (the papers' settings).\n\n"
    needs = model_paths.table_plan(table_key(table, args.dataset), args.budget)
    kinds = {model_paths.run_kind(name)[0] for what, name, _, _ in needs if what == "run"}
    book = model_paths.training(args.budget, table_key(table, args.dataset))
    parts = [("train.py", budget.train), *[(f"train.py ({kind} runs)", flags.shortened.get(args.budget, ()))
                                           for kind, flags in book.runs.items() if kind in kinds],
             ("gen_gmm.py", book.gmm.shortened.get(args.budget, ()) if any(w == "gmm" for w, *_ in needs) else ()),
             ("evaluate.py", budget.evaluate if table.evaluate is not None else ()),
             (f"gen_attack_stats.py --study {table.study}", budget.studies.get(table.study, ()))]
    return text + " (shortened: " + "; ".join(f"{what} {shlex.join(flags)}" for what, flags in parts if flags) \
        + "), so its numbers are not the papers'.\n\n"


def write_table(args: Namespace, table_name: str, table: Table, budget: Budget) -> Path:
    """<results>/tables/<DATASET>_<TABLE>.md: the caption and the table the last step wrote."""
    from utils.runs import atomic_write_text

    tables_dir = roots(args)[1] / "tables"
    produced = tables_dir / table.output.format(dataset=args.dataset)
    if not produced.exists():
        raise FileNotFoundError(f"{produced} was not written; see the output of the steps above")
    out = tables_dir / f"{args.dataset}_{table_name}.md"
    atomic_write_text(out, caption(args, table, budget) + produced.read_text())
    return out


def table_datasets(table: Table) -> list[str]:
    """The datasets model_paths.MODEL_PATHS defines the table for, with the entry it needs (what --list offers)."""
    return sorted({key.split("/")[0] for key, entries in model_paths.MODEL_PATHS.items()
                   if table.paths.format(dataset=key.split("/")[0]) == key
                   and (table.needs_label is None or any(entry.label == table.needs_label for entry in entries))})


def _trains(table: Table, dataset: str) -> str:
    """What the table trains on a dataset, dependencies included: "plain-s0, gmm-s0 (gen_gmm), oe-s0 (for prood-s0)"."""
    parts = []
    for what, name, users in table_needs(table, dataset):
        note = "gen_gmm" if what == "gmm" else f"for {', '.join(users)}" if users else ""
        parts.append(f"{name} ({note})" if note else name)
    return ", ".join(parts)


def list_tables() -> str:
    lines = []
    for name, table in TABLES.items():
        steps = " + ".join(s for s in ("evaluate.py" if table.evaluate else "",
                                       f"gen_attack_stats.py --study {table.study}" if table.study else "",
                                       f"{table.steps}.steps" if table.steps else "") if s)
        lines.append(f"{name:13s} {table.what}; then {steps}")
        by_runs: dict[str, list[str]] = {}  # datasets that train the same runs share a line
        for dataset in table_datasets(table):
            by_runs.setdefault(_trains(table, dataset), []).append(dataset)
        lines += [f"{'':13s} {', '.join(datasets)}: trains {runs}" for runs, datasets in by_runs.items()]
    return "\n".join(lines)


def chosen_table(args: Namespace) -> Table:
    """TABLES[args.table], or with --train-only and no table the runs of --paths (default: --dataset's table)."""
    if args.paths is not None and (args.table is not None or not args.train_only):
        raise UserError("--paths names the runs to train without a table: pass it with --train-only and no table")
    if args.table is not None:
        return TABLES[args.table]
    if not args.train_only:
        raise UserError(f"name a table: one of {', '.join(sorted(TABLES))} (reproduce.py --list shows the runs each "
                        "trains), or pass --train-only")
    key = args.paths or args.dataset
    if args.paths is not None:
        model_paths.table_entries(args.dataset, key)  # an unknown key: one line listing the keys
    if key.partition("/")[0] != args.dataset:
        raise UserError(f"--paths {key} is a table of {key.partition('/')[0]}, not of --dataset {args.dataset}; "
                        f"pass --dataset {key.partition('/')[0]}")
    return Table(f"the runs of model_paths.MODEL_PATHS[{key!r}]", key)


def train_only(args: Namespace, table: Table, budget: Budget) -> None:
    """--train-only: the training steps of the plan (what the table needs and is not finished), nothing after."""
    label = f"{args.table or table_key(table, args.dataset)} {args.dataset} budget={args.budget} (training only)"
    if args.ood:
        print("note: --train-only evaluates nothing; --ood is not used")
    steps = plan(args, Table(table.what, table.paths), budget)  # no evaluation, no study
    if args.dry_run:
        return print_plan(steps)
    run_steps(steps, label, _finished_runs_eta(args, table, steps))
    return None


def print_plan(steps: list[Step]) -> None:
    """--dry-run: the numbered titles of the steps."""
    print("\n".join(f"{i}. {step.title}" for i, step in enumerate(steps, 1)) or "nothing to train")


def _finished_runs_eta(args: Namespace, table: Table, steps: list[Step]) -> Eta:
    """An Eta that has timed, from their logs, the kinds of the table's runs finished earlier under this budget:
    the runs the plan (`steps`) does not train, which `_train_step` found finished (their checkpoints are not
    read again)."""
    eta = Eta()
    planned = {step.argv[step.argv.index("--name") + 1] for step in steps if step.kind.startswith("train ")}
    eta.record_finished_runs(roots(args)[0] / args.dataset,
                             {name: f"train {model_paths.run_kind(name)[0]}" for what, name, _
                              in table_needs(table, args.dataset, args.budget) if what == "run" and name not in planned})
    return eta


def main(args: Namespace) -> Path | None:
    if args.list:
        print(list_tables())
        return None
    table, budget = chosen_table(args), BUDGETS[args.budget]
    data.dataset_info(args.dataset)  # unknown names fail before anything runs
    table_runs(table, args.dataset)  # a table not defined for this dataset: one line listing those that are
    if args.dataset not in table_datasets(table):  # defined, but without the entry its step needs (moons: no CCU)
        raise UserError(f"{args.table} needs a {table.needs_label} entry, which model_paths.MODEL_PATHS has not for "
                        f"{args.dataset}; datasets it runs on: {', '.join(table_datasets(table))}")
    if args.train_only:
        return train_only(args, table, budget)
    for key in args.ood:  # unreadable NAME=PATH files fail before anything is trained or written (one NAME for
        # two sets was refused by --ood's parser, data.dataset_list)
        data.check_dataset(key, like=args.dataset, root=resolve_data_root(args.data_root))
    if args.ood and table.evaluate is None:
        print(f"note: {args.table} evaluates no OOD sets; --ood is not used")
    label = f"{args.table} {args.dataset} budget={args.budget}"
    steps = plan(args, table, budget)
    if args.dry_run:
        return print_plan(steps)
    run_steps(steps, label, _finished_runs_eta(args, table, steps))  # runs finished earlier time their kind first
    out = write_table(args, args.table, table, budget)
    print(out.read_text())
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.run(main, get_args_parser())
