"""Which trained runs make up each paper table, under which label, scored by which detector.

`MODEL_PATHS[dataset]` is an ordered list of `TableEntry`s; the order is the column order of the tables.
A run is named by its folder under `<runs-root>/<dataset>/` (e.g. "plain-s0"). An entry with several runs is
either an ensemble (detector "ensemble": the runs are its members) or several seeds of one model, whose rows
`evaluate.py --table` aggregates as mean +- standard error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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


# The built-in demo (`make demo`, scripts/demo.py) trains these on scikit-learn's 8x8 digits.
_DEMO = [
    TableEntry("Base", ("plain-s0",)),
    TableEntry("GAN", ("gan-s0",)),
    TableEntry("ODIN", ("plain-s0",), "odin"),
    TableEntry("Maha", ("plain-s0",), "mahalanobis"),
    TableEntry("CEDA", ("ceda-s0",)),
    TableEntry("ACET", ("acet-s0",)),
    TableEntry("DDU", ("ddu-s0",), "ddu"),
    TableEntry("CCU", ("ccu-s0",)),
    TableEntry("ProoD", ("prood-s0",)),
]

# The paper tables (CCU Table 2 columns, plus DDU): train each run with
# `train.py --dataset D --method M --seed S` (run name M-sS); see README "Reproducing the tables".
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

# ACET Table 1 (SPEC 2.5): Plain, CEDA, ACET; ODIN Table 2 (SPEC 3.5): the baseline and ODIN on one network.
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


# How each run kind of the tables is trained: run "<kind>-s<seed>" = `train.py --seed <seed> <flags>`.
# scripts/train_table.py trains every run a dataset's table names (after gen_gmm.py for ccu/ccus).
RUN_FLAGS: dict[str, list[str]] = {
    "plain": ["--method", "plain"],
    # CCU's MC-dropout baseline: VGG-13 (LeNet on MNIST), dropout 0.5 kept active at test time, Adam 2e-4
    "mcd": ["--method", "plain", "--recipe", "mcd"],
    "edl": ["--method", "edl", "--optimizer", "adam", "--lr", "1e-3"],
    "ceda": ["--method", "ceda"],
    "acet": ["--method", "acet"],
    "oe": ["--method", "oe", "--out-data", "natural_patches"],
    "ccu": ["--method", "ccu", "--gmm", "gmm-s0", "--out-data", "natural_patches"],
    "ccus": ["--method", "ccus", "--gmm", "gmm-s0", "--out-data", "uniform"],
    "ddu": ["--method", "plain", "--recipe", "ddu"],
    # classifier, G and D settings per dataset come from model_params.GAN_PARAMS (LeNet on MNIST, else VGG-13)
    "gan": ["--method", "gan"],
    # GOOD_Q on the paper's plain CNN (size L for one-channel data, XL otherwise); ProoD's discriminator trains
    # beside the finished OE run of the same table (trained before it, as the table lists OE first)
    "good80": ["--method", "good", "--good-quantile", "0.8", "--arch", "good_cnn", "--out-data", "natural_patches"],
    "good100": ["--method", "good", "--good-quantile", "1.0", "--arch", "good_cnn", "--out-data", "natural_patches"],
    "prood": ["--method", "prood", "--classifier", "oe-s0", "--out-data", "natural_patches"],
}


def run_flags(run: str) -> tuple[list[str], int]:
    """train.py flags and seed of a run named "<kind>-s<seed>"."""
    kind, _, seed = run.rpartition("-s")
    if kind not in RUN_FLAGS or not seed.isdigit():
        raise ValueError(f"cannot derive training flags from run name {run!r}; expected <kind>-s<seed> with kind in "
                         f"{', '.join(RUN_FLAGS)}")
    return RUN_FLAGS[kind], int(seed)


# train.py flags whose value names something of the same dataset that must exist before the run trains: another
# run ("run", e.g. ProoD's finished classifier) or a mixture fit of gen_gmm.py ("gmm", CCU's).
NEEDS_FLAGS: dict[str, str] = {"--classifier": "run", "--gmm": "gmm"}


def run_needs(run: str) -> list[tuple[str, str]]:
    """(what, name) of everything run "<kind>-s<seed>" needs first, read from its RUN_FLAGS, so a table never lists
    a run without what trains it (the digits table names prood-s0 but not the oe-s0 it trains beside)."""
    flags, _ = run_flags(run)
    return [(NEEDS_FLAGS[flag], value) for flag, value in zip(flags, flags[1:]) if flag in NEEDS_FLAGS]


def training_order(runs: list[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(what, name, needed_by) of the runs and all they need, each once, everything before what needs it: what is
    "run" (train.py) or "gmm" (gen_gmm.py); needed_by names the runs that pulled in a dependency (empty for the
    runs asked for). Runs keep their order otherwise."""
    order: dict[tuple[str, str], list[str]] = {}

    def visit(what: str, name: str, needed_by: tuple[str, ...]) -> None:
        if name in needed_by:
            raise ValueError(f"run {name!r} needs itself: {' -> '.join((*needed_by, name))}; fix RUN_FLAGS")
        if what == "run":
            for dependency in run_needs(name):
                visit(*dependency, (*needed_by, name))
        users = order.setdefault((what, name), [])
        if needed_by and needed_by[-1] not in users:
            users.append(needed_by[-1])

    for run in runs:
        visit("run", run, ())
    return [(what, name, tuple(users)) for (what, name), users in order.items()]


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
