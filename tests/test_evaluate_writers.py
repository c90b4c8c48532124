"""evaluate.py as a writer next to others and at the edge of its inputs: concurrent evaluations of one run lose no
row, a full disk at the score cache is one line with no temporary file left, runs and OOD sets that would share a
name are refused, and bad numbers, folders and files end in one line (exit 2) before any model is loaded."""
import errno
import json
import multiprocessing
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

import data
import evaluate
import reproduce
import train
from utils import cli, evaluation, methods, runs, tables
from utils.scoring import SetScores

FAST = ["--ood", "uniform", "--n-ood", "60", "--no-progress", "--no-print"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--epochs", "1", "--max-batches", "3", "--runs-root", str(root), "--no-progress"]))
    return root / "digits" / "plain-s0"


def run_cli(argv, capsys):
    """evaluate.py as from the command line: (exit status, stderr)."""
    try:
        cli.run(evaluate.main, evaluate.get_args_parser(), argv)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- item 7: concurrent writers ----------------------------------------------------------------------------------

def _evaluate_in_child(argv: list[str]) -> None:
    """A child process: evaluate.py's main as from the command line; its exit status is the process's."""
    try:
        cli.run(evaluate.main, evaluate.get_args_parser(), argv)
    except SystemExit as exit_info:
        os._exit(exit_info.code if isinstance(exit_info.code, int) else 1)
    except BaseException:  # noqa: BLE001 (a traceback in a child: a failed process)
        os._exit(1)
    os._exit(0)


def test_three_concurrent_evaluations_of_one_run_keep_every_row(run_dir, tmp_path):
    """Three processes score the same run and detector (so the same score-cache name) into one ad-hoc table,
    each with its own OOD set: every process succeeds and every row is there. The processes are forked from
    this one (torch already imported) so that they start together and the test stays fast."""
    results = tmp_path / "results"
    sets = ("uniform", "gaussian", "natural_patches")
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_evaluate_in_child, args=(
        ["--runs", str(run_dir), "--ood", name, "--n-ood", "60", "--results-root", str(results), "--table-name",
         "race", "--no-progress", "--no-print"],)) for name in sets]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    rows = rows_of(results / "ood" / "digits_adhoc_race.jsonl")
    assert sorted(row["ood"] for row in rows) == sorted(sets)
    assert all(row["n_out"] == 60 and 0.0 <= row["auroc"] <= 1.0 for row in rows)
    # one cache file per set of OOD sets, each complete; no temporary file left anywhere
    caches = sorted((results / "scores" / "digits").glob("plain-s0__plain-s0:msp__msp__*.npz"))
    assert len(caches) == 3 and {tuple(sorted(np.load(c).files)) for c in caches} == {
        tuple(sorted(("in", "in__maxprob", name, f"{name}__maxprob"))) for name in sets}
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_interleaved_cache_writes_of_one_file_both_succeed(tmp_path, monkeypatch):
    """A second writer of the same cache file that renames its file while the first is about to rename its own
    (what a concurrent process does) must not make the first fail: each has a temporary file of its own."""
    path = tmp_path / "scores" / "r__l__msp__abc.npz"
    path.parent.mkdir(parents=True)
    scores = {"in": SetScores(confidences={"k": torch.arange(4.0)}, probs=torch.full((4, 2), 0.5)),
              "uniform": SetScores(confidences={"k": torch.zeros(3)}, probs=torch.full((3, 2), 0.5))}
    original, calls = os.replace, []

    def replace_after_another_writer(src, dst, *args, **kwargs):
        calls.append(str(src))
        if len(calls) == 1:
            evaluation.cache_scores(path, scores, "k")  # the other process, in between
        return original(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    evaluation.cache_scores(path, scores, "k")
    assert len(calls) == 2 and calls[0] != calls[1]
    assert np.load(path)["in"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_ddu_summary_holds_the_runs_of_every_evaluation_of_its_label(run_dir, tmp_path):
    """Two evaluations of one label (here one after the other, as two processes finishing in turn) leave a
    summary of both, as the table shows both: the summary is built from the stored rows, not the last call's."""
    results = tmp_path / "results"
    for name in ("uniform", "gaussian"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--runs", str(run_dir), "--results-root", str(results), "--table-name", "t", *FAST, "--ood", name]))
    summary = json.loads((results / "ddu" / "digits_plain-s0_msp.json").read_text())
    assert sorted(summary["auroc"]) == ["gaussian", "uniform"]
    stored = {row["ood"]: row["auroc"] for row in rows_of(results / "ood" / "digits_adhoc_t.jsonl")}
    assert {ood: s["mean"] for ood, s in summary["auroc"].items()} == pytest.approx(stored)


# --- item 10: a full disk at the score cache --------------------------------------------------------------------

def test_full_disk_at_the_score_cache_is_one_line_and_leaves_no_temporary_file(run_dir, tmp_path, monkeypatch,
                                                                                capsys):
    def write_half_then_fill_the_disk(fd, tmp, content):
        with os.fdopen(fd, "wb") as handle:
            handle.write(content[: len(content) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(runs, "write_and_sync", write_half_then_fill_the_disk)
    results = tmp_path / "results"
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(results), *FAST], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "No space left on" in err and str(results / "scores" / "digits") in err and "score cache" in err
    assert list((results / "scores" / "digits").iterdir()) == []  # no 0-byte or half-written temporary file


def test_an_os_error_named_with_its_run_keeps_its_errno():
    """The error re-raised with the run's name keeps errno and file, so a full disk stays a one-line message."""
    named = evaluation.naming_run(OSError(errno.ENOSPC, "No space left on device", "x.npz"), ("runs/a",))
    assert named.errno == errno.ENOSPC and named.filename == "x.npz" and "runs/a" in str(named)
    assert cli.user_message(named) == "No space left on x.npz; free some space and run the command again"


# --- item 8: one name, one thing --------------------------------------------------------------------------------

def test_two_run_folders_of_one_name_are_refused(run_dir, tmp_path, capsys):
    other = tmp_path / "b" / "digits" / "plain-s0"
    shutil.copytree(run_dir, other)  # same name, another folder
    results = tmp_path / "results"
    code, err = run_cli(["--runs", str(run_dir), str(other), "--results-root", str(results), *FAST], capsys)
    assert code == 2 and "two run folders are named 'plain-s0'" in err and str(other) in err
    assert not results.exists()
    # the same folder given twice is one run, scored once
    code, err = run_cli(["--runs", str(run_dir), str(run_dir), "--results-root", str(results), *FAST], capsys)
    assert code == 0
    assert [row["label"] for row in rows_of(next((results / "ood").glob("*.jsonl")))] == ["plain-s0:msp"]


def test_one_ood_name_for_two_sets_is_refused(run_dir, tmp_path, capsys):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(first, x=np.zeros((5, 8, 8), np.uint8))
    np.savez(second, x=np.full((5, 8, 8), 255, np.uint8))
    with pytest.raises(data.PathSetError, match=r"two OOD sets are named 'mine'"):
        data.unique_sets([f"mine={first}", "uniform", f"mine={second}"])
    assert data.unique_sets(["uniform", f"mine={first}", "uniform", f"mine={first}"]) == ["uniform", f"mine={first}"]
    results = tmp_path / "results"
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(results), *FAST,
                         "--ood", f"mine={first},mine={second}"], capsys)
    assert code == 2 and "two OOD sets are named 'mine'" in err and not results.exists()
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(results), *FAST, "--ood", "uniform",
                         "--detectors", "odin", "--tune-ood", f"uniform2={first}", "--ood", f"uniform2={second}"],
                        capsys)
    assert code == 2 and "two OOD sets are named 'uniform2'" in err


