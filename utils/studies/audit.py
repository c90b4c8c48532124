"""The far-away confidence audit (`gen_attack_stats.py --study audit`): the exact limit of each trained
network's confidence along rays alpha * d as alpha -> infinity (Theorem 3.1 of the ACET paper), computed by
`utils.limits`, cross-checked numerically at a large alpha, one row per (run, direction source)."""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from utils.byom import add_model_args, run_target, study_targets
from utils.cli import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT_OPEN
from utils.limits import limit_analysis, numeric_confidence
from utils.progress import bar
from utils.studies import add_common_args, dataset_of_runs
AUDIT_SOURCES = ("gaussian", "test", "noise")
RANGES = {"n_directions": AT_LEAST_ONE, "alpha_check": POSITIVE, "threshold": UNIT_OPEN, "agree_tol": NON_NEGATIVE,
          "batch_size": AT_LEAST_ONE}


def add_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `gen_attack_stats.py --study audit`."""
    import data
    import model_paths

    model_paths.add_run_args(parser, "audit")
    add_model_args(parser)
    parser.add_argument("--n-directions", type=int, default=1000, help="directions d per source")
    parser.add_argument("--sources", nargs="+", default=list(AUDIT_SOURCES), choices=AUDIT_SOURCES,
                        help="gaussian: d ~ N(0, I); test: test images; noise: --noise images")
    parser.add_argument("--noise", default="uniform", type=data.dataset_arg,
                        help="the 'noise' directions: a data.DATASETS key or NAME=PATH (image folder or .npz)")
    parser.add_argument("--alpha-check", type=float, default=1e6, help="alpha of the numeric cross-check")
    parser.add_argument("--threshold", type=float, default=0.99, help="'confident' limit threshold")
    parser.add_argument("--agree-tol", type=float, default=1e-3, help="|exact - numeric| counted as agreement")
    parser.add_argument("--float64", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=256)
    from utils.studies.detector_runs import add_detectors_flag

    add_detectors_flag(parser, "far-away limits to audit, each with its far_accept at 95%% TPR")
    add_common_args(parser)


def _audit_runs(args: argparse.Namespace) -> list[tuple[str, "object"]]:
    """(label, run_dir) per distinct run folder: --runs, else the entries of model_paths for --dataset."""
    import model_paths

    return model_paths.distinct_runs(args.dataset, args.runs_root, args.runs)


def _audit_directions(args: argparse.Namespace, shape: tuple) -> dict[str, torch.Tensor]:
    import data
    from utils.runs import resolve_data_root

    n, root = args.n_directions, resolve_data_root(args.data_root)
    generator = torch.Generator().manual_seed(args.seed)
    out = {}
    for source in args.sources:
        if source == "gaussian":
            out[source] = torch.randn((n, *shape), generator=generator)
            continue
        try:
            dataset = (data.get_dataset(args.dataset, "test", root=root) if source == "test" else
                       data.get_dataset(args.noise, "test", root=root, like=args.dataset, n=n, seed=args.seed))
        except data.DatasetNotFoundError as error:
            warnings.warn(f"audit: skipping source {source!r}: {error}")
            continue
        index = torch.randperm(len(dataset), generator=generator)[:n]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, index.tolist()), batch_size=n)
        out[source] = next(iter(loader))[0]
    return out


def limit_result(model: nn.Module, directions: torch.Tensor, args: argparse.Namespace):
    """`utils.limits.limit_analysis` with the study's settings (numeric for a model that is not piecewise affine)."""
    dtype = torch.float64 if args.float64 else None
    return limit_analysis(model, directions, batch_size=args.batch_size, dtype=dtype, on_non_pa="numeric",
                          numeric_alpha=args.alpha_check)


def audit_directions(model: nn.Module, directions: torch.Tensor, args: argparse.Namespace, result=None) -> dict:
    """Limit confidences of one model along `directions`: share above the threshold, quantiles, and the
    agreement with the network evaluated at alpha = --alpha-check."""
    dtype = torch.float64 if args.float64 else None
    result = limit_result(model, directions, args) if result is None else result
    conf = result.confidence.double()
    numeric = (numeric_confidence(model, directions, args.alpha_check, dtype=dtype, batch_size=args.batch_size)
               if result.method == "exact" else conf).double()
    levels = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9], dtype=torch.float64)
    quantiles = torch.quantile(conf, levels).tolist()
    diff = (conf - numeric).abs() if result.method == "exact" else torch.full_like(conf, float("nan"))

    def share(mask: torch.Tensor) -> float:
        return float(mask.double().mean())

    return {"method": result.method, "n": len(conf), "share_confident": share(conf > args.threshold),
            "mean_conf": float(conf.mean()), **{f"q{int(100 * q):02d}": v for q, v in zip(levels.tolist(), quantiles)},
            "certified": share(result.certified), "share_tied": share(result.n_tied > 1),
            "numeric_share_confident": share(numeric > args.threshold),
            "agreement": share(diff <= args.agree_tol) if result.method == "exact" else float("nan"),
            "max_abs_diff": float(diff.max())}


