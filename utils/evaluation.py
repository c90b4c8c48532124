"""Evaluation of table entries: load each run once, score every set once, write rows and cached scores."""
from __future__ import annotations

import hashlib
import io
import json
from argparse import Namespace
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import data
from model_paths import TableEntry
from utils import methods, metrics
from utils.cli import UserError
from utils.detectors import fitted_detector, get_detector_class
from utils.detectors.bayes import as_one_network  # the network itself, or an ensemble's averaged probabilities
from utils.runs import file_hash, git_sha, now, write_atomically
from utils.store import KEYS, locked, read_rows, upsert_rows
from utils.calibration import collect_logits, fit_temperature
from utils.ddu_summary import ROW_KEYS, classification_metrics, score_names, write_summaries
from utils.scoring import SetScores, score_dataset
from utils.tables import latest_rows


def build_detector(entry: TableEntry, loaded: list, train_set: Dataset, tune_sets: dict, args: Namespace):
    """The entry's detector, fitted on the (un-augmented) training set when it has something to fit, and tuned
    on held-out data when it can be (ODIN, Mahalanobis). Returns (detector, options as recorded in rows).

    Tuning follows ODIN's protocol: the first --tune-n test images and the first --tune-n images of the tuning
    OOD set (`--tune-ood`, or the entry's option "tune_ood") choose the hyperparameters, and are left out of
    every evaluation set of this call.
    """
    options = dict(entry.options)
    tune_ood = options.pop("tune_ood", args.tune_ood if get_detector_class(entry.detector).tunable else None)
    criterion = options.pop("tune_criterion", args.tune_criterion)
    detector = fitted_detector(entry.detector, loaded, options, lambda: train_set, args.batch_size)
    recorded = dict(entry.options)
    if tune_ood and hasattr(detector, "tune"):
        name = data.set_name(tune_ood)  # sets are keyed by the name tables show (NAME of NAME=PATH)
        if name not in tune_sets:
            raise ValueError(f"tuning set {tune_ood!r} is not loaded; add it to --ood or --tune-ood")
        choice = detector.tune(DataLoader(tune_sets["in"], batch_size=args.batch_size),
                               DataLoader(tune_sets[name], batch_size=args.batch_size), criterion=criterion,
                               fpr_convention=args.fpr_convention)
        recorded.update(tune_ood=name, tuned=choice)
        print(f"{entry.label}: tuned on {name}: {choice}")
    return detector, recorded


def split_for_tuning(sets: dict[str, Dataset], n: int) -> tuple[dict, dict]:
    """(evaluation sets without their first n samples, tuning sets of those first n samples)."""
    evaluation, tuning = {}, {}
    for name, dataset in sets.items():
        if len(dataset) <= 2 * n:
            raise ValueError(f"--tune-n {n} leaves too few samples of {name} ({len(dataset)}) for evaluation")
        tuning[name] = Subset(dataset, range(n))
        evaluation[name] = Subset(dataset, range(n, len(dataset)))
    return evaluation, tuning


def load_sets(args: Namespace, ood_sets: list[str]) -> dict[str, Dataset]:
    """The in-distribution test set (key "in") and every available OOD set, at most --n-ood samples each."""
    sets = {"in": data.get_dataset(args.dataset, "test", root=args.data_root, download=args.download)}
    for name in ood_sets:
        try:
            sets[data.set_name(name)] = data.get_dataset(name, "test", root=args.data_root, like=args.dataset, n=args.n_ood,
                                          seed=args.seed, download=args.download)
        except FileNotFoundError as error:
            if not args.skip_missing_ood:
                raise
            print(f"skipping OOD set {name}: {error}")
    return sets


def check_adv_sets(adv_sets: list[str]) -> None:
    """Unknown names of attack-made sets fail with the valid ones listed."""
    if not adv_sets:
        return
    from utils.attacks import ADV_SETS  # noqa: PLC0415 (optional piece, imported only when asked for)
    unknown = [name for name in adv_sets if name not in ADV_SETS]
    if unknown:
        raise ValueError(f"unknown adversarial set(s) {unknown}; valid: {', '.join(ADV_SETS)}")


