"""DDU-style aggregation over runs (arXiv 2102.11582, docs/methods.md#ddu-table): mean and standard error over the runs
of one method (seeds s..s+4 in the paper), the per-method JSON summary, and the README table.

Result rows (`results/ddu/<DATASET>.jsonl`, one row per run and OOD set, written by `evaluate.py --layout ddu`):

    dataset, label, run, seed, ood       which model (label = the table's "Method"), which OOD test set
    aleatoric, epistemic                 names of the two scores (e.g. "softmax entropy", "GMM density")
    accuracy, ece                        test-set accuracy and 15-bin ECE of softmax(logits), fractions in [0, 1]
    temperature, t_accuracy, t_ece       the same after temperature scaling (utils.calibration)
    auroc, t_auroc                       AUROC of the epistemic score (in-distribution positive), without / with
                                         temperature scaling; scores that ignore the logits (GMM density) copy it
    optional: aupr_in, aupr_out, fpr95 and their t_ versions, carried into the summary when every row has them

`make_row` builds such a row; `classification_metrics` gives its accuracy/ECE block from logits and
`score_names(detector, options)` its aleatoric/epistemic names.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from utils.metrics import accuracy, ece
from utils.runs import write_json

CLASSIFICATION_KEYS = ("accuracy", "ece", "t_accuracy", "t_ece")
OOD_KEYS = ("auroc", "t_auroc")
OPTIONAL_OOD_KEYS = ("aupr_in", "aupr_out", "fpr95", "t_aupr_in", "t_aupr_out", "t_fpr95")
ROW_KEYS = ("dataset", "label", "run", "seed", "ood", "aleatoric", "epistemic", "temperature",
            *CLASSIFICATION_KEYS, *OOD_KEYS)
STD_NOTE = "std is the standard error: unbiased standard deviation / sqrt(n) (None for one run)"


# (detector, score option) -> (aleatoric, epistemic) names of DDU's table; the aleatoric score of every
# single-network row is the network's softmax entropy, the ensemble's its predictive entropy
SCORE_NAMES: dict[tuple[str, str | None], tuple[str, str]] = {
    ("ddu", "density"): ("softmax entropy", "GMM density"),
    ("ddu", "gmm_entropy"): ("softmax entropy", "GMM entropy"),
    ("ddu", "softmax_entropy"): ("softmax entropy", "softmax entropy"),
    ("entropy", None): ("softmax entropy", "softmax entropy"),
    ("energy", None): ("softmax entropy", "softmax density (logsumexp)"),
    ("msp", None): ("softmax entropy", "max softmax"),
    ("ensemble", "entropy"): ("predictive entropy", "predictive entropy"),
    ("ensemble", "mutual_info"): ("predictive entropy", "mutual information"),
}


def score_names(detector: str, options: dict | None = None) -> tuple[str, str]:
    """(aleatoric, epistemic) names for a table entry's detector and options; unknown ones use their key."""
    options = options or {}
    default_score = "density" if detector == "ddu" else None
    key = (detector, options.get("score", default_score))
    return SCORE_NAMES.get(key, SCORE_NAMES.get((detector, None), ("softmax entropy", str(key[1] or detector))))


