"""Clean, adversarial and guaranteed AUROC: AUC, AAUC, GAUC (`gen_attack_stats.py --study gauc`).

GOOD (Bitterwolf, Meinke, Hein, NeurIPS 2020, arXiv 2007.08473) and ProoD (Meinke, Bitterwolf, Hein, NeurIPS
2022, arXiv 2106.04260). Per model and OOD set, with the model's max-softmax confidence as the score:

  AUC   in-distribution test confidences vs the OOD points' clean confidences;
  AAUC  each OOD confidence replaced by the highest one found in the clipped L-inf eps-ball around the point
        (the max over the clean point, APGD with restarts and ProoD's monotone momentum PGD from its starts,
        `utils.attacks.worst_case_confidence`; the row's "attack" names it);
  GAUC  each OOD confidence replaced by a certified upper bound over that ball (`utils.ibp.confidence_upper_bound`:
        IBP for plain ReLU nets, ProoD's discriminator bound, CCU's own certificate on the PCA-metric ball that
        contains the box; 1.0, hence GAUC = 0, for a model without one).

Precision (`--precision`, the row's "precision", part of its key): both sides of every AUROC come in one
precision. float32 (default, as GOOD's and ProoD's evaluations): in-distribution, clean and attacked confidences
from the float32 model, IBP bounds computed in float32 (ProoD's and CCU's own float64 certificates rounded up to
float32). float64: the same from a float64 copy of the model, bounds in float64. Comparing float32 confidences,
which saturate at exactly 1.0 far from the decision boundary, with float64 bounds just below 1 (what rows without
a "precision" did) let uncertified points count as detected.

Every model of the table gets a row (a deep ensemble as one model, on its averaged probabilities; detectors
that share a network share its row, labelled "Base/ODIN/Maha"). Since bound >= attacked >= clean per point,
GAUC <= AAUC <= AUC; this is checked for every row (a bound below an attacked confidence by more than 1e-5
means an unsound certificate and raises). Both AUROC tie conventions are
reported: scikit-learn's (ties count 1/2) and the papers' conservative one (ties count against the model), which
matters here because every model without a certificate ties at 1.0. Table: GOOD Table 1's layout, Acc then
AUC / AAUC / GAUC per OOD set, one table per precision and convention.

    python gen_attack_stats.py --study gauc --dataset MNIST      # every run of model_paths.MODEL_PATHS["MNIST"]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import AT_LEAST_ONE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE
from utils.progress import bar
from utils.studies import add_common_args, dataset_of_runs
from utils.studies.auc_conventions import CONVENTIONS, auroc, auroc_conservative  # noqa: F401 (public here too)

STUDY = "gauc"
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
SOUNDNESS_TOL = 1e-5


RANGES = {"eps": NON_NEGATIVE, "n_ood": AT_LEAST_ONE, "n_test": AT_LEAST_ONE, "apgd_steps": NON_NEGATIVE_INT,
          "apgd_restarts": AT_LEAST_ONE, "pgd_steps": NON_NEGATIVE_INT, "pgd_restarts": NON_NEGATIVE_INT, "pgd_step_size": POSITIVE,
          "batch_size": AT_LEAST_ONE}  # checked by gen_attack_stats.run_study before any work


def add_args(parser: argparse.ArgumentParser) -> None:
    import model_paths

    model_paths.add_run_args(parser, "study")
    from utils.byom import add_model_args

    add_model_args(parser)
    from utils.methods.certified import CERTIFIED_EPS

    parser.add_argument("--eps", type=float, default=None, help=f"L-inf radius (default per dataset: {CERTIFIED_EPS})")
    import data
    from utils.cli import add_alias

    parser.add_argument("--ood", nargs="+", action=data.DatasetListAction, default=None, metavar="SET",
                        help="OOD sets: data keys or NAME=PATH (image folder or .npz); default: "
                             f"data.OOD_TEST[dataset]; {data.SET_LIST_FORMS}")
    add_alias(parser, "--ood-sets", "--ood", dest="ood")
    parser.add_argument("--n-ood", type=int, default=1000, help="points per OOD set (seeded subset)")
    parser.add_argument("--n-test", type=int, default=None, help="in-distribution test points (default: all)")
    parser.add_argument("--apgd-steps", type=int, default=500)
    parser.add_argument("--apgd-restarts", type=int, default=5)
    parser.add_argument("--pgd-steps", type=int, default=200, help="steps of each monotone PGD run")
    parser.add_argument("--pgd-step-size", type=float, default=0.1,
                        help="initial absolute step of the monotone PGD (ProoD's 0.1; x1.1 on success, x0.5 on failure)")
    parser.add_argument("--pgd-restarts", type=int, default=3,
                        help="restarts of the uniform and the Gaussian monotone PGD starts (1 + this many runs each)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="float32",
                        help="one precision for confidences and bounds (float32: GOOD's and ProoD's evaluations)")
    parser.add_argument("--batch-size", type=int, default=500)
    from utils.studies.detector_runs import add_detectors_flag

    add_detectors_flag(parser, "own scores are attacked (AUC / AAUC; msp keeps its GAUC row; float32 only)")
    add_common_args(parser)


@torch.no_grad()
def _max_softmax(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max-softmax confidences as float64 (exactly), predicted classes) in the model's dtype (x is cast to it),
    on the CPU."""
    dtype = next(model.parameters()).dtype
    confidences, predictions = [], []
    for i in range(0, len(x), batch_size):
        probs = F.softmax(model(x[i:i + batch_size].to(dtype)), dim=1).cpu()
        confidences.append(probs.amax(1).double())
        predictions.append(probs.argmax(1))
    return torch.cat(confidences), torch.cat(predictions)