# --- item 11: one line, exit 2, before any model is loaded ------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--n-ood", "-5"], "--n-ood must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--attack-eps", "-0.1", "--adv-sets", "adv_noise"], "--attack-eps must be >= 0, got -0.1"),
    (["--tune-n", "0"], "--tune-n must be an integer >= 1, got 0"),
    (["--n-ood", str(10**20)], f"--n-ood must be at most 1000000, got {10**20}"),
    (["--seed", str(2**64)], f"--seed must be an integer in [0, 2**63 - 1], got {2**64}"),
])
def test_numbers_are_checked_before_any_model_is_loaded(run_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(methods, "load_run", lambda *a, **k: pytest.fail("a model was loaded"))
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(tmp_path / "r"), *FAST, *flags], capsys)
    assert code == 2 and err.endswith(f": error: {message}\n") and len(err.splitlines()) == 1


def test_results_root_that_is_a_file_or_not_writable(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "load_run", lambda *a, **k: pytest.fail("a model was loaded"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(a_file), *FAST], capsys)
    assert code == 2 and err.endswith(f": error: --results-root {a_file} is a file; give a folder (it is made "
                                      "if missing)\n")
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(a_file / "sub"), *FAST], capsys)
    assert code == 2 and f"{a_file} is a file, so no folder can be made there" in err
    # tests run as root, who may write anywhere: the permission check is asked through os.access
    locked_folder = tmp_path / "locked"
    (locked_folder / "ood").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked_folder / "ood")
                        else real_access(p, mode))
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(locked_folder), *FAST], capsys)
    assert code == 2 and f"no permission to write in {locked_folder / 'ood'}" in err


