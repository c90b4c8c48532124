"""reproduce.py: one table end to end on digits (tiny budget), killed and re-run without retraining anything."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import model_paths
import reproduce

ROOT = Path(__file__).resolve().parent.parent


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["acet-table1", "--dataset", "digits", "--budget", "tiny", "--runs-root", str(tmp_path / "runs"),
            "--results-root", str(tmp_path / "results"), "--device", "cpu", *extra]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_table_end_to_end_killed_and_rerun(tmp_path, capsys):
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(0).integers(0, 256, (300, 16, 16), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "reproduce.py", *_argv(tmp_path, "--ood", f"mine={tmp_path}/mine.npz")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "runs" / "budget-tiny" / "digits"
    _wait_for(runs / "plain-s0" / "model.pt", process)
    process.send_signal(signal.SIGKILL)  # no chance to clean up
    process.wait()
    first = process.stdout.read()
    assert "stage 1/4: train plain-s0 (missing)" in first and "ETA" in first
    plain = runs / "plain-s0"
    stamp, log_lines = (plain / "model.pt").stat().st_mtime_ns, (plain / "log.jsonl").read_text()
    assert reproduce.run_state(plain) == "finished"

    out = reproduce.main(reproduce.get_args_parser().parse_args(_argv(tmp_path, "--ood", f"mine={tmp_path}/mine.npz")))
    printed = capsys.readouterr().out
    assert f"{plain}: finished earlier, kept" in printed and "train plain-s0" not in printed
    assert (plain / "model.pt").stat().st_mtime_ns == stamp and (plain / "log.jsonl").read_text() == log_lines
    for run in ("plain-s0", "ceda-s0", "acet-s0"):  # every run trained exactly its one epoch, once
        saved = torch.load(runs / run / "model.pt", map_location="cpu", weights_only=True)
        assert saved["epoch"] == 1 and len((runs / run / "log.jsonl").read_text().splitlines()) == 1
    for aside in runs.glob("*.interrupted-*"):  # a run killed before its first checkpoint is set aside, whole
        assert not (aside / "model.pt").exists()

    table = out.read_text()
    assert out == tmp_path / "results" / "budget-tiny" / "tables" / "digits_acet-table1.md"
    assert "budget `tiny`" in table and "--epochs 1 --max-batches 3" in table
    assert "| mine |" in table and "| adv_noise |" in table and "Plain (TE" in table
    rows = [json.loads(line) for line in (tmp_path / "results" / "budget-tiny" / "ood" / "digits.jsonl").open()]
    assert rows and all(row["budget"] == "tiny" for row in rows)
    assert {row["label"] for row in rows} == {"Plain", "CEDA", "ACET"}
    # a third call has nothing left to train
    assert [s.title for s in reproduce.plan(reproduce.get_args_parser().parse_args(_argv(tmp_path)),
                                            reproduce.TABLES["acet-table1"], reproduce.BUDGETS["tiny"])] == ["evaluate.py"]


def test_stale_run_without_checkpoint_is_set_aside_and_retrained(tmp_path):
    args = reproduce.get_args_parser().parse_args(["odin-table2", *_argv(tmp_path)[1:]])
    stale = tmp_path / "runs" / "budget-tiny" / "digits" / "plain-s0"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # killed before its first epoch ended
    steps = reproduce.plan(args, reproduce.TABLES["odin-table2"], reproduce.BUDGETS["tiny"])
    assert [s.title for s in steps] == ["train plain-s0 (stale)", "evaluate.py"]
    steps[0].action()
    assert reproduce.run_state(stale) == "finished"
    assert len(list(stale.parent.glob("plain-s0.interrupted-*"))) == 1


@pytest.mark.parametrize("table", sorted(reproduce.TABLES))
def test_every_table_plans_its_runs(table, tmp_path, capsys):
    dataset = "CIFAR10" if table == "ddu-table" else "MNIST"
    args = reproduce.get_args_parser().parse_args([table, "--dataset", dataset, "--runs-root", str(tmp_path),
                                                   "--dry-run"])
    reproduce.main(args)
    printed = capsys.readouterr().out
    runs = reproduce.table_runs(reproduce.TABLES[table], dataset)
    assert all(f"train {run} (missing" in printed for run in runs)
    assert ("gen_gmm gmm-s0" in printed) == any(run.startswith("ccu") for run in runs)
    for budget, flags in reproduce.BUDGETS.items():  # every caption names its budget and the flags it shortened
        args.budget = budget
        text = reproduce.caption(args, reproduce.TABLES[table], flags)
        assert f"budget `{budget}`" in text and (budget == "paper") == ("shortened" not in text)
        assert budget == "paper" or "train.py --epochs 1" in text


def test_unreadable_ood_path_fails_before_anything_runs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_text("not a png")
    with pytest.raises(ValueError, match="a.png"):
        reproduce.main(reproduce.get_args_parser().parse_args(_argv(tmp_path, "--ood", f"mine={folder}")))
    assert not (tmp_path / "runs").exists()


# --- every (table, dataset) pair --list offers finishes (issue 18.12) -----------------------------------------

def _offered() -> list[tuple[str, str]]:
    return [(name, dataset) for name, table in reproduce.TABLES.items() for dataset in reproduce.table_datasets(table)]


def _walk_groups() -> list[tuple[str, tuple[str, ...]]]:
    """(dataset, tables) of the offered pairs on built-in data, tables that train the same runs walked together on
    one runs root (as a user reproducing several tables would), so each run trains once."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, dataset in _offered():
        if data.DATASETS[dataset].kind == "builtin":
            groups.setdefault((dataset, reproduce.TABLES[name].paths), []).append(name)
    return [(dataset, tuple(names)) for (dataset, _), names in groups.items()]


