"""Score trained models on the in-distribution test set and its OOD sets; rebuild the paper tables.

    python evaluate.py --dataset digits                 # the runs of model_paths.MODEL_PATHS["digits"]
    python evaluate.py --dataset MNIST --runs runs/MNIST/plain-s0 --detectors msp,energy
    python evaluate.py --dataset digits --table         # results/tables/digits_ood.md from rows alone
    python evaluate.py --dataset digits --model net.py:build --weights net.pt --detectors msp,mahalanobis

`--model FILE.py:CALLABLE --weights W.pt` scores a network trained elsewhere (docs/byom.md): its rows go to an
ad-hoc table as those of --runs, labelled "<--name>:<detector>" and keyed by the hash of its weights. From
Python, `evaluate.evaluate_model(net, "digits", detectors=["msp"])` returns the same rows.

Every (model, detector, OOD set) gives one long-format row in results/ood/<DATASET>.jsonl with every metric of
utils/metrics.py; per-sample confidences are cached in results/scores/<DATASET>/ (keyed by the checkpoint's
hash and the sets and settings scored; a table is rebuilt from rows and never recomputes a network).
Confidences follow one sign: higher = more in-distribution.
Rows are keyed (utils.store.KEYS["ood"]): evaluating the same thing again replaces its rows.

Before scoring anything it checks that every run folder exists, loads and was trained on --dataset, and that
every OOD set is available; a paper table with untrained runs lists them with the train.py commands that make
them (exit status 2; --skip-missing-runs scores the rest). `--runs DIR ...` is an ad-hoc evaluation: its rows
and tables go to <DATASET>_adhoc_<NAME> (--table-name, default a hash of the run folders), never to the paper
table, and its labels are always "<run folder name>:<detector>" (so two run folders of one name are refused).
Several evaluations may run at once on the same files: none loses another's rows, caches or summaries.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from argparse import Namespace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

import data
from model_paths import TableEntry, table_entries
from utils import byom, cli, evaluation, preflight, tables
from utils.cli import AT_LEAST_ONE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from utils.amp import AMP_DTYPES, check_amp, default_amp, set_attack_amp
from utils.attacks import NORMS, PGD_DEFAULTS
from utils.detectors import DETECTORS
from utils.metrics import FPR_CONVENTIONS
from utils.progress import add_progress_flag
from utils.runs import resolve_data_root
from utils.store import check_results_root

# Allowed values of the numeric flags, checked before anything is loaded (None = unset, allowed).
EVAL_RANGES = {"n_ood": AT_LEAST_ONE, "n_adv": AT_LEAST_ONE, "attack_eps": NON_NEGATIVE,
               "attack_steps": NON_NEGATIVE_INT, "attack_step_size": POSITIVE, "tune_n": AT_LEAST_ONE,
               "batch_size": AT_LEAST_ONE}
MAX_N_OOD = 1_000_000  # noise sets are generated in full: far more would exhaust memory (the papers use 10000)
MAX_SEED = 2**63 - 1   # torch.manual_seed's largest


def check_numbers(args: Namespace) -> None:
    """Every numeric flag in its range, before anything is loaded (as train.py checks its own)."""
    cli.check_ranges(args, EVAL_RANGES)
    if args.n_ood > MAX_N_OOD:
        raise cli.UserError(f"--n-ood must be at most {MAX_N_OOD}, got {args.n_ood}")
    if not 0 <= args.seed <= MAX_SEED:
        raise cli.UserError(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None,
                   help="in-distribution: a key of data.DATASETS (default: the dataset of --runs, else digits)")
    p.add_argument("--runs", nargs="*", default=None,
                   help="run folders for an ad-hoc table, labelled <folder name>:<detector> (default: the paper "
                        "table's runs of model_paths for --dataset)")
    p.add_argument("--table-name", default=None,
                   help="name of the ad-hoc table of --runs: rows results/ood/<DATASET>_adhoc_<NAME>.jsonl "
                        "(default: a hash of the run folders); with --table, rebuilds that table")
    p.add_argument("--skip-missing-runs", action=argparse.BooleanOptionalAction, default=False,
                   help="score the paper table's entries whose runs exist instead of listing the missing ones")
    p.add_argument("--skip-missing-ood", action=argparse.BooleanOptionalAction, default=False,
                   help="skip OOD sets whose files are missing instead of stopping")
    # the old spelling (before --skip-missing-runs existed beside it) still works, with a warning
    cli.add_alias(p, "--skip-missing", "--skip-missing-ood", dest="skip_missing_ood")
    cli.add_alias(p, "--no-skip-missing", "--no-skip-missing-ood", dest="skip_missing_ood")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--paths", default=None, help="key of model_paths.MODEL_PATHS (default: --dataset), e.g. CIFAR10/ddu")
    p.add_argument("--detectors", default=None,
                   help=f"comma list from {sorted(DETECTORS)}; with --runs the detectors to use (default msp), "
                        "otherwise extra detectors added to every single-model table entry")
    p.add_argument("--ood", nargs="+", action=data.DatasetListAction, default=None, metavar="SET",
                   help="OOD sets (default: data.OOD_TEST[dataset]): data keys or NAME=PATH (an image folder or a .npz "
                        f"of uint8 images); {data.SET_LIST_FORMS}")
    p.add_argument("--adv-sets", default="", help="comma list of attack-made OOD sets, e.g. adv_noise,adv_samples")
    p.add_argument("--n-ood", type=int, default=10000, help="samples per OOD set (at most)")
    p.add_argument("--n-adv", type=int, default=1000, help="test images used to seed each adversarial set")
    p.add_argument("--attack-eps", type=float, default=PGD_DEFAULTS.eps)
    p.add_argument("--attack-steps", type=int, default=PGD_DEFAULTS.eval_steps)
    p.add_argument("--attack-step-size", type=float, default=PGD_DEFAULTS.step_size)
    p.add_argument("--attack-norm", default=PGD_DEFAULTS.norm, choices=list(NORMS))
    p.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                   help="precision of the attacks (default: bf16 on CUDA where supported, else off)")
    p.add_argument("--amp-scores", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the scoring passes at --amp (default: float32 logits feed the metrics)")
    p.add_argument("--tune-ood", default=None, type=data.dataset_arg, metavar="SET",
                   help="OOD set on which ODIN/Mahalanobis choose their hyperparameters (ODIN protocol): a data "
                        "key or NAME=PATH")
    p.add_argument("--tune-n", type=int, default=1000, help="held-out samples of in- and tuning set")
    p.add_argument("--tune-criterion", default="fpr95", choices=["fpr95", "auroc"])
    p.add_argument("--fpr-convention", default="id", choices=sorted(FPR_CONVENTIONS))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--results-root", default="results")
    add_progress_flag(p)
    byom.add_model_args(p)
    t = p.add_argument_group("tables (--table reads result rows only; no model is loaded)")
    t.add_argument("--table", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--layout", default="ccu", choices=sorted(tables.LAYOUTS))
    t.add_argument("--metrics", default="auroc,fpr95,mmc", help=f"cells of the ccu layout: {tables.CELL_METRICS}")
    t.add_argument("--labels", default=None, help="comma list: only these columns (default: every label in the rows)")
    t.add_argument("--print", dest="print_table", action=argparse.BooleanOptionalAction, default=True)
    return p


def detector_names(text: str | None) -> list[str]:
    """The DETECTORS keys of a --detectors comma list (empty for none), unknown names refused."""
    names = [name for name in (text or "").split(",") if name]
    for name in names:
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    return names


def entries_from_args(args: Namespace) -> list[TableEntry]:
    """The table entries to evaluate: --runs (one entry per run and detector) or model_paths, plus --detectors."""
    extra = detector_names(args.detectors)
    if args.runs:
        detectors = extra or ["msp"]  # one label rule whatever their number: "<run folder name>:<detector>"
        return [TableEntry(label=f"{Path(run).name}:{det}", runs=(run,), detector=det)
                for run in distinct_runs(args.runs) for det in detectors]
    entries = list(table_entries(args.dataset, args.paths))
    singles = [e for e in entries if not e.is_ensemble]
    return entries + [TableEntry(f"{e.label}:{det}", e.runs, det) for e in singles for det in extra
                      if det != e.detector]


def distinct_runs(runs: list[str]) -> list[str]:
    """The --runs folders, resolved, a folder given twice kept once; two folders with the same name are refused,
    since rows, tables and DDU summaries label a run by its folder name and would merge the two."""
    by_name: dict[str, str] = {}
    for run in runs:
        path = str(Path(run).resolve())
        name = Path(path).name
        if by_name.setdefault(name, path) != path:
            raise cli.UserError(f"--runs: two run folders are named {name!r} ({by_name[name]} and {path}); rows "
                                "are labelled by folder name, so copy or move one to a folder of another name")
    return list(by_name.values())


def ood_set_keys(args: Namespace, adv_sets: list[str]) -> list[str]:
    """The OOD sets to score (--ood, default data.OOD_TEST[dataset]): every NAME once, none taken by an
    attack-made set of --adv-sets; a set that cannot be read fails here, before anything is loaded or written."""
    given = list(args.ood) if args.ood is not None else list(data.OOD_TEST[args.dataset])
    if not given:
        raise cli.UserError("--ood names no set; give data keys or NAME=PATH (comma-separated or repeated)")
    ood_sets = data.unique_sets(given)
    data.unique_sets(ood_sets + ([args.tune_ood] if args.tune_ood else []))  # --tune-ood NAME=PATH vs --ood
    taken = sorted({data.set_name(key) for key in ood_sets} & set(adv_sets))
    if taken:
        raise cli.UserError(f"--ood: the NAME {taken[0]!r} is the name of an attack-made set of --adv-sets; "
                            "give the set another NAME")
    for name in ood_sets + ([args.tune_ood] if args.tune_ood else []):  # unknown names, unreadable NAME=PATH
        data.check_dataset(name, like=args.dataset, root=args.data_root)
    return ood_sets


def rows_name(args: Namespace) -> str:
    """<DATASET> for the paper table; <DATASET>_adhoc_<NAME> for --runs or --model (or --table --table-name
    NAME); NAME defaults to a hash of the run folders, or of the network's name."""
    if not args.runs and not args.table_name and not getattr(args, "model", None):
        return args.dataset
    scored = "\n".join(sorted(distinct_runs(args.runs))) if args.runs else f"model\n{external_name(args)}"
    name = args.table_name or hashlib.sha256(scored.encode()).hexdigest()[:8]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"--table-name {name!r}: use letters, digits, '_', '-' and '.' only")
    return f"{args.dataset}_adhoc_{name}"


