"""evaluate.py and the results store: checks before scoring, rows replaced not duplicated, rows written per run
group, ad-hoc tables apart from the paper tables, errors that name the run."""
import json
import runpy
import shlex
import sys

import pytest

import evaluate
import gen_gmm
import model_paths
import train
from model_paths import TableEntry
from tests.conftest import ROOT
from utils import evaluation
from utils.preflight import MissingRunsError, RunCheckError, missing_runs_message

FAST = ["--ood", "uniform", "--n-ood", "100", "--no-progress", "--no-print"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--epochs", "1", "--seed", str(seed), "--runs-root", str(root), "--no-progress"]))
    return root


def run_eval(argv):
    evaluate.main(evaluate.get_args_parser().parse_args([*FAST, *argv]))  # argv may override FAST


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reevaluating_replaces_rows_and_adhoc_never_touches_the_paper_table(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits", [TableEntry("Base", ("plain-s0",)),
                                                            TableEntry("Energy", ("plain-s0",), "energy")])
    paper = ["--dataset", "digits", "--runs-root", str(two_runs), "--results-root", str(tmp_path)]
    run_eval(paper)
    rows_path, table_path = tmp_path / "ood" / "digits.jsonl", tmp_path / "tables" / "digits_ood.md"
    first = rows_of(rows_path)
    assert len(first) == 2
    run_eval(paper)  # the same evaluation again: its rows are replaced, not appended
    second = rows_of(rows_path)
    assert [(r["label"], r["ood"]) for r in second] == [(r["label"], r["ood"]) for r in first]
    assert [r["auroc"] for r in second] == [r["auroc"] for r in first]
    run_eval([*paper, "--n-ood", "50"])  # another setting: rows of their own
    assert len(rows_of(rows_path)) == 4
    paper_rows, paper_table = rows_path.read_bytes(), table_path.read_bytes()
    run_dir = str(two_runs / "digits" / "plain-s0")
    run_eval(["--runs", run_dir, "--results-root", str(tmp_path)])  # ad hoc: --dataset is the run's own
    run_eval(["--runs", run_dir, "--results-root", str(tmp_path), "--detectors", "energy", "--table-name", "mine"])
    assert rows_path.read_bytes() == paper_rows and table_path.read_bytes() == paper_table
    adhoc = sorted((tmp_path / "ood").glob("digits_adhoc_*.jsonl"))
    assert [p.name for p in adhoc][-1] == "digits_adhoc_mine.jsonl" and len(adhoc) == 2
    assert [r["label"] for r in rows_of(adhoc[0])] == ["plain-s0:msp"]
    assert [r["label"] for r in rows_of(adhoc[1])] == ["plain-s0:energy"]
    assert "plain-s0:energy" in (tmp_path / "tables" / "digits_adhoc_mine_ood.md").read_text()


