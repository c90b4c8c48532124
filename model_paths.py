"""Which trained runs make up each paper table, under which label, scored by which detector, and how each run trains.

`MODEL_PATHS[key]` is an ordered list of `TableEntry`s; the order is the column order of the tables. A key is a
dataset ("MNIST": CCU's Table 2 with every method) or a dataset and a table ("MNIST/acet", "CIFAR10/ddu").
A run is named by its folder under `<runs-root>/<dataset>/` (e.g. "plain-s0"). An entry with several runs is
either an ensemble (detector "ensemble": the runs are its members) or several seeds of one model, whose rows
`evaluate.py --table` aggregates as mean +- standard error.

How the runs train is paired with the tables here too (`TRAININGS`): run "<kind>-s<seed>" is
`train.py --seed <seed>` with the flags of its kind (`RUN_FLAGS[kind]`), which name its method and whatever else
sets it apart: "mcd" is `--method plain --recipe mcd`, "good80" is `--method good --good-quantile 0.8`. A
shortened budget (reproduce.py --budget small/tiny) appends flags of its own to some kinds; the demo
(`make demo`) trains the digits table with flags of its own (`DEMO_RUN_FLAGS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class TableEntry:
    label: str                      # column name in the tables (e.g. "Base", "ODIN", "CCU")
    runs: tuple[str, ...]           # run folder names under <runs-root>/<dataset>/
    detector: str = "msp"           # key of utils.detectors.DETECTORS
    options: dict = field(default_factory=dict)  # detector options, named as in the papers

    def run_dirs(self, runs_root: str | Path, dataset: str) -> list[Path]:
        return [Path(runs_root) / dataset / run for run in self.runs]

    @property
    def is_ensemble(self) -> bool:
        return self.detector == "ensemble"


def _seeds(name: str, n: int, start: int = 0) -> tuple[str, ...]:
    return tuple(f"{name}-s{seed}" for seed in range(start, start + n))


# The digits table: the demo's (`make demo`, scripts/demo.py; trained with DEMO_RUN_FLAGS on scikit-learn's 8x8
# digits) and CCU's Table 2 on digits (`reproduce.py ccu-table2 --dataset digits`, trained with RUN_FLAGS).
_DEMO = [
    TableEntry("Base", ("plain-s0",)),
    TableEntry("GAN", ("gan-s0",)),
    TableEntry("ODIN", ("plain-s0",), "odin"),
    TableEntry("Maha", ("plain-s0",), "mahalanobis"),
    TableEntry("CEDA", ("ceda-s0",)),
    TableEntry("ACET", ("acet-s0",)),
    TableEntry("DDU", ("ddu-s0",), "ddu"),
    TableEntry("CCU", ("ccu-s0",)),
    TableEntry("GOOD80", ("good80-s0",)),
    TableEntry("ProoD", ("prood-s0",)),
]

# The paper tables (CCU Table 2 columns, plus DDU): run "<kind>-s<seed>" trains with `train.py --dataset D --seed S`
# and RUN_FLAGS[kind] (`reproduce.py ccu-table2 --dataset D` trains them all).
_PAPER = [
    TableEntry("Base", ("plain-s0",)),
    TableEntry("MCD", ("mcd-s0",), "mcdropout", {"samples": 10, "score": "variance"}),
    TableEntry("EDL", ("edl-s0",), "edl"),
    TableEntry("DE", _seeds("plain", 5), "ensemble"),
    TableEntry("GAN", ("gan-s0",)),  # the confident-classifier GAN (arXiv 1711.09325), as in CCU's Table 2
    TableEntry("ODIN", ("plain-s0",), "odin"),
    TableEntry("Maha", ("plain-s0",), "mahalanobis"),
    TableEntry("CEDA", ("ceda-s0",)),
    TableEntry("ACET", ("acet-s0",)),
    TableEntry("OE", ("oe-s0",)),
    TableEntry("CCU", ("ccu-s0",)),
    TableEntry("CCUs", ("ccus-s0",)),
    TableEntry("DDU", ("ddu-s0",), "ddu"),
    # GOOD and ProoD (provable OOD detection on eps-balls; `gen_attack_stats.py --study gauc` for AAUC / GAUC)
    TableEntry("GOOD80", ("good80-s0",)),
    TableEntry("GOOD100", ("good100-s0",)),
    TableEntry("ProoD", ("prood-s0",)),
]

# DDU's README table (docs/methods.md#ddu-table): WRN-28-10 + SN + mod (`--recipe ddu`), seeds 1..5, mean +- standard
# error. Evaluate with `evaluate.py --dataset CIFAR10 --paths CIFAR10/ddu --layout ddu`.
_DDU_SEEDS = _seeds("ddu", 5, start=1)
_DDU = [
    TableEntry("Softmax", _DDU_SEEDS, "ddu", {"score": "softmax_entropy"}),
    TableEntry("Energy-based", _DDU_SEEDS, "energy"),
    TableEntry("5-Ensemble", _seeds("ddu", 5, start=1), "ensemble", {"score": "entropy"}),
    TableEntry("DDU", _DDU_SEEDS, "ddu"),
]

# ACET's Table 1 (arXiv 1812.05720): Plain, CEDA, ACET; ODIN's Table 2 (arXiv 1706.02690): the baseline and ODIN on
# one network.
_ACET = [TableEntry("Plain", ("plain-s0",)), TableEntry("CEDA", ("ceda-s0",)), TableEntry("ACET", ("acet-s0",))]
_ODIN = [TableEntry("Baseline", ("plain-s0",)), TableEntry("ODIN", ("plain-s0",), "odin")]

MODEL_PATHS: dict[str, list[TableEntry]] = {
    "digits": _DEMO,
    **{f"{name}/acet": _ACET for name in ("digits", "MNIST", "FMNIST", "SVHN", "CIFAR10", "CIFAR100")},
    **{f"{name}/odin": _ODIN for name in ("digits", "MNIST", "SVHN", "CIFAR10", "CIFAR100")},
    "CIFAR10/ddu": _DDU,
    "CIFAR100/ddu": _DDU,
    "moons": [TableEntry("Base", ("plain-s0",)), TableEntry("CEDA", ("ceda-s0",)), TableEntry("ACET", ("acet-s0",))],
    **{name: list(_PAPER) for name in ("MNIST", "FMNIST", "SVHN", "CIFAR10", "CIFAR100")},
}


def table_entries(dataset: str, paths: str | None = None) -> list[TableEntry]:
    """The entries of MODEL_PATHS[paths or dataset] (a key such as "CIFAR10/ddu" names a second table)."""
    key = paths or dataset
    if key not in MODEL_PATHS:
        raise ValueError(f"no table is defined for {key!r}; model_paths.MODEL_PATHS has: "
                         f"{', '.join(MODEL_PATHS)} (or pass --runs DIR ...)")
    return MODEL_PATHS[key]


@dataclass(frozen=True)
class RunFlags:
    """How one kind of run trains: its flags (train.py, or gen_gmm.py for a mixture fit) at the papers' budget, and
    per shortened budget the flags appended after that budget's own (reproduce.BUDGETS: what all runs share)."""

    flags: tuple[str, ...]
    shortened: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # budget -> flags of this kind only