def test_reserved_and_unreadable_ood_files_are_one_line(run_dir, tmp_path, capsys):
    good, bad_member, not_zip = tmp_path / "good.npz", tmp_path / "member.npz", tmp_path / "notzip.npz"
    np.savez(good, x=np.zeros((5, 8, 8), np.uint8))
    with zipfile.ZipFile(bad_member, "w") as archive:
        archive.writestr("x.npy", b"these bytes are not a .npy file")
    not_zip.write_bytes(b"hello world" * 10)
    argv = ["--runs", str(run_dir), "--results-root", str(tmp_path / "r"), *FAST]
    code, err = run_cli([*argv, "--ood", f"in={good}"], capsys)
    assert code == 2 and "the NAME 'in' is reserved" in err
    code, err = run_cli([*argv, "--ood", f"m={bad_member}"], capsys)
    assert code == 2 and err.endswith(f": error: {bad_member}: its member x.npy is not a .npy array file; "
                                      "save the images with np.savez(path, x=images)\n")
    code, err = run_cli([*argv, "--ood", f"z={not_zip}"], capsys)
    assert code == 2 and "not a readable .npz file (it is neither a zip archive" in err
    assert "allow_pickle" not in err and "pickle.load" not in err


def test_table_with_an_unknown_label_lists_the_known_ones(run_dir, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--runs", str(run_dir), "--results-root", str(results), "--table-name", "t"]
    evaluate.main(evaluate.get_args_parser().parse_args([*argv, *FAST]))
    code, err = run_cli([*argv, "--table", "--labels", "zzz", "--no-print"], capsys)
    assert code == 2 and "unknown label(s) 'zzz'" in err and err.rstrip().endswith("known: plain-s0:msp")
    with pytest.raises(FileNotFoundError, match="no result rows"):  # no rows at all: that is what it says
        tables.write_tables("digits", tmp_path / "empty", "ccu", ["auroc"], ["zzz"])


def test_reproduce_without_a_table_is_a_one_line_user_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(reproduce.main, reproduce.get_args_parser(), [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--runs" not in err
    assert ": error: name a table: one of acet-alpha, " in err and "--list" in err and len(err.splitlines()) == 1


def test_reproduce_refuses_one_ood_name_for_two_sets_before_training(tmp_path, capsys):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(first, x=np.zeros((5, 8, 8), np.uint8))
    np.savez(second, x=np.full((5, 8, 8), 255, np.uint8))
    argv = ["acet-table1", "--dataset", "digits", "--budget", "tiny", "--runs-root", str(tmp_path / "runs"),
            "--results-root", str(tmp_path / "results"), "--device", "cpu", "--ood", f"m={first}", f"m={second}"]
    with pytest.raises(SystemExit) as exit_info:  # refused when the command line is read
        reproduce.main(reproduce.get_args_parser().parse_args(argv))
    assert exit_info.value.code == 2 and "two OOD sets are named 'm'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_an_empty_ood_list_is_refused_when_the_command_line_is_read(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "load_run", lambda *a, **k: pytest.fail("a model was loaded"))
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(tmp_path / "r"), "--ood", ","], capsys)
    assert code == 2 and err.endswith(": error: argument --ood: ',' names no set; give data keys or NAME=PATH\n")


def test_an_unwritable_folder_below_the_results_root_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """A folder deeper than the results root's own (e.g. scores/<DATASET>/, made read-only by hand) ended in a
    PermissionError traceback; tests run as root, so the refusal of the file system is simulated."""
    locked = tmp_path / "r" / "scores" / "digits"

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(locked))

    monkeypatch.setattr(evaluation, "write_atomically", refuse)
    code, err = run_cli(["--runs", str(run_dir), "--results-root", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith(f": error: permission denied: {locked}; make it writable (or pass another --results-root / "
                        "--runs-root)\n")
