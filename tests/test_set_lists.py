"""--ood: one syntax everywhere (comma-separated, space-separated, repeated), parsed once by data.dataset_list."""
import numpy as np
import pytest

import data
import evaluate
import gen_attack_stats
import reproduce
from utils.plots import ddu

PARSERS = {
    "evaluate.py": lambda: evaluate.get_args_parser(),
    "reproduce.py": lambda: reproduce.get_args_parser(),
    "gen_attack_stats.py --study gauc": lambda: gen_attack_stats.get_args_parser("gauc"),
    "utils.plots.ddu": lambda: ddu.get_args_parser(),
}
FORMS = [
    ["--ood", "a=x.npz,b=y.npz,uniform"],               # one comma list
    ["--ood", "a=x.npz", "b=y.npz", "uniform"],         # space-separated values
    ["--ood", "a=x.npz", "--ood", "b=y.npz,uniform"],   # the flag repeated, mixed with a comma list
    ["--ood=a=x.npz,b=y.npz", "--ood", "uniform"],
]


@pytest.mark.parametrize("script", sorted(PARSERS))
@pytest.mark.parametrize("form", range(len(FORMS)))
def test_every_script_reads_every_form_alike(script, form):
    args = PARSERS[script]().parse_args(FORMS[form])
    assert args.ood == ["a=x.npz", "b=y.npz", "uniform"]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_names_the_forms(script):
    squeeze = "".join  # argparse wraps (and breaks words at hyphens) by the terminal width
    assert squeeze(data.SET_LIST_FORMS.split()) in squeeze(PARSERS[script]().format_help().split())
    assert "comma-separated (a,b), space-separated (a b) or the flag repeated" in data.SET_LIST_FORMS


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_comma_inside_a_path_is_refused_at_parse_time(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script]().parse_args(["--ood", "mine=/data/a,b.npz"])
    assert exit_info.value.code == 2
    assert "mine=/data/a,b.npz: ',' separates sets, so a PATH cannot contain one" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_one_name_for_two_sets_is_refused_at_parse_time(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script]().parse_args(["--ood", "a=x.npz", "--ood", "uniform,a=y.npz"])
    assert exit_info.value.code == 2
    assert "two OOD sets are named 'a' ('a=x.npz' and 'a=y.npz')" in capsys.readouterr().err
    assert PARSERS[script]().parse_args(["--ood", "a=x.npz,a=x.npz"]).ood == ["a=x.npz"]


def test_unknown_name_in_a_list_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'zzz'; valid: MNIST"):
        data.dataset_list(["uniform,zzz"])
    assert data.dataset_list(["uniform,,", " natural_patches "]) == ["uniform", "natural_patches"]


def test_deprecated_alias_reads_the_list_like_the_flag(capsys):
    args = gen_attack_stats.get_args_parser("gauc").parse_args(["--ood-sets", "uniform,natural_patches"])
    assert args.ood == ["uniform", "natural_patches"]
    assert "--ood-sets is deprecated" in capsys.readouterr().err


def test_reproduce_refuses_a_comma_path_before_any_training(tmp_path, capsys):
    """Issue 18.9: the file exists (so a per-item check passed), but the list handed to evaluate.py split it in two
    after every run had trained; now the command line is refused before any work."""
    from utils import cli

    npz = tmp_path / "a,b.npz"
    np.savez(npz, x=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(reproduce.main, reproduce.get_args_parser(),
                ["odin-table2", "--dataset", "digits", "--budget", "tiny", "--runs-root", str(tmp_path / "runs"),
                 "--results-root", str(tmp_path / "results"), "--device", "cpu", "--ood", f"mine={npz}"])
    assert exit_info.value.code == 2
    assert f"mine={npz}: ',' separates sets, so a PATH cannot contain one" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_reproduce_hands_evaluate_every_set(tmp_path):
    args = reproduce.get_args_parser().parse_args(["odin-table2", "--dataset", "digits", "--budget", "tiny",
                                                   "--runs-root", str(tmp_path), "--ood", "a=x.npz,uniform",
                                                   "--ood", "b=y.npz"])
    steps = reproduce.plan(args, reproduce.TABLES["odin-table2"], reproduce.BUDGETS["tiny"])
    argv = steps[-1].argv
    parsed = evaluate.get_args_parser().parse_args(argv)
    assert parsed.ood == [*dict.fromkeys([*data.OOD_TEST["digits"], "a=x.npz", "uniform", "b=y.npz"])]


def test_reproduce_names_a_table_swallowed_by_ood(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.get_args_parser().parse_args(["--dataset", "digits", "--ood", "uniform", "odin-table2"])
    assert exit_info.value.code == 2
    assert "'odin-table2' is a table, not an OOD set; name the table before --ood" in capsys.readouterr().err
