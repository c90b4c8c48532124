"""One registry of table runs (issue 20): model_paths gives every table, at every budget it trains at, a complete
plan; reproduce.py --train-only and the demo train by it with one rule; nothing executes a script to read a list."""
import ast
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest

import gen_gmm
import model_paths
import reproduce
import train
from utils import cli, preflight
from utils.studies import dataset_of_runs

ROOT = Path(__file__).resolve().parent.parent


def _plans() -> list[tuple[str, str]]:
    return [(key, budget) for key in model_paths.MODEL_PATHS for budget in model_paths.table_budgets(key)]


def test_every_table_trains_at_every_reproduce_budget_and_only_the_digits_table_at_the_demos():
    for key in model_paths.MODEL_PATHS:
        budgets = model_paths.table_budgets(key)
        assert budgets[:len(reproduce.BUDGETS)] == list(reproduce.BUDGETS), key
        assert (model_paths.DEMO_BUDGET in budgets) == (key == "digits"), key
    known = {*reproduce.BUDGETS, model_paths.DEMO_BUDGET}
    for training in model_paths.TRAININGS:  # a shortening names a budget that exists and that its book trains at
        for flags in [*training.runs.values(), training.gmm]:
            assert set(flags.shortened) <= set(training.budgets) <= known, flags
    with pytest.raises(ValueError, match="no budget 'demo' for the MNIST table; budgets it trains at: paper, small, "
                                         "tiny"):
        model_paths.table_plan("MNIST", model_paths.DEMO_BUDGET)


@pytest.mark.parametrize("key,budget", _plans())
def test_every_table_and_budget_has_a_complete_plan(key, budget):
    dataset = key.partition("/")[0]
    plan = model_paths.table_plan(key, budget)
    names = [name for _, name, _, _ in plan]
    assert len(names) == len(set(names)) and set(model_paths.table_runs(key)) <= set(names)
    for position, (what, name, users, flags) in enumerate(plan):
        shortened = list(flags.shortened.get(budget, ()))
        if what == "gmm":
            gen_gmm.get_args_parser().parse_args(["--dataset", dataset, "--name", name, *flags.flags, *shortened])
            assert users and all(names.index(user) > position for user in users)
            continue
        kind, seed = model_paths.run_kind(name)
        assert "--method" in flags.flags  # the kind's flags name its method: mcd is --method plain --recipe mcd
        assert not set(shortened) & set(model_paths.NEEDS_FLAGS)  # what a run needs is read from flags.flags
        opts = train.get_args_parser().parse_args(["--dataset", dataset, "--seed", str(seed), "--name", name,
                                                   *flags.flags, *shortened])
        assert opts.method == flags.flags[flags.flags.index("--method") + 1]
        for need_what, need in model_paths.run_needs(name, budget, key):  # every dependency planned before its user
            assert names.index(need) < position and plan[names.index(need)][0] == need_what
            assert name in plan[names.index(need)][2]
        assert all(names.index(user) > position for user in users)


def test_the_demo_and_the_papers_train_the_digits_table_differently():
    demo = {name: flags.flags for what, name, _, flags in model_paths.table_plan("digits", "demo")}
    paper = {name: flags.flags for what, name, _, flags in model_paths.table_plan("digits", "paper")}
    assert list(demo) == ["plain-s0", "gan-s0", "ceda-s0", "acet-s0", "ddu-s0", "gmm-s0", "ccu-s0", "good80-s0",
                          "prood-s0"]
    assert list(paper) == ["plain-s0", "gan-s0", "ceda-s0", "acet-s0", "ddu-s0", "gmm-s0", "ccu-s0", "good80-s0",
                           "oe-s0", "prood-s0"]  # the papers' ProoD trains beside OE, the demo's beside the plain run
    assert demo["good80-s0"] == ("--method", "good")  # --method good's digits defaults
    assert demo["prood-s0"][:4] == ("--method", "prood", "--classifier", "plain-s0")
    assert demo["gmm-s0"] == ("--n-components", "20", "--out-data", "natural_patches", "--n-out", "3000",
                              "--no-augment") and paper["gmm-s0"] == ()


# --- nothing executes a script to read a list -------------------------------------------------------------------