def audit_table(rows: list[dict]) -> str:
    """Markdown: one line per (label, run, source), newest row wins."""
    from utils.tables import markdown, newest_rows

    newest = newest_rows((row for row in rows if not row.get("detector")),  # detectors' own rows: detector_table
                         lambda row: (row["label"], row["run"], row["source"]))
    grid = [["Model", "Run", "Directions", "Method", "Limit conf > thr (%)", "Median", "1% quantile",
             "Certified (%)", "Agrees with alpha-check (%)"]]
    for r in newest.values():
        grid.append([r["label"], str(r["run"]), r["source"], r["method"], f"{100 * r['share_confident']:.1f}",
                     f"{r['q50']:.4f}", f"{r['q01']:.4f}", f"{100 * r['certified']:.1f}",
                     "n/a" if r["method"] != "exact" else f"{100 * r['agreement']:.1f}"])
    from utils.studies.detector_audit import detector_table

    detectors = detector_table(rows)
    return markdown(grid) + (f"\n\n{detectors}" if detectors else "")


def _detectors(model: nn.Module, run_dir, args: argparse.Namespace) -> dict:
    """(detectors fitted on the run's training split, their in-distribution test scores) of --detectors."""
    if not getattr(args, "detectors", None):
        return {}
    import data
    from utils.runs import resolve_data_root
    from utils.studies.detector_runs import detector_scores, fitted_detectors

    root = resolve_data_root(args.data_root)
    fitted = fitted_detectors(model, args.detectors, run_dir, args.dataset, root, args.batch_size)
    test = data.get_dataset(args.dataset, "test", root=root)
    x_in = next(iter(torch.utils.data.DataLoader(test, batch_size=len(test))))[0]
    return {name: (detector, detector_scores(detector, x_in, args.batch_size)) for name, detector in fitted.items()}


def _detector_rows(msp_row: dict, detectors: dict, d: torch.Tensor, result, args: argparse.Namespace) -> list[dict]:
    """One row per detector beside the run's msp row (msp's fields join that row, so its key stays today's)."""
    from utils.studies.detector_audit import detector_stats

    rows = []
    for name, (detector, conf_in) in detectors.items():
        stats = detector_stats(name, detector, d, result, conf_in, args)
        print(f"{'':>14s} {name:>14s} [{stats['limit_kind']}]: far_accept {100 * stats['far_accept']:.1f}%, "
              f"+inf {100 * stats['share_pos_inf']:.1f}%, -inf {100 * stats['share_neg_inf']:.1f}%, "
              f"agreement {100 * stats['limit_agreement']:.1f}%")
        if name == "msp":
            msp_row.update(stats)
        else:
            rows.append({**{k: v for k, v in msp_row.items() if k not in MSP_ONLY}, "detector": name, **stats})
    return rows


# the msp row's confidence statistics, which a detector's row does not repeat
MSP_ONLY = ("method", "share_confident", "mean_conf", "q00", "q01", "q10", "q50", "q90", "certified", "share_tied",
            "numeric_share_confident", "agreement", "max_abs_diff", "limit_kind", "n_numeric", "threshold_95",
            "far_accept", "numeric_far_accept", "share_pos_inf", "share_neg_inf", "limit_median_finite",
            "limit_agreement")


def main(args: argparse.Namespace) -> None:
    import data
    from utils import methods
    from utils import runs

    if args.dataset is None:
        args.dataset = dataset_of_runs(args.runs)
    if args.dataset is None:
        raise ValueError("pass --dataset (it names the result files and the shape of the directions)")
    _, shape = data.dataset_info(args.dataset)
    targets = study_targets(args, lambda: [
        run_target(label, [run_dir], lambda d=run_dir: methods.load_run(d, device=args.device))
        for label, run_dir in _audit_runs(args)])
    directions = _audit_directions(args, shape)
    rows = []
    for target in bar(targets, getattr(args, "progress", None), desc="models"):
        model, checkpoint = target.load()
        label = target.label
        # --detectors are fitted on a run's own training split; a network of --model gets confidence rows only
        detectors = _detectors(model, target.run_dirs[0], args) if len(target.run_dirs) == 1 else {}
        for source, d in directions.items():
            result = limit_result(model, d, args)
            stats = audit_directions(model, d, args, result)
            rows.append({"study": "audit", "dataset": args.dataset, "label": label, "run": target.run,
                         "checkpoint": checkpoint, "source": source,
                         **({"noise": data.set_name(args.noise)} if source == "noise" else {}),
                         "threshold": args.threshold, "alpha_check": args.alpha_check, "seed": args.seed, **stats,
                         "git_sha": runs.git_sha(), "date": runs.now(), **getattr(args, "row_tags", {})})
            agreement = "n/a" if stats["method"] != "exact" else f"{100 * stats['agreement']:.1f}%"
            print(f"{label:>14s} {source:>8s} [{stats['method']}]: {100 * stats['share_confident']:.1f}% of limits "
                  f"> {args.threshold}, median {stats['q50']:.4f}, certified {100 * stats['certified']:.1f}%, "
                  f"agreement with alpha={args.alpha_check:g}: {agreement}")
            rows += _detector_rows(rows[-1], detectors, d, result, args)
    name = f"{args.dataset}_audit"
    table = runs.record_study(args.results_root, name, name, rows, audit_table)
    print(table)