def summarize(values: list[float]) -> dict:
    """mean, std (= standard error, unbiased std / sqrt(n); None when n < 2), values, n; as DDU reports."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = sum(values) / n
    std = None if n < 2 else math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return {"mean": mean, "std": std, "values": values, "n": n}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """accuracy, ece, t_accuracy, t_ece and temperature of test logits (docs/methods.md#temperature-scaling; temperature
    from validation)."""
    logits = torch.as_tensor(logits).double()
    probs, t_probs = logits.softmax(dim=1), (logits / temperature).softmax(dim=1)
    return {"accuracy": accuracy(probs, labels), "ece": ece(probs, labels), "t_accuracy": accuracy(t_probs, labels),
            "t_ece": ece(t_probs, labels), "temperature": float(temperature)}


def make_row(dataset: str, label: str, run: str, seed: int | None, ood: str, aleatoric: str, epistemic: str,
             classification: dict[str, float], auroc: float, t_auroc: float, **extra: float) -> dict:
    """One result row with the fields of the module docstring; `extra` adds optional metrics (aupr_in, ...)."""
    row = {"dataset": dataset, "label": label, "run": run, "seed": seed, "ood": ood, "aleatoric": aleatoric,
           "epistemic": epistemic, "auroc": float(auroc), "t_auroc": float(t_auroc)}
    row.update({key: classification[key] for key in (*CLASSIFICATION_KEYS, "temperature")})
    row.update({key: float(value) for key, value in extra.items()})
    return row


def _check(rows: list[dict]) -> None:
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"DDU result row of run {row.get('run')!r} lacks {missing}")


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows grouped by `keys`, in order of first appearance (dicts keep insertion order)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in keys)].append(row)
    return groups


def _per_run(rows: list[dict], key: str) -> list[float]:
    """One value per run: accuracy and ECE repeat on every OOD row of a run, so count each run once."""
    return [group[0][key] for group in _group(rows, ("run",)).values()]


def _names(rows: list[dict], key: str) -> str:
    return " / ".join(dict.fromkeys(str(row[key]) for row in rows))


def summary(rows: list[dict]) -> dict:
    """The JSON summary of one method on one dataset: keys accuracy, ece, t_accuracy, t_ece (each a
    `summarize` dict), auroc and t_auroc ({ood: summarize dict + "score": epistemic score name}), info."""
    _check(rows)
    result = {key: summarize(_per_run(rows, key)) for key in CLASSIFICATION_KEYS}
    optional = [key for key in OPTIONAL_OOD_KEYS if all(key in row for row in rows)]
    for key in (*OOD_KEYS, *optional):
        result[key] = {ood: {"score": _names(group, "epistemic"), **summarize([row[key] for row in group])}
                       for (ood,), group in _group(rows, ("ood",)).items()}
    first_rows = [group[0] for group in _group(rows, ("run",)).values()]
    result["info"] = {"dataset": _names(rows, "dataset"), "label": _names(rows, "label"),
                      "aleatoric": _names(rows, "aleatoric"), "epistemic": _names(rows, "epistemic"),
                      "runs": [row["run"] for row in first_rows], "seeds": [row["seed"] for row in first_rows],
                      "temperatures": [row["temperature"] for row in first_rows],
                      "units": "fractions in [0, 1] (tables show x100)", "std": STD_NOTE}
    return result


def summary_path(out_dir: str | Path, dataset: str, label: str) -> Path:
    """results/ddu/<DATASET>_<label>.json, with characters unsafe in file names replaced by '_'."""
    return Path(out_dir) / f"{dataset}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}.json"


def write_summaries(rows: list[dict], out_dir: str | Path = "results/ddu") -> list[Path]:
    """Write one JSON summary per (dataset, label) of the rows; returns the paths written."""
    _check(rows)
    paths = []
    for (dataset, label), group in _group(rows, ("dataset", "label")).items():
        path = summary_path(out_dir, dataset, label)
        write_json(path, summary(group))
        paths.append(path)
    return paths


def _cell(values: list[float]) -> str:
    stats = summarize([100.0 * v for v in values])
    return f"{stats['mean']:.2f}" if stats["std"] is None else f"{stats['mean']:.2f}±{stats['std']:.2f}"


def ddu_table(rows: list[dict]) -> str:
    """DDU's table from result rows alone: one Markdown table per (dataset, OOD set), one line per method
    (label), mean ± standard error over its runs, all x100, without and with temperature scaling (T-)."""
    _check(rows)
    header = ("| Method | Aleatoric | Epistemic | Accuracy | ECE | AUROC | T-Accuracy | T-ECE | T-AUROC |\n"
              "|---|---|---|---|---|---|---|---|---|")
    sections = []
    for (dataset, ood), group in _group(rows, ("dataset", "ood")).items():
        lines = [f"### {dataset} vs {ood}", "", header]
        for (label,), method_rows in _group(group, ("label",)).items():
            cells = [_cell(_per_run(method_rows, key)) for key in ("accuracy", "ece")]
            cells.append(_cell([row["auroc"] for row in method_rows]))
            cells += [_cell(_per_run(method_rows, key)) for key in ("t_accuracy", "t_ece")]
            cells.append(_cell([row["t_auroc"] for row in method_rows]))
            lines.append(f"| {label} | {_names(method_rows, 'aleatoric')} | {_names(method_rows, 'epistemic')} | "
                         + " | ".join(cells) + " |")
        n_runs = ", ".join(f"{label}: {len(_group(r, ('run',)))}" for (label,), r in _group(group, ("label",)).items())
        lines += ["", f"Mean ± standard error over runs ({n_runs}); accuracy, ECE (15 bins) and AUROC x100."]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"
