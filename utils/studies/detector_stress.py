"""`reproduce.py detector-stress --dataset D`: every post-hoc detector of one plain run, far away and under attack.

After the plain run is trained (or found finished), three steps write their usual rows, and a fourth joins them
into one table, <results>/tables/<D>_detector_stress.md:

  evaluate.py --runs plain-s0 --detectors LIST     AUROC per OOD set (data.OOD_TEST[D] and reproduce.py's --ood)
  gen_attack_stats.py --study gauc --detectors     AAUC: each detector's own score attacked in eps-balls around
                                                   ACET's adversarial-noise seeds (acet_noise)
  gen_attack_stats.py --study audit --detectors    far_accept: share of uniform-noise rays alpha * d whose exact
                                                   limit is accepted at the 95%-TPR threshold
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Callable

from utils.detectors.recent import RECENT_DETECTORS

DETECTORS = ("msp", "maxlogit", "energy", "entropy", "mahalanobis", *RECENT_DETECTORS)
ADV_SEEDS = "acet_noise"   # the OOD set whose eps-balls are attacked (ACET's adversarial noise starts from it)
FAR_SOURCE = "uniform"     # the far-away directions
TABLE_NAME = "detector-stress"
OUTPUT = "{dataset}_detector_stress.md"
# per budget: extra flags of the gauc and audit steps (the evaluate step takes the budget's evaluate flags)
BUDGET_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "paper": {"gauc": (), "audit": ()},
    "small": {"gauc": ("--n-ood", "200", "--n-test", "1000", "--apgd-steps", "50", "--apgd-restarts", "1",
                       "--pgd-steps", "20", "--pgd-restarts", "0"), "audit": ("--n-directions", "200")},
    "tiny": {"gauc": ("--n-ood", "20", "--n-test", "100", "--apgd-steps", "5", "--apgd-restarts", "1",
                      "--pgd-steps", "3", "--pgd-restarts", "0"), "audit": ("--n-directions", "20")},
}


def steps(args: Namespace, runs_root: Path, results_root: Path, run_names: list[str],
          evaluate_flags: tuple[str, ...], run_evaluate: Callable[[list[str]], None],
          run_study: Callable[[list[str]], None]) -> list[tuple[str, str, Callable[[], None], list[str]]]:
    """(title, kind, action, argv) of the evaluate, gauc and audit steps and of the table, after training;
    `run_evaluate(argv)` / `run_study(argv)` are the driver's own (the scripts sit above the studies)."""
    import data

    run_dirs = [str(runs_root / args.dataset / name) for name in run_names]
    common = ["--dataset", args.dataset, "--device", args.device] + (["--data-root", args.data_root]
                                                                      if args.data_root else [])
    ood = list(dict.fromkeys([*data.OOD_TEST.get(args.dataset, []), *args.ood]))
    evaluate = [*common, "--runs", *run_dirs, "--detectors", ",".join(DETECTORS), "--table-name", TABLE_NAME,
                "--results-root", str(results_root), "--skip-missing-ood", "--no-progress", "--no-print",
                *evaluate_flags, "--ood", *ood] + (["--download"] if args.download else [])
    flags = BUDGET_FLAGS.get(args.budget, {})
    study = [*common, "--runs", *run_dirs, "--detectors", ",".join(DETECTORS), "--results-root", str(results_root),
             "--no-progress"]
    gauc = ["--study", "gauc", *study, "--ood", ADV_SEEDS, *flags.get("gauc", ())]
    audit = ["--study", "audit", *study, "--sources", "noise", "--noise", FAR_SOURCE, *flags.get("audit", ())]
    return [("evaluate.py (every detector)", "evaluate.py", lambda: run_evaluate(evaluate), evaluate),
            ("gen_attack_stats.py --study gauc --detectors", "gen_attack_stats.py --study gauc",
             lambda: run_study(gauc), gauc),
            ("gen_attack_stats.py --study audit --detectors", "gen_attack_stats.py --study audit",
             lambda: run_study(audit), audit),
            ("detector-stress table", "table", lambda: write_table(args.dataset, results_root, args.budget), [])]


def stress_table(dataset: str, results_root: Path, budget: str) -> str:
    """Markdown: per detector, AUROC per OOD set, AAUC on adversarial noise and far_accept (x100)."""
    from utils.runs import read_jsonl
    from utils.tables import markdown, newest_rows

    ood_rows = read_jsonl(results_root / "ood" / f"{dataset}_adhoc_{TABLE_NAME}.jsonl")
    auroc = newest_rows(ood_rows, lambda r: (r["detector"], r["ood"]))
    gauc = newest_rows([r for r in read_jsonl(results_root / "attacks" / f"{dataset}_gauc.jsonl")
                    if r.get("ood") == ADV_SEEDS], lambda r: r.get("detector") or "msp")
    audit = newest_rows([r for r in read_jsonl(results_root / "attacks" / f"{dataset}_audit.jsonl")
                     if r.get("source") == "noise" and r.get("noise") == FAR_SOURCE and "far_accept" in r
                    ], lambda r: r.get("detector") or "msp")
    oods = list(dict.fromkeys(ood for _, ood in auroc))
    grid = [["Detector", *[f"AUROC {ood}" for ood in oods], f"AAUC {ADV_SEEDS}", f"far_accept {FAR_SOURCE}"]]
    for name in DETECTORS:
        cells = [f"{100 * auroc[(name, ood)]['auroc']:.1f}" if (name, ood) in auroc else "-" for ood in oods]
        aauc = f"{gauc[name]['aauc_conservative']:.1f}" if name in gauc else "-"
        far = audit.get(name)
        far_cell = "-" if far is None else f"{100 * far['far_accept']:.1f}" + (
            "" if far["limit_kind"] == "exact" else f" (numeric on {far['n_numeric']} rays)")
        grid.append([name, *cells, aauc, far_cell])
    return (f"Every post-hoc detector on the plain run of {dataset} (x100): AUROC per OOD set (evaluate.py), AAUC "
            f"with each detector's own score attacked in L-inf eps-balls around {ADV_SEEDS} points (conservative "
            f"ties), far_accept = share of {FAR_SOURCE}-noise rays alpha * d whose limit as alpha -> inf is accepted "
            f"at the threshold keeping 95% of the test set. gauc flags: {' '.join(BUDGET_FLAGS.get(budget, {}).get('gauc', ())) or 'defaults'}; "
            f"audit flags: {' '.join(BUDGET_FLAGS.get(budget, {}).get('audit', ())) or 'defaults'}.\n\n" + markdown(grid))


def write_table(dataset: str, results_root: Path, budget: str) -> Path:
    from utils.runs import atomic_write_text

    out = results_root / "tables" / OUTPUT.format(dataset=dataset)
    atomic_write_text(out, stress_table(dataset, results_root, budget))
    return out