_GOOD_SMALL = ("--epochs", "4", "--max-batches", "100", "--arch-kwargs", '{"width": 0.25}', "--milestones",
               "--eps-ramp", "0.25", "1.0", "--kappa-ramp", "0.25", "0.5")

# How each run kind of the paper tables trains: run "<kind>-s<seed>" = `train.py --seed <seed> <flags>`. The small
# budget (real MNIST on 2 CPU cores within an hour) shortens some kinds beyond its one epoch: ACET's attack and
# batches; DDU's network is the small pre-activation ResNet (spectral normalisation and the modifications kept; a
# whole epoch of 100 SGD batches left the WRN at 40% accuracy); GOOD needs a clean warm-up before its bound loss
# (one epoch at full eps collapses it to a constant output): 4 short epochs of the size-L CNN at quarter width, eps
# and kappa ramped from the second epoch on; ProoD's interval-bound epoch at full discriminator width takes about
# 23 min on 2 cores: half width (about 4x cheaper) on 300 batches. The tiny budget (tests: seconds on digits)
# shortens ACET's attack and swaps DDU's network the same way.
RUN_FLAGS: dict[str, RunFlags] = {
    "plain": RunFlags(("--method", "plain")),
    # CCU's MC-dropout baseline: VGG-13 (LeNet on MNIST), dropout 0.5 kept active at test time, Adam 2e-4
    "mcd": RunFlags(("--method", "plain", "--recipe", "mcd")),
    "edl": RunFlags(("--method", "edl", "--optimizer", "adam", "--lr", "1e-3")),
    "ceda": RunFlags(("--method", "ceda")),
    "acet": RunFlags(("--method", "acet"), {"small": ("--attack-steps", "5", "--max-batches", "150"),
                                            "tiny": ("--attack-steps", "2")}),
    "oe": RunFlags(("--method", "oe", "--out-data", "natural_patches")),
    "ccu": RunFlags(("--method", "ccu", "--gmm", "gmm-s0", "--out-data", "natural_patches")),
    "ccus": RunFlags(("--method", "ccus", "--gmm", "gmm-s0", "--out-data", "uniform")),
    "ddu": RunFlags(("--method", "plain", "--recipe", "ddu"), {"small": ("--arch", "resnet_small"),
                                                               "tiny": ("--arch", "resnet_small")}),
    # classifier, G and D settings per dataset come from utils.methods.gan.GAN_PARAMS (LeNet on MNIST, else VGG-13)
    "gan": RunFlags(("--method", "gan")),
    # ProoD's discriminator trains beside the finished OE run of the same table (trained before it: training_order)
    "prood": RunFlags(("--method", "prood", "--classifier", "oe-s0", "--out-data", "natural_patches"),
                      {"small": ("--discriminator-width", "0.5", "--max-batches", "300")}),
    # GOOD_Q with --method good's defaults per dataset (utils.methods.certified.GOOD_PARAMS: the paper's plain CNN,
    # size L for one-channel data and XL otherwise, on natural patches; LeNet on ACET noise for 60 epochs on digits)
    "good80": RunFlags(("--method", "good", "--good-quantile", "0.8"), {"small": _GOOD_SMALL}),
    "good100": RunFlags(("--method", "good", "--good-quantile", "1.0"), {"small": _GOOD_SMALL}),
}
# CCU's in- and out-distribution mixtures (gen_gmm.py, the "gmm-s0" the ccu/ccus runs name)
GMM_FLAGS = RunFlags((), {"small": ("--n-in", "10000", "--n-out", "5000", "--max-iter", "30"),
                          "tiny": ("--n-components", "5", "--n-in", "300", "--n-out", "300", "--no-augment",
                                   "--max-iter", "10")})