def adversarial_sets(model, sets: dict[str, Dataset], adv_sets: list[str], args: Namespace) -> dict[str, Dataset]:
    """Attack-made OOD sets (ACET paper: adversarial noise, adversarial samples), seeded by test images."""
    if not adv_sets:
        return {}
    check_adv_sets(adv_sets)
    from utils.attacks import ADV_SETS  # noqa: PLC0415 (optional piece, imported only when asked for)
    x_in, y_in = next(iter(DataLoader(sets["in"], batch_size=args.n_adv)))
    device = next(model.parameters()).device
    x_in, y_in = x_in.to(device), y_in.to(device)
    made = {}
    for name in adv_sets:
        adv = ADV_SETS[name](model, x_in, y_in, args)
        x_adv = adv.x if adv.keep is None else adv.x[adv.keep]  # adv_samples: only the non-resisted ones
        if len(x_adv) == 0:
            print(f"{name}: the model resisted every attack, so the set is empty and gets no row")
            continue
        made[name] = TensorDataset(x_adv.detach().cpu(), torch.full((len(x_adv),), -1))
    return made


def run_train_split(config: dict, dataset: str, root: str | None) -> Dataset:
    """The run's own training split of `dataset`, without the validation part its config held out."""
    fraction, seed = float(config.get("val_fraction") or 0.0), int(config.get("seed", 0))
    return data.get_dataset(dataset, "train", root=root, val_fraction=fraction, seed=seed)


def run_splits(config: dict, args: Namespace) -> tuple[Dataset, Dataset | None]:
    """The run's own training split (without its held-out validation part) and that validation split."""
    train = run_train_split(config, args.dataset, args.data_root)
    fraction = float(config.get("val_fraction") or 0.0)
    val = data.get_dataset(args.dataset, "val", root=args.data_root, val_fraction=fraction,
                           seed=int(config.get("seed", 0))) if fraction > 0 else None
    return train, val


def fit_run_temperature(model, val_set: Dataset | None, args: Namespace) -> float | None:
    """Temperature scaling on the run's validation split (docs/methods.md#temperature-scaling); None for runs trained
    without one."""
    if val_set is None:
        return None
    logits, labels = collect_logits(model, DataLoader(val_set, batch_size=args.batch_size), torch.device(args.device))
    return fit_temperature(logits, labels)


def row_settings(options: dict, ood: str, tuning: bool, args: Namespace) -> dict:
    """What besides run, detector and OOD set changes a row's numbers (part of its key, see utils.store.KEYS):
    the detector options as given (a tuned choice is a result), the OOD sample size and seed, the FPR
    convention, the held-out tuning size, and the attack settings of an attack-made set."""
    settings = {"detector_options": {k: v for k, v in options.items() if k != "tuned"}, "n_ood": args.n_ood,
                "ood_seed": args.seed, "fpr_convention": args.fpr_convention, "tune_n": args.tune_n if tuning else None}
    if "tuned" in options and isinstance(options["tuned"], dict):
        settings["tune_criterion"] = options["tuned"].get("criterion")
    if ood in [name for name in args.adv_sets.split(",") if name]:
        settings["attack"] = {"n_adv": args.n_adv, "eps": args.attack_eps, "steps": args.attack_steps,
                              "step_size": args.attack_step_size, "norm": args.attack_norm}
    return settings


def member_temperatures(members: list, args: Namespace) -> list[float] | None:
    """Each ensemble member tempered on its own validation split (DDU, docs/methods.md#temperature-scaling); None unless all have one."""
    temperatures = [fit_run_temperature(member, run_splits(getattr(member, "run_config", {}), args)[1], args)
                    for member in members]
    return None if any(t is None for t in temperatures) else temperatures


