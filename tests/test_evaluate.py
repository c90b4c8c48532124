"""evaluate.py end to end on a tiny digits run: rows, cached scores, metrics, tables, errors."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import evaluate
import model_paths
import train
from model_paths import TableEntry


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--epochs", "2", "--runs-root", str(root), "--no-progress"]))
    return root


def run_eval(argv):
    evaluate.main(evaluate.get_args_parser().parse_args([*argv, "--no-progress", "--no-print"]))


def test_rows_scores_and_table(digits_run, tmp_path, monkeypatch):
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits",
                        [TableEntry("Base", ("plain-s0",)), TableEntry("Energy", ("plain-s0",), "energy")])
    results = tmp_path / "results"
    run_eval(["--dataset", "digits", "--runs-root", str(digits_run), "--results-root", str(results),
              "--ood", "uniform,natural_patches", "--n-ood", "300"])
    rows = [json.loads(line) for line in (results / "ood" / "digits.jsonl").read_text().splitlines()]
    assert {(r["label"], r["ood"]) for r in rows} == {
        (label, ood) for label in ("Base", "Energy") for ood in ("uniform", "natural_patches")}
    base = next(r for r in rows if r["label"] == "Base" and r["ood"] == "uniform")
    assert base["n_out"] == 300 and base["n_in"] == 360 and base["detector"] == "msp"
    assert {"auroc", "aupr_in", "aupr_out", "fpr95", "detection_error", "mmc", "mmc_in", "accuracy", "ece",
            "nll", "git_sha", "date", "checkpoint"} <= set(base)
    # the row's AUROC equals scikit-learn's on the cached confidences
    cache = np.load(next((results / "scores" / "digits").glob("plain-s0__Base__msp__*.npz")))
    labels = np.r_[np.ones(len(cache["in"])), np.zeros(len(cache["uniform"]))]
    assert base["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[cache["in"], cache["uniform"]]), abs=1e-12)
    assert base["mmc"] == pytest.approx(cache["uniform__maxprob"].mean())
    # MSP confidences are max-probabilities; energy differs from them but shares the model's MMC
    energy = next(r for r in rows if r["label"] == "Energy" and r["ood"] == "uniform")
    assert energy["mmc"] == pytest.approx(base["mmc"]) and energy["auroc"] != base["auroc"]
    table = (results / "tables" / "digits_ood.md").read_text()
    assert "| uniform |" in table and "Base (TE" in table and "convention: id" in table
    assert f"{100 * base['auroc']:.1f}/{100 * base['fpr95']:.1f}/{100 * base['mmc']:.1f}" in table
    # the table is rebuilt from rows alone, and the ODIN layout lists every metric
    run_eval(["--dataset", "digits", "--results-root", str(results), "--table", "--layout", "odin"])
    odin = (results / "tables" / "digits_odin.md").read_text()
    assert odin.count("| uniform |") == 5 and (results / "tables" / "digits_odin.tex").exists()


def test_runs_flag_and_extra_detectors(digits_run, tmp_path):
    run_dir = digits_run / "digits" / "plain-s0"
    run_eval(["--dataset", "digits", "--runs", str(run_dir), "--detectors", "maxlogit,entropy",
              "--results-root", str(tmp_path), "--ood", "uniform", "--n-ood", "100", "--table-name", "t"])
    rows = [json.loads(line) for line in (tmp_path / "ood" / "digits_adhoc_t.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in rows) == ["plain-s0:entropy", "plain-s0:maxlogit"]
    # one label rule whatever the number of detectors: a single detector is labelled the same way
    run_eval(["--runs", str(run_dir), "--results-root", str(tmp_path), "--ood", "uniform", "--n-ood", "100",
              "--table-name", "one"])
    rows = [json.loads(line) for line in (tmp_path / "ood" / "digits_adhoc_one.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["plain-s0:msp"] and rows[0]["dataset"] == "digits"


def test_bad_names_and_missing_sets(digits_run, tmp_path):
    with pytest.raises(ValueError, match="unknown detector 'nope'; valid: .*msp"):
        run_eval(["--dataset", "digits", "--runs-root", str(digits_run), "--detectors", "nope"])
    with pytest.raises(ValueError, match="unknown dataset"):
        run_eval(["--dataset", "nope"])
    with pytest.raises(FileNotFoundError, match="--download"):
        run_eval(["--dataset", "digits", "--runs", str(digits_run / "digits" / "plain-s0"), "--ood", "FMNIST",
                  "--data-root", str(tmp_path), "--results-root", str(tmp_path)])
    run_eval(["--dataset", "digits", "--runs", str(digits_run / "digits" / "plain-s0"), "--ood", "FMNIST,uniform",
              "--n-ood", "50", "--table-name", "t",
              "--data-root", str(tmp_path), "--results-root", str(tmp_path), "--skip-missing"])
    rows = (tmp_path / "ood" / "digits_adhoc_t.jsonl").read_text()
    assert '"ood": "uniform"' in rows and "FMNIST" not in rows
    with pytest.raises(FileNotFoundError, match="no result rows"):
        run_eval(["--dataset", "digits", "--results-root", str(tmp_path / "empty"), "--table"])


def test_odin_protocol_tuning_holds_out_the_tuning_images(digits_run, tmp_path):
    run_eval(["--dataset", "digits", "--runs", str(digits_run / "digits" / "plain-s0"), "--detectors", "msp,odin",
              "--tune-ood", "uniform", "--tune-n", "60", "--ood", "natural_patches", "--n-ood", "200",
              "--results-root", str(tmp_path), "--table-name", "t"])
    rows = [json.loads(line) for line in (tmp_path / "ood" / "digits_adhoc_t.jsonl").read_text().splitlines()]
    odin = [r for r in rows if r["detector"] == "odin"]
    assert {r["ood"] for r in odin} == {"natural_patches", "uniform"}  # the tuning set is evaluated too ...
    assert all(r["n_in"] == 360 - 60 for r in rows)                     # ... on what tuning did not see
    assert next(r for r in odin if r["ood"] == "uniform")["n_out"] == 200 - 60
    tuned = odin[0]["options"]["tuned"]
    assert tuned["criterion"] == "fpr95" and tuned["temperature"] in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    assert all("tuned" not in r["options"] for r in rows if r["detector"] == "msp")


def test_ddu_rows_temperature_summary_and_table(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for seed in (0, 1):  # two seeds with a 10% validation split, as DDU trains
        train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--epochs", "2", "--seed", str(seed), "--val-fraction", "0.1",
             "--runs-root", str(runs), "--no-progress"]))
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits", [
        TableEntry("Softmax", ("plain-s0", "plain-s1"), "ddu", {"score": "softmax_entropy"}),
        TableEntry("DDU", ("plain-s0", "plain-s1"), "ddu"),
        TableEntry("DE", ("plain-s0", "plain-s1"), "ensemble", {"score": "entropy"})])
    results = tmp_path / "results"
    run_eval(["--dataset", "digits", "--runs-root", str(runs), "--results-root", str(results), "--ood", "uniform",
              "--n-ood", "200", "--layout", "ddu"])
    rows = [json.loads(line) for line in (results / "ood" / "digits.jsonl").read_text().splitlines()]
    softmax = [r for r in rows if r["label"] == "Softmax"]
    assert sorted(r["seed"] for r in softmax) == [0, 1]
    assert all(0.1 <= r["temperature"] <= 10.0 and r["t_nll"] <= r["nll"] + 1e-6 for r in softmax)
    assert all(r["n_in"] == 360 for r in rows)
    ensemble = next(r for r in rows if r["label"] == "DE")
    assert ensemble["run"] == "plain-s0+plain-s1"
    assert ensemble["temperature"] == [softmax[0]["temperature"], softmax[1]["temperature"]]  # one per member
    summary = json.loads((results / "ddu" / "digits_DDU.json").read_text())
    assert {"accuracy", "ece", "t_accuracy", "t_ece", "auroc", "t_auroc", "info"} <= set(summary)
    aurocs = [r["auroc"] for r in rows if r["label"] == "DDU"]
    assert summary["accuracy"]["n"] == 2
    assert summary["auroc"]["uniform"]["mean"] == pytest.approx(np.mean(aurocs))
    assert summary["auroc"]["uniform"]["std"] == pytest.approx(np.std(aurocs, ddof=1) / np.sqrt(2))
    table = (results / "tables" / "digits_ddu.md").read_text()
    assert "DDU" in table and "Softmax" in table and "DE" in table


def test_mc_dropout_rows_do_not_depend_on_what_ran_before(tmp_path, monkeypatch):
    """MC-dropout masks used to come from whatever state the global RNG was in: reproduce.py's evaluation after
    training in the same process and its re-run in a fresh one gave different MCD AUROCs (56.5 vs 56.3)."""
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--epochs", "1", "--max-batches", "5", "--dropout", "0.5", "--name", "mcd-s0",
         "--runs-root", str(tmp_path / "runs"), "--no-progress"]))
    monkeypatch.setitem(model_paths.MODEL_PATHS, "digits",
                        [TableEntry("MCD", ("mcd-s0",), "mcdropout", {"samples": 5, "score": "variance"})])
    aurocs = []
    for draws in (0, 1000):
        torch.rand(draws)  # what an earlier step of the same process would have drawn
        results = tmp_path / f"results{draws}"
        run_eval(["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), "--results-root", str(results),
                  "--ood", "uniform,natural_patches", "--n-ood", "200"])
        rows = [json.loads(line) for line in (results / "ood" / "digits.jsonl").read_text().splitlines()]
        aurocs.append({row["ood"]: row["auroc"] for row in rows})
    assert aurocs[0] == aurocs[1] and 0.0 < min(aurocs[0].values())


def test_skip_missing_ood_and_its_old_spelling(digits_run, tmp_path, capsys):
    """--skip-missing-ood skips OOD sets whose files are missing; the old --skip-missing does the same and warns once."""
    parser = evaluate.get_args_parser()
    for argv, expected, warned in ([[], False, False], [["--skip-missing-ood"], True, False],
                                   [["--no-skip-missing-ood"], False, False], [["--skip-missing"], True, True],
                                   [["--skip-missing", "--no-skip-missing"], False, True]):
        assert parser.parse_args(argv).skip_missing_ood is expected, argv
        err = capsys.readouterr().err
        assert err.count("deprecated") == (len(argv) if warned else 0), (argv, err)
    assert "--skip-missing-ood" in parser.format_help() and "--skip-missing " not in parser.format_help()
    run_eval(["--dataset", "digits", "--runs", str(digits_run / "digits" / "plain-s0"), "--ood", "FMNIST,uniform",
              "--n-ood", "50", "--table-name", "t", "--data-root", str(tmp_path), "--results-root", str(tmp_path),
              "--skip-missing-ood"])
    assert "skipping OOD set FMNIST" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "ood" / "digits_adhoc_t.jsonl").read_text().splitlines()]
    assert {row["ood"] for row in rows} == {"uniform"}, {row["ood"] for row in rows}