# The demo's budget of the digits table (`make demo`): minutes on a laptop CPU. Attacks are shortened (10 PGD steps
# instead of 40 in training). scripts/demo.py --tiny appends its seconds-long flags to every run.
DEMO_RUN_FLAGS: dict[str, RunFlags] = {
    "plain": RunFlags(("--method", "plain", "--epochs", "20")),
    "gan": RunFlags(("--method", "gan", "--epochs", "10")),  # G and D make a step ~4x plain's: half the epochs
    "ceda": RunFlags(("--method", "ceda", "--epochs", "20")),
    "acet": RunFlags(("--method", "acet", "--attack-steps", "10", "--epochs", "20")),
    "ddu": RunFlags(("--method", "plain", "--arch", "resnet_small", "--arch-kwargs", '{"bn_momentum": 0.1}',
                     "--spectral-norm-coeff", "3", "--mod", "--epochs", "20", "--val-fraction", "0.1")),
    "ccu": RunFlags(("--method", "ccu", "--gmm", "gmm-s0", "--out-data", "natural_patches", "--epochs", "20")),
    # GOOD_80 with --method good's digits defaults (utils.methods.certified.GOOD_PARAMS: LeNet on ACET noise, 60 epochs)
    "good80": RunFlags(("--method", "good")),
    # ProoD over the plain run with --method prood's digits defaults (utils.methods.certified.PROOD_PARAMS): only its
    # certified discriminator trains, on uniform noise at MNIST's eps 0.3
    "prood": RunFlags(("--method", "prood", "--classifier", "plain-s0")),
}
DEMO_GMM_FLAGS = RunFlags(("--n-components", "20", "--out-data", "natural_patches", "--n-out", "3000", "--no-augment"))


