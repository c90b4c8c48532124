"""Paper tables rebuilt from result rows alone (no model is loaded).

Layouts:
  ccu   CCU Table 2 / ACET Table 1: rows = "orig" (in-distribution MMC) + OOD sets, columns = model labels,
        cells = the chosen metrics joined by "/", test error in the header.
  odin  ODIN Table 2: rows = (OOD set, metric) for FPR@95, detection error, AUROC, AUPR-In, AUPR-Out,
        columns = model labels (e.g. Base vs ODIN).
  ddu   DDU's README table (docs/methods.md#ddu-table): per OOD set, one line per model with its aleatoric and
        epistemic score, accuracy, ECE and AUROC, without and with temperature scaling (utils.ddu_summary.ddu_table).
Rows of several runs under one label (seeds) are shown as mean +- standard error (unbiased std / sqrt(n)).
All numbers are percentages.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from utils.metrics import FPR_CONVENTIONS
from utils.runs import atomic_write_text, read_jsonl
from utils.store import locked

CELL_METRICS = ("auroc", "fpr95", "mmc", "aupr_in", "aupr_out", "detection_error")
METRIC_NAMES = {"auroc": "AUROC", "fpr95": "FPR@95", "mmc": "MMC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out",
                "detection_error": "Det. err"}


def newest_rows(rows: Iterable[dict], key: Callable[[dict], tuple]) -> dict[tuple, dict]:
    """key -> the newest row (by "date"; a later row wins a tie) of the rows with that key, in first-seen order."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        k = key(row)
        if k not in newest or row.get("date", "") >= newest[k].get("date", ""):
            newest[k] = row
    return newest


def latest_rows(rows: list[dict]) -> list[dict]:
    """Keep the newest row of each (label, run, detector, ood): re-running an evaluation replaces its rows."""
    return list(newest_rows(rows, lambda row: (row["label"], row["run"], row["detector"], row["ood"])).values())


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def fmt(values: list[float], digits: int = 1) -> str:
    mean, se = mean_se([100 * v for v in values])
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f}±{se:.{digits}f}"


def _grouped(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    labels, oods, cells = [], [], defaultdict(list)
    for row in rows:
        if row["label"] not in labels:
            labels.append(row["label"])
        if row["ood"] not in oods:
            oods.append(row["ood"])
        cells[(row["label"], row["ood"])].append(row)
    return labels, oods, cells


def _per_run(rows: list[dict], key: str) -> list[float]:
    """One value per run (in-distribution statistics repeat on every OOD row of a run)."""
    return list({row["run"]: row[key] for row in rows}.values())


def ccu_layout(rows: list[dict], cell_metrics: list[str]) -> list[list[str]]:
    labels, oods, cells = _grouped(rows)
    by_label = {label: [r for r in rows if r["label"] == label] for label in labels}
    header = ["OOD set"] + [f"{label} (TE {fmt(_per_run(by_label[label], 'test_error'), 2)}%)" for label in labels]
    grid = [header, ["orig (MMC)"] + [fmt(_per_run(by_label[label], "mmc_in")) for label in labels]]
    for ood in oods:
        grid.append([ood] + ["/".join(fmt([r[m] for r in cells[(label, ood)]]) for m in cell_metrics)
                             if cells[(label, ood)] else "–" for label in labels])
    return grid


def odin_layout(rows: list[dict], cell_metrics: list[str]) -> list[list[str]]:
    labels, oods, cells = _grouped(rows)
    grid = [["OOD set", "Metric"] + labels]
    for ood in oods:
        for metric in ("fpr95", "detection_error", "auroc", "aupr_in", "aupr_out"):
            grid.append([ood, METRIC_NAMES[metric]] + [fmt([r[metric] for r in cells[(label, ood)]])
                                                       if cells[(label, ood)] else "–" for label in labels])
    return grid


LAYOUTS: dict[str, Callable[[list[dict], list[str]], list[list[str]]] | None] = {
    "ccu": ccu_layout, "odin": odin_layout, "ddu": None}  # ddu: rendered by utils.ddu_summary.ddu_table


def markdown(grid: list[list[str]]) -> str:
    lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in grid[1:]]) + "\n"