def _ensemble_classification(test: SetScores) -> dict:
    """accuracy, ECE and their tempered versions from an ensemble's (per-member tempered) mean probabilities."""
    tempered = test.probs if test.tempered_probs is None else test.tempered_probs
    return {"accuracy": metrics.accuracy(test.probs, test.labels), "ece": metrics.ece(test.probs, test.labels),
            "t_accuracy": metrics.accuracy(tempered, test.labels), "t_ece": metrics.ece(tempered, test.labels),
            "t_nll": metrics.nll(tempered, test.labels)}


def set_rows(entry: TableEntry, run: str, checkpoint: str, scores: dict[str, SetScores], key: str,
             options: dict, temperature: float | None, seed: int | None, args: Namespace) -> list[dict]:
    """One row per OOD set with every metric; in-distribution statistics repeated on each row.

    Temperature-scaled statistics (t_*) use the run's validation temperature (an ensemble: one per member, each
    on its own validation split); without one they equal the untempered ones and `temperature` is null.
    """
    test = scores["in"]
    conf_in = test.confidences[key]
    aleatoric, epistemic = score_names(entry.detector, entry.options)
    base = {"dataset": args.dataset, "label": entry.label, "run": run, "seed": seed, "checkpoint": checkpoint,
            "detector": entry.detector, "options": options, "n_in": len(conf_in), "aleatoric": aleatoric,
            "epistemic": epistemic, "fpr_convention": args.fpr_convention, "git_sha": git_sha(), "date": now(),
            "nll": metrics.nll(test.probs, test.labels), "mmc_in": metrics.mmc(test.probs),
            **getattr(args, "row_tags", {})}  # e.g. reproduce.py's budget
    if test.logits is not None:
        base.update(classification_metrics(test.logits, test.labels, temperature or 1.0))
        base["t_nll"] = metrics.nll((test.logits / (temperature or 1.0)).softmax(dim=1), test.labels)
    else:
        base.update(_ensemble_classification(test))
    base.update(temperature=temperature, test_error=1.0 - base["accuracy"])
    rows = []
    for name, set_scores in scores.items():
        if name == "in":
            continue
        conf_out = set_scores.confidences[key]
        row = {**base, "ood": name, "n_out": len(conf_out), "mmc": metrics.mmc(set_scores.probs),
               "settings": row_settings(options, name, bool(getattr(args, "tuning", False)), args),
               **metrics.ood_metrics(conf_in, conf_out, args.fpr_convention)}
        tempered = key in test.tempered
        row["t_auroc"] = metrics.auroc(test.tempered[key], set_scores.tempered[key]) if tempered else row["auroc"]
        rows.append(row)
    return rows