def test_the_walk_covers_every_offered_pair_on_builtin_data():
    walked = {(name, dataset) for dataset, names in _walk_groups() for name in names}
    assert walked == {(n, d) for n, d in _offered() if data.DATASETS[d].kind == "builtin"}
    assert ("ccu-table2", "digits") in walked and ("ccu-table1", "digits") in walked and len(walked) == 8


@pytest.mark.parametrize("dataset,tables", _walk_groups(), ids=lambda value: "+".join(value) if
                         isinstance(value, tuple) else value)
def test_every_offered_table_finishes_at_tiny_budget(dataset, tables, tmp_path, capsys):
    for name in tables:
        out = reproduce.main(reproduce.get_args_parser().parse_args(
            [name, "--dataset", dataset, "--budget", "tiny", "--runs-root", str(tmp_path / "runs"), "--results-root",
             str(tmp_path / "results"), "--device", "cpu"]))
        table = out.read_text()
        assert out.name == f"{dataset}_{name}.md" and "budget `tiny`" in table
        labels = [entry.label for entry in model_paths.table_entries(dataset, reproduce.TABLES[name].paths.format(
            dataset=dataset))]
        if reproduce.TABLES[name].evaluate is not None:  # every column of the table was scored: a number per cell
            header = next(line for line in table.splitlines() if line.startswith("| OOD set"))
            assert all(f"| {label} (TE" in header or f"| {label} |" in header for label in labels), header
            assert "| uniform |" in table and " - |" not in table.split(header)[1]
    runs = tmp_path / "runs" / "budget-tiny" / dataset
    for what, name, _ in {need for table in tables for need in reproduce.table_needs(reproduce.TABLES[table], dataset)}:
        assert (runs / name / ("gmm.pt" if what == "gmm" else "model.pt")).exists()


@pytest.mark.parametrize("name,dataset", _offered())
def test_every_offered_plan_trains_what_its_runs_need_first(name, dataset, tmp_path, capsys):
    args = reproduce.get_args_parser().parse_args([name, "--dataset", dataset, "--budget", "tiny", "--runs-root",
                                                   str(tmp_path), "--dry-run"])
    reproduce.main(args)
    printed = capsys.readouterr().out.splitlines()
    position = {line.split()[2]: i for i, line in enumerate(printed) if line.split()[1] in ("train", "gen_gmm")}
    for run in reproduce.table_runs(reproduce.TABLES[name], dataset):
        assert run in position, printed
        for _, need in model_paths.run_needs(run):
            assert position[need] < position[run], printed  # trained (or fitted) before the run that needs it
            assert run in printed[position[need]].partition("needed by ")[2]


def test_digits_prood_trains_its_oe_classifier_first_and_dry_run_says_so(tmp_path, capsys):
    reproduce.main(reproduce.get_args_parser().parse_args(["ccu-table2", "--dataset", "digits", "--budget", "tiny",
                                                           "--runs-root", str(tmp_path), "--dry-run"]))
    printed = capsys.readouterr().out.splitlines()
    assert printed[-4:] == ["8. train good80-s0 (missing)", "9. train oe-s0 (missing; needed by prood-s0)",
                            "10. train prood-s0 (missing)", "11. evaluate.py"]
    assert "6. gen_gmm gmm-s0 (needed by ccu-s0)" in printed


def test_a_table_without_the_entry_its_study_needs_is_refused(tmp_path, capsys):
    from utils import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(reproduce.main, reproduce.get_args_parser(), ["ccu-table1", "--dataset", "moons", "--budget", "tiny",
                                                              "--runs-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().partition(": error: ")[2] == ("ccu-table1 needs a CCU entry, which "
                                               "model_paths.MODEL_PATHS has not for moons; datasets it runs on: "
                                               "CIFAR10, CIFAR100, FMNIST, MNIST, SVHN, digits")
    assert not any(tmp_path.iterdir())


def test_train_only_makes_what_each_run_needs_first(tmp_path):
    args = reproduce.get_args_parser().parse_args(["--train-only", "--dataset", "digits", "--runs-root", str(tmp_path)])
    steps = reproduce.plan(args, reproduce.chosen_table(args), reproduce.BUDGETS[args.budget])
    names = [step.argv[step.argv.index("--name") + 1] for step in steps]
    assert names == ["plain-s0", "gan-s0", "ceda-s0", "acet-s0", "ddu-s0", "gmm-s0", "ccu-s0", "good80-s0", "oe-s0",
                     "prood-s0"]