def latex(grid: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("%", r"\%").replace("±", r"$\pm$").replace("_", r"\_").replace("&", r"\&")
    body = [" & ".join(esc(c) for c in row) + r" \\" for row in grid]
    return ("\\begin{tabular}{l" + "c" * (len(grid[0]) - 1) + "}\n\\toprule\n" + body[0] + "\n\\midrule\n"
            + "\n".join(body[1:]) + "\n\\bottomrule\n\\end{tabular}\n")


def write_tables(dataset: str, results_root: str | Path, layout: str, cell_metrics: list[str],
                 labels: list[str] | None = None, name: str | None = None) -> str:
    """Render results/ood/<name>.jsonl as Markdown and LaTeX results/tables/<name>_<layout>.*; returns the
    Markdown. `name` defaults to the dataset (the paper table); ad-hoc tables are "<dataset>_adhoc_<name>".

    `labels` keeps only those columns, in that order (default: every label, in order of appearance).
    """
    name = name or dataset
    unknown = [m for m in cell_metrics if m not in CELL_METRICS]
    if unknown:
        raise ValueError(f"unknown table metric(s) {unknown}; valid: {', '.join(CELL_METRICS)}")
    rows_path = Path(results_root) / "ood" / f"{name}.jsonl"
    if not rows_path.parent.is_dir():
        return _write_tables(dataset, results_root, layout, cell_metrics, labels, name, [])
    # under the store's lock, so that of two evaluations finishing together the later table shows both
    with locked(rows_path):
        return _write_tables(dataset, results_root, layout, cell_metrics, labels, name, read_jsonl(rows_path))


def _write_tables(dataset: str, results_root: str | Path, layout: str, cell_metrics: list[str],
                  labels: list[str] | None, name: str, all_rows: list[dict]) -> str:
    rows_path = Path(results_root) / "ood" / f"{name}.jsonl"
    rows = latest_rows(all_rows)
    known = list(dict.fromkeys(row["label"] for row in rows))
    unknown = [label for label in labels or [] if label not in known]
    if unknown and known:
        raise ValueError(f"unknown label(s) {', '.join(map(repr, unknown))} in {rows_path}; known: "
                         f"{', '.join(known)}")
    if labels:
        rows = sorted((r for r in rows if r["label"] in labels), key=lambda r: labels.index(r["label"]))
    if not rows:
        raise FileNotFoundError(f"no result rows in {rows_path}; run `python evaluate.py --dataset {dataset}"
                                + (" --runs ...` first" if name != dataset else "` first"))
    out = Path(results_root) / "tables"
    if layout == "ddu":  # docs/methods.md#ddu-table: accuracy, ECE, AUROC with/without temperature, per OOD set
        from utils.ddu_summary import ddu_table  # noqa: PLC0415
        text = ddu_table(rows)
        atomic_write_text(out / f"{name}_ddu.md", text)
        return text
    grid = LAYOUTS[layout](rows, cell_metrics)
    conventions = sorted({row["fpr_convention"] for row in rows})
    what = "/".join(METRIC_NAMES[m] for m in cell_metrics) if layout == "ccu" else "metrics"
    note = (f"{dataset}: {what} in %, TE = test error; FPR@95 convention: "
            + "; ".join(f"{c} = {FPR_CONVENTIONS[c]}" for c in conventions) + "\n\n")
    text = note + markdown(grid)
    suffix = "ood" if layout == "ccu" else layout
    atomic_write_text(out / f"{name}_{suffix}.md", text)
    atomic_write_text(out / f"{name}_{suffix}.tex", latex(grid))
    return text