def test_preflight_reads_the_registry_and_executes_no_script(monkeypatch, tmp_path):
    imported = {alias.name for node in ast.walk(ast.parse((ROOT / "utils" / "preflight.py").read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names} | \
        {node.module for node in ast.walk(ast.parse((ROOT / "utils" / "preflight.py").read_text()))
         if isinstance(node, ast.ImportFrom)}
    assert not imported & {"importlib", "importlib.util", "runpy", "subprocess", "scripts", "demo"}

    def refuse(*args, **kwargs):
        raise AssertionError("a script was executed to read a list")

    monkeypatch.setattr(importlib.util, "spec_from_file_location", refuse)
    monkeypatch.setattr(runpy, "run_path", refuse)
    entries = model_paths.table_entries("digits")
    message = preflight.missing_runs_message(["ddu-s0", "ccu-s0"], entries, "digits", str(tmp_path), None, "digits")
    lines = message.splitlines()
    assert lines[1] == "  python gen_gmm.py --dataset digits --name gmm-s0 --runs-root " + str(tmp_path) + \
        " --n-components 20 --out-data natural_patches --n-out 3000 --no-augment"
    assert lines[2].endswith("--name ddu-s0 --runs-root " + str(tmp_path) + " " +
                             " ".join(model_paths.DEMO_RUN_FLAGS["ddu"].flags).replace('{"bn_momentum": 0.1}',
                                                                                      "'{\"bn_momentum\": 0.1}'"))
    assert "scripts/demo.py" in lines[-2]  # the demo's table is made by the demo


# --- one rule for what is missing ---------------------------------------------------------------------------------

def test_a_mixture_folder_without_gmm_pt_is_fitted_again_by_every_driver(tmp_path, capsys):
    stopped = tmp_path / "digits" / "gmm-s0"
    stopped.mkdir(parents=True)
    (stopped / "config.json").write_text("{}")  # a fit killed before gmm.pt was written
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_table

    cli.run(train_table.main, train_table.get_args_parser(), ["--dataset", "digits", "--runs-root", str(tmp_path),
                                                               "--dry-run"])
    captured = capsys.readouterr()
    assert "gen_gmm" in captured.out and "gmm-s0" in captured.out  # the deprecated wrapper too
    assert captured.err.startswith("scripts/train_table.py is deprecated; running: python reproduce.py --train-only")
    args = reproduce.get_args_parser().parse_args(["ccu-table2", "--dataset", "digits", "--runs-root",
                                                   str(tmp_path), "--train-only"])
    titles = [step.title for step in reproduce.plan(args, reproduce.chosen_table(args), reproduce.BUDGETS["paper"])]
    assert titles[5:7] == ["gen_gmm gmm-s0 (needed by ccu-s0)", "train ccu-s0 (missing)"]


def test_the_demo_moves_a_start_killed_before_its_first_checkpoint_aside(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo

    stale = tmp_path / "digits" / "plain-s0"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "notes.txt").write_text("mine")  # not only what train.py writes: train.py alone refuses to replace it
    # the step the demo's train_table runs for plain-s0 (reproduce.training_steps), with its --tiny flags
    flags = [*model_paths.DEMO_RUN_FLAGS["plain"].flags, *demo.TINY_FLAGS["train"]]
    reproduce._train_step("plain-s0", (), ["--dataset", "digits", "--runs-root", str(tmp_path)], flags, stale).action()
    assert json.loads((stale / "config.json").read_text())["epochs"] == 1 and not (stale / "notes.txt").exists()
    [aside] = [path for path in stale.parent.iterdir() if path.name != "plain-s0"]
    assert aside.name.startswith("plain-s0.interrupted-") and (aside / "notes.txt").read_text() == "mine"


def test_train_only_flags_that_do_not_fit_are_refused(tmp_path, capsys):
    for argv, expected in (
            (["odin-table2", "--train-only", "--paths", "digits/odin"],
             "--paths names the runs to train without a table: pass it with --train-only and no table"),
            (["--train-only", "--dataset", "MNIST", "--paths", "CIFAR10/ddu"],
             "--paths CIFAR10/ddu is a table of CIFAR10, not of --dataset MNIST; pass --dataset CIFAR10"),
            (["--train-only", "--dataset", "digits", "--paths", "../etc"], "no table is defined for '../etc'; "
                                                                             "model_paths.MODEL_PATHS has: digits,"),
            (["--dataset", "digits"], "name a table: one of")):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(reproduce.main, reproduce.get_args_parser(), [*argv, "--runs-root", str(tmp_path)])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the dataset of a set of runs: one function, mixed datasets refused ---------------------------------------------

def test_the_studies_refuse_runs_of_mixed_datasets(tmp_path):
    for name, dataset in (("a", "digits"), ("b", "moons")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"dataset": dataset}))
    assert dataset_of_runs([tmp_path / "a"]) == "digits" and dataset_of_runs([]) is None
    with pytest.raises(preflight.RunCheckError, match=r"--runs mixes datasets: .*a \(digits\), .*b \(moons\)"):
        dataset_of_runs([tmp_path / "a", tmp_path / "b"])
