"""Score trained models on the in-distribution test set and its OOD sets; rebuild the paper tables.

    python evaluate.py --dataset digits                 # the runs of model_paths.MODEL_PATHS["digits"]
    python evaluate.py --dataset MNIST --runs runs/MNIST/plain-s0 --detectors msp,energy
    python evaluate.py --dataset digits --table         # results/tables/digits_ood.md from rows alone

Every (model, detector, OOD set) gives one long-format row in results/ood/<DATASET>.jsonl with every metric of
utils/metrics.py; per-sample confidences are cached in results/scores/<DATASET>/ (keyed by the checkpoint's
hash, so a table never recomputes a network). Confidences follow one sign: higher = more in-distribution.
"""
from __future__ import annotations

import argparse
from argparse import Namespace
from pathlib import Path

import torch

import data
from model_paths import TableEntry, table_entries
from utils import evaluation, tables
from utils.detectors import DETECTORS
from utils.metrics import FPR_CONVENTIONS
from utils.runs import resolve_data_root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="in-distribution: a key of data.DATASETS")
    p.add_argument("--runs", nargs="*", default=None, help="run folders (default: model_paths for --dataset)")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--paths", default=None, help="key of model_paths.MODEL_PATHS (default: --dataset), e.g. CIFAR10/ddu")
    p.add_argument("--detectors", default=None,
                   help=f"comma list from {sorted(DETECTORS)}; with --runs the detectors to use (default msp), "
                        "otherwise extra detectors added to every single-model table entry")
    p.add_argument("--ood", default=None, help="comma list of OOD sets (default: data.OOD_TEST[dataset]): data keys "
                                              "or NAME=PATH (an image folder or a .npz of uint8 images)")
    p.add_argument("--adv-sets", default="", help="comma list of attack-made OOD sets, e.g. adv_noise,adv_samples")
    p.add_argument("--n-ood", type=int, default=10000, help="samples per OOD set (at most)")
    p.add_argument("--n-adv", type=int, default=1000, help="test images used to seed each adversarial set")
    p.add_argument("--attack-eps", type=float, default=0.3)
    p.add_argument("--attack-steps", type=int, default=80)
    p.add_argument("--attack-step-size", type=float, default=None)
    p.add_argument("--attack-norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--tune-ood", default=None,
                   help="OOD set on which ODIN/Mahalanobis choose their hyperparameters (ODIN protocol)")
    p.add_argument("--tune-n", type=int, default=1000, help="held-out samples of in- and tuning set")
    p.add_argument("--tune-criterion", default="fpr95", choices=["fpr95", "auroc"])
    p.add_argument("--skip-missing", action=argparse.BooleanOptionalAction, default=False,
                   help="skip OOD sets whose files are missing instead of stopping")
    p.add_argument("--fpr-convention", default="id", choices=sorted(FPR_CONVENTIONS))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="dataset folder (default: $DATA_ROOT or ./datasets)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--results-root", default="results")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    t = p.add_argument_group("tables (--table reads result rows only; no model is loaded)")
    t.add_argument("--table", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--layout", default="ccu", choices=sorted(tables.LAYOUTS))
    t.add_argument("--metrics", default="auroc,fpr95,mmc", help=f"cells of the ccu layout: {tables.CELL_METRICS}")
    t.add_argument("--labels", default=None, help="comma list: only these columns (default: every label in the rows)")
    t.add_argument("--print", dest="print_table", action=argparse.BooleanOptionalAction, default=True)
    return p


def entries_from_args(args: Namespace) -> list[TableEntry]:
    """The table entries to evaluate: --runs (one entry per run and detector) or model_paths, plus --detectors."""
    extra = [d for d in (args.detectors or "").split(",") if d]
    for name in extra:
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    if args.runs:
        detectors = extra or ["msp"]
        return [TableEntry(label=Path(run).name if len(detectors) == 1 else f"{Path(run).name}:{det}",
                           runs=(str(Path(run).resolve()),), detector=det)
                for run in args.runs for det in detectors]
    entries = list(table_entries(args.dataset, args.paths))
    singles = [e for e in entries if not e.is_ensemble]
    return entries + [TableEntry(f"{e.label}:{det}", e.runs, det) for e in singles for det in extra
                      if det != e.detector]


def main(args: Namespace) -> None:
    data.dataset_info(args.dataset)  # unknown names fail before anything runs
    torch.set_flush_denormal(True)  # denormal floats make CPU passes several times slower (see train.py)
    if args.table:
        text = tables.write_tables(args.dataset, args.results_root, args.layout, args.metrics.split(","),
                                   _labels(args))
        if args.print_table:
            print(text)
        return
    args.data_root = resolve_data_root(args.data_root)
    entries = entries_from_args(args)
    ood_sets = args.ood.split(",") if args.ood else list(data.OOD_TEST[args.dataset])
    adv_sets = [name for name in args.adv_sets.split(",") if name]
    for name in ood_sets:  # unknown names and unreadable NAME=PATH files fail before anything is written
        data.check_dataset(name, like=args.dataset, root=args.data_root)
    rows = evaluation.evaluate_entries(entries, args, ood_sets, adv_sets)
    print(f"wrote {len(rows)} rows to {Path(args.results_root) / 'ood' / (args.dataset + '.jsonl')}")
    labels = _labels(args) or list(dict.fromkeys(entry.label for entry in entries))
    text = tables.write_tables(args.dataset, args.results_root, args.layout, args.metrics.split(","), labels)
    if args.print_table:
        print(text)


def _labels(args: Namespace) -> list[str] | None:
    return [label for label in args.labels.split(",") if label] if args.labels else None


if __name__ == "__main__":
    main(get_args_parser().parse_args())
