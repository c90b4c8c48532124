"""Nothing lost, nothing misleading: resume semantics, numbers checked before any folder is made, NaN-loss
stop, user errors as one line with exit 2, file modes, a full disk, the start summary and the logged lr."""
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gen_attack_stats
import gen_gmm
import models
import train
from utils import checkpoints, cli, training
from utils.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--max-batches", "2", "--no-progress"]


def cli_train(argv):
    """train.py as the command line runs it (cli.run: one line and exit 2 on a user error)."""
    return cli.run(train.main, train.get_args_parser(), argv)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def interrupt_at_epoch(monkeypatch, stop_epoch: int) -> None:
    """Make train_epoch raise KeyboardInterrupt when epoch `stop_epoch` (1-based) starts: a kill between epochs."""
    real, calls = training.train_epoch, {"n": 0}

    def train_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", train_epoch)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    """A 2-epoch digits run with a non-default lr and data root, interrupted after its first epoch."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupt_at_epoch(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            train.main(train.get_args_parser().parse_args(
                ["--dataset", "digits", "--name", "half", "--epochs", "2", "--lr", "0.002", "--runs-root", str(root),
                 "--data-root", "my-data", *FAST]))
    run_dir = root / "digits" / "half"
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 1
    return run_dir


@pytest.fixture
def run_copy(half_run, tmp_path) -> Path:
    target = tmp_path / "runs" / "digits" / "half"
    shutil.copytree(half_run, target)
    return target


def test_resume_continues_the_saved_config_and_records_an_allowed_change(run_copy, capsys):
    runs_root = str(run_copy.parent.parent)
    # no --dataset, --epochs, --lr or --data-root: all come from config.json (not digits' 15 epochs, lr 1e-3)
    cli_train(["--name", "half", "--resume", "--runs-root", runs_root, "--no-progress"])
    assert [row["epoch"] for row in read_log(run_copy)] == [1, 2]
    config = json.loads((run_copy / "config.json").read_text())
    assert config["epochs"] == 2 and config["lr"] == 0.002 and config["max_batches"] == 2
    assert config["data_root"] == "my-data"
    assert config["resumes"][0]["after_epoch"] == 1 and config["resumes"][0]["changes"] == {}
    # an allowed change is applied and recorded in config.json and in the log row of the epoch it affected
    cli_train(["--name", "half", "--resume", "--runs-root", runs_root, "--epochs", "3", "--max-batches", "1",
               "--no-progress"])
    log = read_log(run_copy)
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert log[2]["resumed"] == {"after_epoch": 2, "changes": {"epochs": [2, 3], "max_batches": [2, 1]}}
    config = json.loads((run_copy / "config.json").read_text())
    assert config["epochs"] == 3 and config["max_batches"] == 1
    assert config["resumes"][-1]["changes"] == {"epochs": [2, 3], "max_batches": [2, 1]}
    assert torch.load(run_copy / "model.pt", weights_only=True)["epoch"] == 3
    assert "resuming after epoch 2 (epochs 2 -> 3; max_batches 2 -> 1)" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--lr", "0.5"), ("--method", "ceda"), ("--seed", "1"),
                                         ("--arch", "mlp"), ("--optimizer", "sgd"), ("--out-frac", "0.5")])