def cache_scores(path: Path, scores: dict[str, SetScores], key: str) -> None:
    """Write the per-sample confidences (and max-probabilities) of every set to the .npz `path` atomically.

    The temporary file has a name of its own (utils.runs.write_atomically), so evaluations of the same run in
    several processes never rename each other's file; a full disk raises DiskFullError naming `path` and
    leaves no temporary file behind."""
    arrays = {name: s.confidences[key].numpy() for name, s in scores.items()}
    arrays.update({f"{name}__maxprob": s.probs.max(dim=1).values.numpy() for name, s in scores.items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_atomically(path, buffer.getvalue(), what="score cache")


def cache_path(run_name: str, entry: TableEntry, checkpoint: str, scores: dict, options: dict,
               args: Namespace) -> Path:
    """results/scores/<DATASET>/<run>__<label>__<detector>__<checkpoint>__<sets>.npz. <sets> hashes the sets
    scored and the settings that change their numbers, so one file always holds one content: evaluations with
    other OOD sets or sample sizes get files of their own instead of replacing each other's."""
    attack = [getattr(args, name, None) for name in ("adv_sets", "n_adv", "attack_eps", "attack_steps",
                                                     "attack_step_size", "attack_norm")]
    what = {"sets": sorted(scores), "attack": attack,
            "settings": row_settings(options, "", bool(getattr(args, "tuning", False)), args)}
    tag = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
    safe = f"{run_name}__{entry.label}__{entry.detector}__{checkpoint}__{tag}".replace("/", "_").replace(" ", "_")
    return Path(args.results_root) / "scores" / args.dataset / f"{safe}.npz"


def group_by_runs(entries: list[TableEntry], args: Namespace) -> dict[tuple, list[TableEntry]]:
    """Entries keyed by the run folders they need: an ensemble needs all of its runs at once, seeds one each."""
    by_runs: dict[tuple, list[TableEntry]] = defaultdict(list)
    for entry in entries:
        runs = tuple(str(p) for p in entry.run_dirs(args.runs_root, args.dataset))
        for group in ([runs] if entry.is_ensemble else [(run,) for run in runs]):
            by_runs[group].append(entry)
    return by_runs


def evaluate_group(runs: tuple, group_entries: list[TableEntry], sets: dict, tune_sets: dict, adv_sets: list[str],
                   args: Namespace) -> list[dict]:
    """Load the runs once, build every detector of the entries, score every set once, return the rows."""
    device = torch.device(args.device)
    # the group's random draws (MC-dropout masks, attack starts) follow --seed alone, not whatever ran before in
    # this process: a re-run, or reproduce.py after training in the same process, scores the same numbers
    torch.manual_seed(args.seed)
    loaded = [methods.load_run(run, device=device) for run in runs]
    checkpoint = "+".join(file_hash(Path(run) / "model.pt") for run in runs)
    run_name = "+".join(Path(run).name for run in runs)
    return score_networks(loaded, run_name, checkpoint, group_entries, sets, tune_sets, adv_sets, args,
                          desc=Path(runs[0]).name)


def score_networks(loaded: list, run_name: str, checkpoint: str, group_entries: list[TableEntry], sets: dict,
                   tune_sets: dict, adv_sets: list[str], args: Namespace, desc: str | None = None) -> list[dict]:
    """Build every detector of the entries on the loaded network(s), score every set once, return the rows
    (run folders and networks from elsewhere alike; `checkpoint` keys the rows)."""
    device = torch.device(args.device)
    config = getattr(loaded[0], "run_config", {})
    train_set, val_set = run_splits(config, args)
    built = {f"{e.label}|{e.detector}": build_detector(e, loaded, train_set, tune_sets, args) for e in group_entries}
    detectors = {key: detector for key, (detector, _) in built.items()}
    model = None if len(loaded) > 1 else loaded[0]
    if model is not None:
        temperature = fit_run_temperature(model, val_set, args)
        temperatures = {key: temperature for key, det in detectors.items() if temperature and not det.needs_grad}
    else:
        temperature = member_temperatures(loaded, args)
        temperatures = {key: temperature for key in detectors} if temperature else {}
    all_sets = {**sets, **adversarial_sets(as_one_network(loaded), sets, adv_sets, args)}
    scores = {name: score_dataset(model, detectors, dataset, args.batch_size, device, progress=args.progress,
                                  amp=getattr(args, "amp", "off") if getattr(args, "amp_scores", False) else "off",
                                  desc=f"{desc or run_name} {name}", temperatures=temperatures)
              for name, dataset in all_sets.items()}
    rows = []
    for entry in group_entries:
        key = f"{entry.label}|{entry.detector}"
        rows += set_rows(entry, run_name, checkpoint, scores, key, built[key][1], temperature,
                         config.get("seed"), args)
        cache_scores(cache_path(run_name, entry, checkpoint, scores, built[key][1], args), scores, key)
    return rows


def rows_path(args: Namespace) -> Path:
    """results/ood/<name>.jsonl: <DATASET> for the paper tables, <DATASET>_adhoc_<name> for `--runs`."""
    return Path(args.results_root) / "ood" / f"{getattr(args, 'rows_name', None) or args.dataset}.jsonl"


def evaluate_entries(entries: list[TableEntry], args: Namespace, ood_sets: list[str], adv_sets: list[str]) -> list[dict]:
    """Evaluate every entry; entries that share a run share its forward passes. The rows of each group of runs
    are written to the store (utils.store, key KEYS["ood"]) as soon as it is scored, so a kill loses at most the
    group in progress; then the DDU JSON summaries (results/ddu/<DATASET>_<label>.json: mean, standard error
    and values over seeds). An error while scoring names the run folder(s) it came from."""
    sets, tune_sets = entry_sets(entries, args, ood_sets)
    rows = []
    for runs, group_entries in group_by_runs(entries, args).items():
        try:
            group_rows = evaluate_group(runs, group_entries, sets, tune_sets, adv_sets, args)
        except Exception as error:  # noqa: BLE001 (re-raised with the run named, same type where possible)
            raise naming_run(error, runs) from error
        upsert_rows(rows_path(args), group_rows, KEYS["ood"])
        rows += group_rows
    write_ddu_summaries(rows_path(args), {row["label"] for row in rows}, Path(args.results_root) / "ddu")
    return rows


def entry_sets(entries: list[TableEntry], args: Namespace, ood_sets: list[str]) -> tuple[dict, dict]:
    """(evaluation sets, tuning sets): the test set, the OOD sets and the entries' tuning sets, split for
    tuning when a tunable detector is tuned (args.tuning records it)."""
    wanted = [args.tune_ood] + [e.options.get("tune_ood") for e in entries]
    shown = {data.set_name(name) for name in ood_sets}
    ood_sets = ood_sets + [name for name in dict.fromkeys(wanted) if name and data.set_name(name) not in shown]
    sets = load_sets(args, ood_sets)
    tuning = any(get_detector_class(e.detector).tunable and (args.tune_ood or "tune_ood" in e.options) for e in entries)
    args.tuning = tuning
    return split_for_tuning(sets, args.tune_n) if tuning else (sets, {})


def evaluate_network(network: nn.Module, name: str, checkpoint: str, entries: list[TableEntry], args: Namespace,
                     ood_sets: list[str], adv_sets: list[str]) -> list[dict]:
    """Rows of one network from elsewhere (utils.byom): as a run's, with `name` as its run and no run config
    (the whole training split fits the detectors, no validation temperature); written to the store."""
    sets, tune_sets = entry_sets(entries, args, ood_sets)
    torch.manual_seed(args.seed)  # after the network is built: the CLI and Python score the same draws
    rows = score_networks([network], name, checkpoint, entries, sets, tune_sets, adv_sets, args)
    upsert_rows(rows_path(args), rows, KEYS["ood"])
    write_ddu_summaries(rows_path(args), {row["label"] for row in rows}, Path(args.results_root) / "ddu")
    return rows


def write_ddu_summaries(path: Path, labels: set[str], out_dir: Path) -> None:
    """The DDU summaries of `labels`, from the stored rows (the newest of each run, detector and OOD set) and
    under the store's lock: of two evaluations of one label finishing together, the later summary holds both's
    runs, as the tables do. Rows of older versions without the DDU fields are left out."""
    if not labels:
        return
    with locked(path):
        stored = [row for row in latest_rows(read_rows(path)) if row.get("label") in labels
                  and all(key in row for key in ROW_KEYS)]
        write_summaries(stored, out_dir)


def naming_run(error: Exception, runs: tuple) -> Exception:
    """`error` with "run <dir>: " in front of its message, of the same type when that type takes a message."""
    message = f"run {' + '.join(map(str, runs))}: {error}"
    if isinstance(error, OSError) and error.errno is not None and not isinstance(error, UserError):
        # keep errno and file name: the one-line message of a full disk (utils.cli) is built from them
        return type(error)(error.errno, f"run {' + '.join(map(str, runs))}: {error.strerror}", error.filename)
    try:
        named = type(error)(message)
    except Exception:  # noqa: BLE001 (an exception type with another signature)
        return RuntimeError(message)
    return named if str(named) == message else RuntimeError(message)