@dataclass(frozen=True)
class Training:
    """How the runs of some tables train at some budgets: flags per run kind, and of the mixture fits."""

    runs: Mapping[str, RunFlags]      # run kind -> train.py flags
    gmm: RunFlags                     # gen_gmm.py flags
    budgets: tuple[str, ...]          # the budgets it trains at
    tables: tuple[str, ...] | None = None  # the MODEL_PATHS keys it trains (None: every one)


DEMO_BUDGET = "demo"
# Every table with the papers' flags (shortened per budget), and the digits table at the demo's budget.
TRAININGS: tuple[Training, ...] = (Training(RUN_FLAGS, GMM_FLAGS, ("paper", "small", "tiny")),
                                   Training(DEMO_RUN_FLAGS, DEMO_GMM_FLAGS, (DEMO_BUDGET,), tables=("digits",)))


def table_budgets(table: str | None = None) -> list[str]:
    """The budgets a MODEL_PATHS key is trained at (every budget of any table when None)."""
    return [budget for training in TRAININGS if table is None or training.tables is None or table in training.tables
            for budget in training.budgets]


def training(budget: str = "paper", table: str | None = None) -> Training:
    """How the runs of table `table` (a MODEL_PATHS key; None: any) train at `budget`."""
    for candidate in TRAININGS:
        if budget in candidate.budgets and (table is None or candidate.tables is None or table in candidate.tables):
            return candidate
    raise ValueError(f"no budget {budget!r} for the {table} table; budgets it trains at: "
                     f"{', '.join(table_budgets(table))}")


def run_kind(run: str) -> tuple[str, int]:
    """Kind and seed of a run named "<kind>-s<seed>"."""
    kind, _, seed = run.rpartition("-s")
    if not kind or not seed.isdigit():
        raise ValueError(f"cannot derive training flags from run name {run!r}; expected <kind>-s<seed> with kind in "
                         f"{', '.join(RUN_FLAGS)}")
    return kind, int(seed)


def run_recipe(run: str, budget: str = "paper", table: str | None = None) -> tuple[RunFlags, int]:
    """The RunFlags and the seed of run "<kind>-s<seed>" of a table at a budget."""
    kind, seed = run_kind(run)
    runs = training(budget, table).runs
    if kind not in runs:
        raise ValueError(f"cannot derive training flags from run name {run!r}; expected <kind>-s<seed> with kind in "
                         f"{', '.join(runs)}")
    return runs[kind], seed


def run_flags(run: str, budget: str = "paper", table: str | None = None) -> tuple[list[str], int]:
    """train.py flags (before any budget shortens them) and seed of a run named "<kind>-s<seed>"."""
    recipe, seed = run_recipe(run, budget, table)
    return list(recipe.flags), seed