def checked_entries(args: Namespace) -> list[TableEntry]:
    """The entries to score, after checking every run they need (exists, loads, trained on --dataset)."""
    entries = entries_from_args(args)
    if not args.runs:
        missing = preflight.missing_runs(entries, args.runs_root, args.dataset)
        if missing and not args.skip_missing_runs:
            raise preflight.MissingRunsError(preflight.missing_runs_message(
                missing, entries, args.dataset, args.runs_root, args.data_root_given, args.paths or args.dataset))
        if missing:
            kept = preflight.drop_missing(entries, missing)
            print(f"skipping {len(entries) - len(kept)} entries whose runs are not trained: {', '.join(missing)}")
            entries = kept
        if not entries:
            raise preflight.MissingRunsError(f"no run of the {args.paths or args.dataset} table is trained under "
                                             f"{Path(args.runs_root) / args.dataset}")
    preflight.check_runs([d for e in entries for d in e.run_dirs(args.runs_root, args.dataset)], args.dataset)
    return entries


def external_name(args: Namespace) -> str:
    return args.name or byom.model_name(args.model)


def external_entries(args: Namespace, name: str) -> list[TableEntry]:
    """One entry per detector (default msp) of a network from elsewhere, labelled "<name>:<detector>"."""
    return [TableEntry(label=f"{name}:{det}", runs=(name,), detector=det)
            for det in detector_names(args.detectors or "msp")]