def test_resume_refuses_an_unsafe_change_naming_the_flag(run_copy, capsys, flag, value):
    before = (run_copy / "model.pt").read_bytes(), (run_copy / "config.json").read_text()
    name = ["--name", "half"]
    with pytest.raises(SystemExit) as exit_info:
        cli_train([*name, "--resume", "--runs-root", str(run_copy.parent.parent), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {value} differs from the run's" in err[0], err
    assert ((run_copy / "model.pt").read_bytes(), (run_copy / "config.json").read_text()) == before


def test_a_renamed_copy_resumes_in_its_own_folder(half_run, tmp_path):
    original = tmp_path / "runs" / "digits" / "half"
    shutil.copytree(half_run, original)
    copy = original.parent / "renamed"
    shutil.copytree(original, copy)
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}
    cli_train(["--dataset", "digits", "--name", "renamed", "--resume", "--runs-root", str(tmp_path / "runs"),
               "--no-progress"])
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    assert [row["epoch"] for row in read_log(copy)] == [1, 2]
    checkpoint = torch.load(copy / "model.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["name"] == "renamed"
    assert json.loads((copy / "config.json").read_text())["resumes"][0]["changes"] == {"name": ["half", "renamed"]}


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--max-batches", "-3", "--max-batches must be an integer >= 1"),
    ("--lr", "-0.1", "--lr must be > 0"),
    ("--lr", "nan", "--lr must be > 0, got nan"),
    ("--val-fraction", "1.5", "--val-fraction must be in [0, 1), got 1.5"),
    ("--milestones", "0.5 2", "--milestones must be in [0, 1]"),
    ("--attack-eps", "-1", "--attack-eps must be >= 0"),
])
def test_a_bad_number_leaves_no_folder_and_the_corrected_run_works(tmp_path, capsys, flag, value, expected):
    argv = ["--dataset", "digits", "--epochs", "1", "--runs-root", str(tmp_path), *FAST]
    with pytest.raises(SystemExit) as exit_info:
        cli_train([*argv, flag, *value.split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "digits").exists()
    if flag == "--epochs":  # the corrected command is not blocked by anything the failed one left
        cli_train(argv)
        assert [row["epoch"] for row in read_log(tmp_path / "digits" / "plain-s0")] == [1]


def test_missing_data_exits_2_with_one_line_and_leaves_no_folder(tmp_path, capsys):
    argv = ["--dataset", "MNIST", "--data-root", str(tmp_path / "nothing"), "--runs-root", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        cli_train(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MNIST" in err[0] and str(tmp_path / "nothing") in err[0], err
    assert not (tmp_path / "runs").exists()


def _nan_at(epoch: int, step: int, batches_per_epoch: int):
    """plain's loss, NaN at one (epoch, step) (1-based)."""
    plain, calls = METHODS["plain"].loss, {"n": 0}

    def loss(model, x, y, x_out, opts):
        calls["n"] += 1
        value, logits = plain(model, x, y, x_out, opts)
        if calls["n"] == (epoch - 1) * batches_per_epoch + step:
            value = value * float("nan")
        return value, logits

    return dataclasses.replace(METHODS["plain"], loss=loss)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    argv = ["--dataset", "digits", "--epochs", "3", "--max-batches", "4", "--no-progress",
            "--runs-root", str(tmp_path)]
    monkeypatch.setitem(METHODS, "plain", _nan_at(epoch=2, step=3, batches_per_epoch=4))
    with pytest.raises(SystemExit) as exit_info:
        cli_train(argv)
    assert exit_info.value.code == train.EXIT_DIVERGED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "became nan at epoch 2, step 3" in err[0], err
    run_dir = tmp_path / "digits" / "plain-s0"
    assert f"the last good checkpoint {run_dir / 'model.pt'} (epoch 1) is kept" in err[0]
    checkpoint = torch.load(run_dir / "model.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert [row["epoch"] for row in read_log(run_dir)] == [1]


def test_nan_in_the_first_epoch_leaves_nothing_that_blocks_the_corrected_run(tmp_path, capsys, monkeypatch):
    argv = ["--dataset", "digits", "--epochs", "1", "--runs-root", str(tmp_path), *FAST]
    monkeypatch.setitem(METHODS, "plain", _nan_at(epoch=1, step=1, batches_per_epoch=2))
    with pytest.raises(SystemExit):
        cli_train(argv)
    assert "no checkpoint was written" in capsys.readouterr().err
    monkeypatch.undo()
    run_dir = cli_train(argv)
    assert [row["epoch"] for row in read_log(run_dir)] == [1]


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, "train.py", "--dataset", "MNIST", "--data-root", str(tmp_path), "--runs-root",
            str(tmp_path / "runs")]
    plain = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("train.py: error: "), plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*argv, "--debug"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "DatasetNotFoundError" in debug.stderr


class _Foreign:  # a pickled object: loading it would run code
    pass


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "unreadable checkpoint"),
    ("foreign", "refusing to load"),
    ("config", "config.json is unreadable"),
])
def test_bad_checkpoint_or_config_on_resume_is_one_line(run_copy, capsys, damage, expected):
    if damage == "garbage":  # a checkpoint cut short
        (run_copy / "model.pt").write_bytes((run_copy / "model.pt").read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"model": _Foreign(), "config": {}}, run_copy / "model.pt")
    else:
        (run_copy / "config.json").write_text('{"method": "plain", "arch": ')
    with pytest.raises(SystemExit) as exit_info:
        cli_train(["--name", "half", "--resume", "--runs-root", str(run_copy.parent.parent), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert "weights_only" not in err[0]


def test_unknown_names_exit_2_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_train(["--dataset", "nope", "--runs-root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset 'nope'; valid:" in err[0] and "digits" in err[0]
    assert not any(tmp_path.iterdir())


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--epochs", "1", "--runs-root", str(tmp_path), *FAST]))
    finally:
        os.umask(old)
    for name in ("config.json", "model.pt", "log.jsonl"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name


def test_no_space_left_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from utils import runs

    real_write, calls = runs.write_and_sync, {"n": 0}

    def write_and_sync(fd, tmp, content):  # the second checkpoint hits a full disk half-way
        if tmp.name.startswith(".model.pt."):
            calls["n"] += 1
            if calls["n"] == 2:
                os.write(fd, bytes(content)[: len(content) // 2])
                os.close(fd)
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, tmp, content)

    monkeypatch.setattr(runs, "write_and_sync", write_and_sync)
    with pytest.raises(SystemExit) as exit_info:
        cli_train(["--dataset", "digits", "--epochs", "3", "--runs-root", str(tmp_path), *FAST])
    assert exit_info.value.code == 2
    run_dir = tmp_path / "digits" / "plain-s0"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"No space left on {run_dir}; the last checkpoint {run_dir / 'model.pt'} is intact" \
        in err[0], err
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "log.jsonl", "model.pt", "tb"]


def test_logged_lr_is_the_lr_the_epoch_trained_at_and_the_start_is_summarised(tmp_path, capsys):
    run_dir = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--epochs", "2", "--milestones", "0.5", "--gamma", "0.1", "--runs-root",
         str(tmp_path), *FAST]))
    assert [row["lr"] for row in read_log(run_dir)] == pytest.approx([1e-3, 1e-4])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{run_dir}: plain on digits, arch lenet, adam lr 0.001, 2 epochs (at most 2 batches each) "
                      "of batch 64, seed 0, device cpu")
    assert out[1] == f"full configuration: {run_dir / 'config.json'}"


@pytest.mark.parametrize("argv, expected", [
    (["--n-components", "0"], "--n-components must be an integer >= 1, got 0"),
    (["--tol", "0"], "--tol must be > 0"),
])
def test_gen_gmm_checks_numbers_before_making_a_folder(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(gen_gmm.main, gen_gmm.get_args_parser(), ["--dataset", "digits", "--runs-root", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gen_gmm_failed_fit_leaves_no_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(gen_gmm.main, gen_gmm.get_args_parser(), ["--dataset", "digits", "--runs-root", str(tmp_path),
                                                         "--n-in", "5", "--n-components", "10", "--no-augment"])
    assert exit_info.value.code == 2
    assert "cannot fit 10 components" in capsys.readouterr().err
    assert not (tmp_path / "digits").exists()


@pytest.mark.parametrize("study, argv, expected", [
    ("ccu", ["--n-seeds", "0"], "--n-seeds must be an integer >= 1, got 0"),
    ("ccu", ["--steps", "-5"], "--steps must be an integer >= 0, got -5"),
    ("alpha", ["--n", "0"], "--n must be an integer >= 1"),
    ("alpha", ["--target", "1.5"], "--target must be in (0, 1)"),
    ("audit", ["--n-directions", "0"], "--n-directions must be an integer >= 1"),
])
def test_studies_check_numbers_first(tmp_path, capsys, study, argv, expected):
    full = ["--study", study, "--dataset", "digits", "--runs-root", str(tmp_path), "--results-root",
            str(tmp_path / "results"), *argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(gen_attack_stats.run_study, gen_attack_stats.get_args_parser(study), full)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not any(tmp_path.iterdir())


def test_alpha_study_shows_progress_and_keeps_the_old_results_flag(tmp_path, capsys):
    config = {"arch": "lenet", "num_classes": 10, "in_channels": 1, "input_size": 8}
    run_dir = tmp_path / "runs" / "digits" / "plain-s0"
    checkpoints.save_checkpoint(run_dir / "model.pt", {"model": models.build_model(config).state_dict(),
                                                  "config": config, "epoch": 0})
    gen_attack_stats.main(["--study", "alpha", "--dataset", "digits", "--runs", str(run_dir), "--n", "20",
                           "--alpha-max", "1e4", "--results", str(tmp_path / "results"), "--device", "cpu",
                           "--progress"])  # forced: bars are off by default where stderr is not a terminal
    err = capsys.readouterr().err
    assert "warning: --results is deprecated; use --results-root" in err
    assert "models: 100%" in err  # tqdm over the studied networks
    rows = (tmp_path / "results" / "attacks" / "digits_alpha.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["n"] == 20


def test_no_path_of_a_development_machine_in_the_sources():
    import re

    pattern = re.compile(r"(?<![\w.])/(?:work|root|home)/")
    skip = {".venv", ".git", "runs", "results", "datasets", "__pycache__", ".pytest_cache"}
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if name not in skip]
        for name in files:
            path = Path(folder) / name
            if path.suffix in (".py", ".md", ".ipynb", ".txt", ".cfg", ".toml"):
                found += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if pattern.search(line)]
    assert found == []
