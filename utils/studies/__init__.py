"""The studies of `gen_attack_stats.py` (ccu, alpha, audit), and the toy experiments of "Know your limits"
(toy models, linear regions) that the limits figures are drawn from."""


def add_common_args(parser, data_root: bool = True) -> None:
    """The flags every study of gen_attack_stats.py takes besides its runs: seed, device, data and results roots."""
    import torch

    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if data_root:
        parser.add_argument("--data-root", default=None, help="datasets folder (default: $DATA_ROOT or ./datasets)")
    parser.add_argument("--results-root", default="results", help="root of results/attacks, tables and scores")


def dataset_of_runs(runs) -> "str | None":
    """The one dataset the run folders were trained on (utils.preflight.runs_dataset: mixed datasets are refused);
    None when there are no runs."""
    from utils.preflight import runs_dataset

    return runs_dataset([str(run) for run in runs]) if runs else None