def prepare_scoring(args: Namespace) -> tuple[list[str], list[str]]:
    """Resolve roots and precision, check the attack-made and OOD sets: (OOD sets, attack-made sets)."""
    args.data_root_given, args.data_root = args.data_root, resolve_data_root(args.data_root)
    args.amp = args.amp or default_amp(args.device)
    check_amp(args.amp, args.device)
    set_attack_amp(args.amp)
    adv_sets = [name for name in args.adv_sets.split(",") if name]
    evaluation.check_adv_sets(adv_sets)
    return ood_set_keys(args, adv_sets), adv_sets


def score_external(external: byom.ExternalNetwork, entries: list[TableEntry], args: Namespace,
                   ood_sets: list[str], adv_sets: list[str]) -> list[dict]:
    """The rows of a network from elsewhere (entries: `external_entries`), written to its ad-hoc table (CLI and
    evaluate_model alike)."""
    return evaluation.evaluate_network(external.network, external.name, external.checkpoint, entries, args,
                                       ood_sets, adv_sets)


def evaluate_model(model: nn.Module, dataset: str, ood: Optional[Sequence[str]] = None,
                   detectors: Sequence[str] = ("msp",), adv_sets: Sequence[str] = (), name: str = "model",
                   features_layer: Optional[str] = None, normalize: Optional[str] = None, **flags) -> list[dict]:
    """Score `model` (any nn.Module mapping [0, 1] pixels of `dataset` to logits) as
    `evaluate.py --model ... --name NAME` does, and return the same rows (also written to the results store).

    ood: OOD set keys or NAME=PATH (default data.OOD_TEST[dataset]); detectors: keys of
    utils.detectors.DETECTORS; adv_sets: attack-made sets (adv_noise, adv_samples); features_layer: the module
    of named_modules() whose output are the features (default the input of the last nn.Linear); normalize: a key
    of model_params.NORMALIZATIONS put in front. Any other flag of evaluate.py by its name, e.g.
    `results_root="results"`, `n_ood=1000`, `device="cpu"`, `tune_ood="uniform"`.
    """
    args = get_args_parser().parse_args(["--dataset", dataset])
    unknown = sorted(set(flags) - set(vars(args)))
    if unknown:
        raise TypeError(f"evaluate_model: unknown flag(s) {unknown}; valid: {', '.join(sorted(vars(args)))}")
    vars(args).update(flags, ood=None if ood is None else list(ood), detectors=",".join(detectors),
                      adv_sets=",".join(adv_sets), name=name, model=f"<python>:{name}", print_table=False)
    check_numbers(args)
    check_results_root(args.results_root)
    data.dataset_info(dataset)
    args.rows_name = rows_name(args)
    entries = external_entries(args, name)
    ood_sets, adv = prepare_scoring(args)
    external = byom.external_network(model, name, dataset, args.device, features_layer, normalize,
                                     f"evaluate_model({name!r})")
    return score_external(external, entries, args, ood_sets, adv)