def _confidences(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Max-softmax confidences in the model's dtype (x is cast to it), returned as float64 (exactly)."""
    return _max_softmax(model, x, batch_size)[0]


def scoring_model(model: nn.Module, precision: str) -> nn.Module:
    """The model that scores and bounds in `precision`: the model itself (float32) or a float64 copy."""
    import copy

    return model if precision == "float32" else copy.deepcopy(model).to(PRECISIONS[precision])


def ood_scores(model: nn.Module, x_out: torch.Tensor, eps: float, args: argparse.Namespace,
               generator: torch.Generator, scorer: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Clean, attacked and certified confidences (N,) of the OOD points, float64 on the CPU.

    The attack searches with `model` (float32); the clean point, the point it found and the bound are then scored
    by `scorer` (default `model`) in the study's precision, so all three compare with the in-distribution
    confidences in one precision.
    """
    from utils.attacks import worst_case_confidence
    from utils.ibp import confidence_upper_bound

    scorer = model if scorer is None else scorer
    dtype = next(scorer.parameters()).dtype
    clean, attacked, bound = [], [], []
    for i in range(0, len(x_out), args.batch_size):
        x = x_out[i:i + args.batch_size]
        clean.append(_confidences(scorer, x, args.batch_size))
        x_adv, _ = worst_case_confidence(model, x, eps, args.apgd_steps, args.apgd_restarts, args.pgd_steps,
                                         args.pgd_step_size, generator, getattr(args, "pgd_restarts", 3))
        attacked.append(_confidences(scorer, x_adv, args.batch_size))
        bound.append(confidence_upper_bound(scorer, x.to(dtype), eps, dtype, trivial_ok=True).double().cpu())
    clean, attacked, bound = torch.cat(clean), torch.cat(attacked), torch.cat(bound)
    return {"clean": clean, "attacked": torch.maximum(attacked, clean), "bound": bound}


def in_distribution_scores(scorer: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor,
                           batch_size: int) -> tuple[torch.Tensor, float]:
    """(confidences (N,) float64 of the scorer's precision, accuracy in %) on the in-distribution test set."""
    conf_in, predictions = _max_softmax(scorer, x_in, batch_size)
    return conf_in, 100 * int((predictions == y_in.cpu()).sum()) / len(y_in)


def score_model(model: nn.Module, x_in: torch.Tensor, y_in: torch.Tensor, oods: dict[str, torch.Tensor],
                eps: float, args: argparse.Namespace, label: str = "model") -> list[dict]:
    """Accuracy and AUC / AAUC / GAUC of one model per OOD set, in `args.precision` (the row fields of the study
    that do not name the run)."""
    from utils.attacks import AAUC_ATTACK

    precision = getattr(args, "precision", "float32")
    scorer = scoring_model(model, precision)
    conf_in, acc = in_distribution_scores(scorer, x_in.to(args.device), y_in.to(args.device), args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for ood, x_out in oods.items():
        scores = ood_scores(model, x_out.to(args.device), eps, args, generator, scorer)
        rows.append({"ood": ood, "acc": acc, "eps": eps, "precision": precision, "attack": AAUC_ATTACK,
                     "n_ood": len(x_out), "n_test": len(y_in), "apgd_steps": args.apgd_steps,
                     "apgd_restarts": args.apgd_restarts, "pgd_steps": args.pgd_steps,
                     "pgd_step_size": args.pgd_step_size, "pgd_restarts": getattr(args, "pgd_restarts", 3),
                     "seed": args.seed, **check_and_score(label, ood, conf_in, scores)})
    return rows


def check_and_score(label: str, ood: str, conf_in: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict:
    """AUC / AAUC / GAUC in both conventions, after checking bound >= attacked per point and the ordering."""
    unsound = scores["bound"] < scores["attacked"] - SOUNDNESS_TOL
    if bool(unsound.any()):
        gap = float((scores["attacked"] - scores["bound"]).max())
        raise ValueError(f"{label} on {ood}: the certified bound is below an attacked confidence on "
                         f"{int(unsound.sum())} points (max gap {gap:.3g}): the certificate is unsound")
    # differences below the tolerance are float32 rounding of the forward pass, not a weaker certificate
    guaranteed = torch.maximum(scores["bound"], scores["attacked"])
    row = {}
    for convention in CONVENTIONS:
        values = {name: auroc(conf_in, out, convention)
                  for name, out in (("auc", scores["clean"]), ("aauc", scores["attacked"]), ("gauc", guaranteed))}
        if not values["gauc"] <= values["aauc"] <= values["auc"]:
            raise ValueError(f"{label} on {ood} ({convention}): GAUC <= AAUC <= AUC violated: {values}")
        row.update({f"{name}_{convention}": 100 * value for name, value in values.items()})
    row["mean_bound"] = float(scores["bound"].mean())
    row["certified_below_half"] = float((scores["bound"] < 0.5).double().mean())
    return row


def _ood_points(name: str, args: argparse.Namespace, data_root: str) -> torch.Tensor:
    """n_ood points of an OOD set: generated sets draw exactly n (seeded), real ones a seeded random subset."""
    import data

    generated = data.DATASETS[name].kind == "generated" if name in data.DATASETS else False
    dataset = data.get_dataset(name, "test", root=data_root, like=args.dataset, seed=args.seed,
                               n=args.n_ood if generated else None)
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.n_ood]
    return torch.stack([dataset[int(i)][0] for i in index])


def _in_test(args: argparse.Namespace, data_root: str) -> tuple[torch.Tensor, torch.Tensor]:
    import data

    dataset = data.get_dataset(args.dataset, "test", root=data_root, n=args.n_test)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
    return next(iter(loader))


# rows written before the "precision" field existed compared float32 confidences with float64 bounds
MIXED = "mixed (float32 confidences, float64 bounds; rows without a precision)"


def gauc_table(rows: list[dict]) -> str:
    """GOOD Table 1 layout per precision and tie convention: Acc, then AUC / AAUC / GAUC per OOD set (newest row
    per cell)."""
    from utils.tables import markdown

    parts = []
    for precision in dict.fromkeys(row.get("precision") or MIXED for row in rows):
        group = [row for row in rows if (row.get("precision") or MIXED) == precision]
        newest: dict = {}
        for row in group:  # a detector's own rows (--detectors) are models of their own: "label [detector]"
            label = row["label"] + (f" [{row['detector']}]" if row.get("detector") else "")
            newest[(label, row["run"], row["ood"])] = row
        models = list(dict.fromkeys((label, run) for label, run, _ in newest))
        oods = list(dict.fromkeys(ood for _, _, ood in newest))
        r0 = group[-1]
        for convention, title in CONVENTIONS.items():
            grid = [["Model", "Acc"] + [f"{ood} AUC / AAUC / GAUC" for ood in oods]]
            for label, run in models:
                cells = [newest.get((label, run, ood)) for ood in oods]
                first = next(c for c in cells if c is not None)
                grid.append([label, f"{first['acc']:.1f}"] + [
                    "-" if c is None else " / ".join(f"{c[f'{k}_{convention}']:.1f}" if f"{k}_{convention}" in c
                                                     else "-" for k in ("auc", "aauc", "gauc"))
                    for c in cells])
            parts.append(f"{r0['dataset']}, eps = {r0['eps']} (L-inf), {title}, {precision}, x100:\n\n"
                         + markdown(grid))
    return "\n\n".join(parts)


def _load(run_dirs: list[Path], device: str) -> nn.Module:
    """One run, or a deep ensemble of several as one model (log of the mean member softmax)."""
    from utils.detectors.bayes import load_network

    return load_network(run_dirs, device)


def study_model(target, model: nn.Module, checkpoint: str, x_in: torch.Tensor, y_in: torch.Tensor, oods: dict,
                eps: float, args: argparse.Namespace) -> list[dict]:
    """The rows of one target (utils.byom.StudyTarget: run folders or a network from elsewhere), loaded as
    (model, checkpoint) by `target.load()`."""
    from utils import runs

    rows = []
    label = target.label
    for scored in score_model(model, x_in, y_in, oods, eps, args, label):
        row = {"study": STUDY, "dataset": args.dataset, "label": label, "run": target.run,
               "checkpoint": checkpoint, **scored,
               "git_sha": runs.git_sha(), "date": runs.now()}
        print(f"{label:>14s} {row['ood']:>15s}: AUC {row['auc_conservative']:.1f}  AAUC {row['aauc_conservative']:.1f}  "
              f"GAUC {row['gauc_conservative']:.1f} (conservative, {row['precision']})")
        rows.append(row)
    return rows


def _table_targets(args: argparse.Namespace) -> list[tuple[str, list[Path]]]:
    """(label, run folders) of --runs, else of the table's runs and ensembles (attacked on their averaged
    probabilities)."""
    import model_paths

    targets = [(label, [run_dir]) for label, run_dir in
               model_paths.distinct_runs(args.dataset, args.runs_root, args.runs, include_ensembles=False)]
    if not args.runs:
        targets += [(entry.label, entry.run_dirs(args.runs_root, args.dataset))
                    for entry in model_paths.table_entries(args.dataset) if entry.is_ensemble]
    return targets


def main(args: argparse.Namespace) -> None:
    import data
    from utils import runs
    from utils.byom import run_target, study_targets
    from utils.methods.certified import CERTIFIED_EPS

    if args.dataset is None:
        args.dataset = dataset_of_runs(args.runs)
        if args.dataset is None:
            raise ValueError("pass --dataset (it names the result files and the default OOD sets)")
    eps = args.eps if args.eps is not None else CERTIFIED_EPS.get(args.dataset)
    if eps is None:
        raise ValueError(f"no default eps for {args.dataset}; pass --eps (defaults: {CERTIFIED_EPS})")
    detectors = getattr(args, "detectors", None)  # None: msp only, today's rows
    if set(detectors or ()) - {"msp"} and args.precision != "float32":
        raise ValueError("--detectors other than msp score in float32 only; drop --precision or those detectors")
    from utils.studies.detector_gauc import check_attackable_names

    check_attackable_names(detectors or [])  # before any attack
    data_root = runs.resolve_data_root(args.data_root)
    x_in, y_in = _in_test(args, data_root)
    ood_keys = data.unique_sets(args.ood or data.OOD_TEST[args.dataset])  # one NAME, one set
    for key in ood_keys:  # unknown names and unreadable NAME=PATH files fail before any attack
        data.check_dataset(key, like=args.dataset, root=data_root)
    oods = {data.set_name(key): _ood_points(key, args, data_root) for key in ood_keys}
    targets = study_targets(args, lambda: [run_target(label, dirs, lambda d=dirs: _load(d, args.device))
                                           for label, dirs in _table_targets(args)])
    rows = []
    for target in bar(targets, getattr(args, "progress", None), desc="models"):
        model, checkpoint = target.load()  # once, for msp's rows and the detectors'
        if detectors is None or "msp" in detectors:
            rows += study_model(target, model, checkpoint, x_in, y_in, oods, eps, args)
        if set(detectors or ()) - {"msp"} and len(target.run_dirs) == 1:  # detectors score single runs
            from utils.studies.detector_gauc import detector_rows

            rows += detector_rows(target.label, target.run_dirs[0], model, checkpoint, x_in, y_in, oods, eps, args)
    name = f"{args.dataset}_gauc"
    print(runs.record_study(args.results_root, name, name, rows, gauc_table))