def test_rows_are_written_per_run_group_and_errors_name_the_run(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits", [TableEntry("Base", ("plain-s0", "plain-s1"))])
    real_group, calls = evaluation.evaluate_group, []

    def failing_second(runs, *args, **kwargs):
        calls.append(runs)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_group(runs, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_group", failing_second)
    with pytest.raises(RuntimeError, match=rf"^run {two_runs / 'digits' / 'plain-s1'}: out of memory$"):
        run_eval(["--dataset", "digits", "--runs-root", str(two_runs), "--results-root", str(tmp_path)])
    rows = rows_of(tmp_path / "ood" / "digits.jsonl")  # the first run's rows were kept
    assert [(r["run"], r["ood"]) for r in rows] == [("plain-s0", "uniform")]
    # an error raised while scoring for real keeps its type and names the run too
    monkeypatch.setattr(evaluation, "evaluate_group", real_group)
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits", [TableEntry("Bad", ("plain-s1",), "msp", {"nope": 1})])
    with pytest.raises(TypeError, match=rf"^run {two_runs / 'digits' / 'plain-s1'}: .*unexpected keyword"):
        run_eval(["--dataset", "digits", "--runs-root", str(two_runs), "--results-root", str(tmp_path)])


def test_missing_runs_of_a_paper_table_are_listed_with_their_train_commands(two_runs, tmp_path):
    # the README's sequence: train plain-s0 only, then evaluate the digits (demo) table
    argv = ["--dataset", "digits", "--runs-root", str(two_runs), "--results-root", str(tmp_path)]
    with pytest.raises(MissingRunsError) as error:
        run_eval(argv)
    message = str(error.value)
    for run, method in (("ceda-s0", "ceda"), ("acet-s0", "acet"), ("ccu-s0", "ccu")):
        assert (f"python train.py --dataset digits --seed 0 --name {run} --runs-root {two_runs} --method {method}"
                in message)
    assert f"python gen_gmm.py --dataset digits --name gmm-s0 --runs-root {two_runs}" in message
    assert "GAN, CEDA, ACET, DDU, CCU, GOOD80, ProoD" in message and "--name plain-s0" not in message
    assert "--skip-missing-runs" in message
    commands = [shlex.split(line) for line in message.splitlines() if line.startswith("  python ")]
    assert [c[1] for c in commands] == ["gen_gmm.py"] + ["train.py"] * 7
    for command in commands:  # every listed command is one the script accepts
        script = gen_gmm if command[1] == "gen_gmm.py" else train
        script.get_args_parser().parse_args(command[2:])
    assert not (tmp_path / "ood").exists()  # nothing was scored
    run_eval([*argv, "--skip-missing-runs"])  # Base, ODIN and Maha of plain-s0 are scored
    assert {r["label"] for r in rows_of(tmp_path / "ood" / "digits.jsonl")} == {"Base", "ODIN", "Maha"}


def test_missing_runs_exit_2_from_the_command_line(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--dataset", "digits", "--runs-root", str(two_runs),
                                      "--results-root", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # run as `python evaluate.py ...` (in-process: no second torch import)
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("evaluate.py: error: 7 run(s) of the digits table are not trained") and "Traceback" not in stderr
    # the digits table is the demo's: its runs are listed with the demo's flags
    assert f"--name ddu-s0 --runs-root {two_runs} --method plain --arch resnet_small" in stderr


def test_missing_runs_of_a_real_dataset_table_use_model_paths_run_flags():
    message = missing_runs_message(["ceda-s0", "ccu-s0", "plain-s3"], model_paths.table_entries("MNIST"), "MNIST",
                                   "runs", "../data", "MNIST")
    assert message.splitlines()[1:5] == [
        "  python gen_gmm.py --dataset MNIST --name gmm-s0 --data-root ../data",
        "  python train.py --dataset MNIST --seed 0 --name ceda-s0 --data-root ../data --method ceda",
        "  python train.py --dataset MNIST --seed 0 --name ccu-s0 --data-root ../data --method ccu --gmm gmm-s0 "
        "--out-data natural_patches",
        "  python train.py --dataset MNIST --seed 3 --name plain-s3 --data-root ../data --method plain"]
    assert "python reproduce.py --train-only --dataset MNIST --data-root ../data" in message


def test_runs_are_checked_before_anything_is_scored(two_runs, tmp_path):
    run_dir = two_runs / "digits" / "plain-s0"
    with pytest.raises(RunCheckError, match=r"trained on digits, not on --dataset moons"):
        run_eval(["--dataset", "moons", "--runs", str(run_dir), "--results-root", str(tmp_path)])
    broken = tmp_path / "runs" / "digits" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((run_dir / "config.json").read_text())
    (broken / "model.pt").write_bytes((run_dir / "model.pt").read_bytes()[:1000])  # a truncated checkpoint
    with pytest.raises(RunCheckError, match=rf"run {broken}: .*unreadable checkpoint"):
        run_eval(["--runs", str(run_dir), str(broken), "--results-root", str(tmp_path)])
    with pytest.raises(RunCheckError, match="no such run folder"):
        run_eval(["--runs", str(run_dir), str(tmp_path / "nope"), "--results-root", str(tmp_path)])
    assert not (tmp_path / "ood").exists()  # the good run was not scored before the bad one was found