def main(args: Namespace) -> None:
    check_numbers(args)  # before any model or set is loaded
    check_results_root(args.results_root)
    byom.check_model_flags(args)
    if args.model and args.runs:
        raise cli.UserError("--model and --runs: score a network from elsewhere and run folders in two calls")
    if args.dataset is None:
        args.dataset = preflight.runs_dataset(args.runs) if args.runs else "digits"
    data.dataset_info(args.dataset)  # unknown names fail before anything runs
    torch.set_flush_denormal(True)  # denormal floats make CPU passes several times slower (see train.py)
    args.rows_name = rows_name(args)
    if args.table:
        text = tables.write_tables(args.dataset, args.results_root, args.layout, args.metrics.split(","),
                                   _labels(args), name=args.rows_name)
        if args.print_table:
            print(text)
        return
    ood_sets, adv_sets = prepare_scoring(args)
    if args.model:
        entries = external_entries(args, external_name(args))  # unknown detectors fail before the network loads
        external = byom.load_external(args, args.dataset, args.device)
        rows = score_external(external, entries, args, ood_sets, adv_sets)
    else:
        entries = checked_entries(args)
        rows = evaluation.evaluate_entries(entries, args, ood_sets, adv_sets)
    print(f"wrote {len(rows)} rows to {evaluation.rows_path(args)}")
    labels = _labels(args) or list(dict.fromkeys(entry.label for entry in entries))
    text = tables.write_tables(args.dataset, args.results_root, args.layout, args.metrics.split(","), labels,
                               name=args.rows_name)
    if args.print_table:
        print(text)


def _labels(args: Namespace) -> list[str] | None:
    return [label for label in args.labels.split(",") if label] if args.labels else None


if __name__ == "__main__":
    cli.run(main, get_args_parser())