# train.py flags whose value names something of the same dataset that must exist before the run trains: another
# run ("run", e.g. ProoD's finished classifier) or a mixture fit of gen_gmm.py ("gmm", CCU's).
NEEDS_FLAGS: dict[str, str] = {"--classifier": "run", "--gmm": "gmm"}


def run_needs(run: str, budget: str = "paper", table: str | None = None) -> list[tuple[str, str]]:
    """(what, name) of everything run "<kind>-s<seed>" needs first, read from its flags, so a table never lists
    a run without what trains it (the digits table names prood-s0 but not the oe-s0 it trains beside)."""
    flags, _ = run_flags(run, budget, table)
    return [(NEEDS_FLAGS[flag], value) for flag, value in zip(flags, flags[1:]) if flag in NEEDS_FLAGS]


def training_order(runs: list[str], budget: str = "paper",
                   table: str | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
    """(what, name, needed_by) of the runs and all they need, each once, everything before what needs it: what is
    "run" (train.py) or "gmm" (gen_gmm.py); needed_by names the runs that pulled in a dependency (empty for the
    runs asked for). Runs keep their order otherwise."""
    order: dict[tuple[str, str], list[str]] = {}

    def visit(what: str, name: str, needed_by: tuple[str, ...]) -> None:
        if name in needed_by:
            raise ValueError(f"run {name!r} needs itself: {' -> '.join((*needed_by, name))}; fix RUN_FLAGS")
        if what == "run":
            for dependency in run_needs(name, budget, table):
                visit(*dependency, (*needed_by, name))
        users = order.setdefault((what, name), [])
        if needed_by and needed_by[-1] not in users:
            users.append(needed_by[-1])

    for run in runs:
        visit("run", run, ())
    return [(what, name, tuple(users)) for (what, name), users in order.items()]


def table_runs(table: str) -> list[str]:
    """The run folder names a MODEL_PATHS key's entries name, each once, in table order."""
    dataset, _, _ = table.partition("/")
    return list(dict.fromkeys(run for entry in table_entries(dataset, table) for run in entry.runs))


def table_plan(table: str, budget: str = "paper") -> list[tuple[str, str, tuple[str, ...], RunFlags]]:
    """(what, name, needed_by, flags) of everything a MODEL_PATHS key trains at a budget, dependencies first: what a
    training driver (reproduce.py, scripts/demo.py) makes, unless it is finished, and with which flags."""
    book = training(budget, table)
    return [(what, name, users, book.gmm if what == "gmm" else run_recipe(name, budget, table)[0])
            for what, name, users in training_order(table_runs(table), budget, table)]


def add_run_args(parser, what: str = "study") -> None:
    """The run-selection flags shared by the studies of gen_attack_stats.py."""
    parser.add_argument("--dataset", default=None, help="in-distribution dataset (default: the runs' config)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                        help=f"run folders to {what} (default: every run of model_paths.MODEL_PATHS[dataset])")
    parser.add_argument("--runs-root", default="runs")


def distinct_runs(dataset: str | None, runs_root: str | Path, runs: list[str] | None = None,
                  include_ensembles: bool = True) -> list[tuple[str, Path]]:
    """(label, run folder) once per distinct network: `runs` as given, else every run of the dataset's table.

    Entries that differ only by detector (Base, ODIN, Maha on plain-s0) name one network, labelled by all of
    them ("Base/ODIN/Maha"); the studies of gen_attack_stats.py look at each network once.
    """
    if runs:
        return [(Path(run).name, Path(run)) for run in runs]
    if dataset is None:
        raise ValueError("pass --runs DIR ... or --dataset (to take the runs of model_paths.MODEL_PATHS)")
    labels: dict[Path, list[str]] = {}
    for entry in table_entries(dataset):
        if entry.is_ensemble and not include_ensembles:
            continue
        for run_dir in entry.run_dirs(runs_root, dataset):
            labels.setdefault(run_dir, []).append(entry.label)
    return [("/".join(dict.fromkeys(names)), run_dir) for run_dir, names in labels.items()]
