"""Trust boundaries of run folders (issue 18, items 1-6 and 11): a run name stays under its runs root, a batch
that trains nothing is refused, a checkpoint of another run is refused by every reader, --resume of a run
without a checkpoint starts it, damaged checkpoints and hand-edited configs give one line and change nothing."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import gen_gmm
import reproduce
import train
from utils import cli, methods
from utils.checkpoints import CheckpointError
from utils.plots import gan as gan_plot
from utils.resume import run_state

FAST = ["--max-batches", "1", "--no-progress"]


def cli_call(module, argv):
    return cli.run(module.main, module.get_args_parser(), argv)


def one_line_error(capsys, module, argv) -> str:
    """Run the script's main as its command line does; assert exit 2 and one line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_info:
        cli_call(module, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Runs root with digits runs plain-s0 and ceda-s0 (2 of 3 epochs: resumable) and moons plain-s0."""
    root = tmp_path_factory.mktemp("runs")
    for argv in (["--dataset", "digits", "--method", "plain"], ["--dataset", "digits", "--method", "ceda"],
                 ["--dataset", "moons", "--method", "plain"]):
        train.main(train.get_args_parser().parse_args([*argv, "--epochs", "2", "--runs-root", str(root), *FAST]))
    for config in root.glob("*/*/config.json"):  # leave one epoch to resume
        saved = json.loads(config.read_text())
        write_config(config, {**saved, "epochs": 3})
    return root


def write_config(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def runs(trained, tmp_path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(trained, root)
    return root


# --- 1. names, runs root, seed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("../../escaped", "contains a path separator"), ("/abs/run", "contains a path separator"),
    ("a/b", "contains a path separator"), ("..", "is empty or a relative folder"),
    ("x" * 300, "is 300 bytes long (at most 255)")])
@pytest.mark.parametrize("script", [train, gen_gmm])
def test_a_name_that_is_not_one_folder_is_refused_and_nothing_is_made(tmp_path, capsys, script, name, expected):
    root = tmp_path / "deep" / "runs"
    err = one_line_error(capsys, script, ["--dataset", "digits", "--runs-root", str(root), "--name", name])
    assert expected in err and "one folder name under <runs-root>/<dataset>/" in err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_outside_the_runs_root_that_looks_unfinished_is_never_removed(tmp_path, capsys):
    victim = tmp_path / "victim"  # what prepare_run_dir took for "a start that never finished" and removed
    (victim / "tb").mkdir(parents=True)
    (victim / "config.json").write_text("{}")
    root = tmp_path / "a" / "runs"
    err = one_line_error(capsys, train, ["--dataset", "digits", "--runs-root", str(root), "--name", "../../../victim",
                                         *FAST])
    assert "path separator" in err
    assert sorted(files_under(victim)) == ["config.json"] and (victim / "tb").is_dir()
    # also with --resume (the run is looked up, never created elsewhere)
    one_line_error(capsys, train, ["--runs-root", str(root), "--name", "../../../victim", "--resume", *FAST])
    assert not root.exists() and (victim / "config.json").exists()


def test_a_link_out_of_the_runs_root_is_never_removed(tmp_path, capsys):
    outside = tmp_path / "outside"
    (outside / "tb").mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    (tmp_path / "runs" / "digits" / "plain-s0").symlink_to(outside)
    err = one_line_error(capsys, train, ["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), *FAST])
    assert "is a link out of" in err
    assert (outside / "config.json").exists() and (outside / "tb").is_dir()


@pytest.mark.parametrize("argv, expected", [
    (["--seed", "18446744073709551616"], "--seed must be an integer in [0, 4294967295], got 18446744073709551616"),
    (["--runs-root", "FILE"], "is not a folder"),
    (["--runs-root", "FILE/sub"], "which is not a folder"),
])
def test_bad_seed_and_runs_root_are_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "FILE").write_text("not a folder")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    argv = argv if "--runs-root" in argv else [*argv, "--runs-root", str(tmp_path / "runs")]
    assert expected in one_line_error(capsys, train, ["--dataset", "digits", *argv, *FAST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_gen_gmm_refuses_a_seed_scikit_learn_cannot_take(tmp_path, capsys):
    err = one_line_error(capsys, gen_gmm, ["--dataset", "digits", "--seed", str(2**32), "--runs-root", str(tmp_path)])
    assert "--seed must be an integer in [0, 4294967295], got 4294967296" in err
    assert list(tmp_path.iterdir()) == []


# --- 2. a batch that trains nothing ------------------------------------------------------------------------------

def test_a_batch_larger_than_the_training_set_is_refused_before_any_folder(tmp_path, capsys):
    err = one_line_error(capsys, train, ["--dataset", "digits", "--batch-size", "100000", "--runs-root",
                                         str(tmp_path), *FAST])
    assert "--batch-size 100000 but digits has 1437 training samples" in err and "at most 1437" in err
    assert list(tmp_path.iterdir()) == []
    run_dir = cli_call(train, ["--dataset", "digits", "--batch-size", "1437", "--epochs", "1", "--runs-root",
                               str(tmp_path), *FAST])
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["train_loss"] > 0.5  # one real step of 1437 samples (cross-entropy ~ ln 10)


def test_a_resumed_run_whose_config_has_too_large_a_batch_is_refused_unchanged(runs, capsys):
    run_dir = runs / "digits" / "plain-s0"
    write_config(run_dir / "config.json", {**json.loads((run_dir / "config.json").read_text()), "batch_size": 5000})
    before = files_under(run_dir)
    err = one_line_error(capsys, train, ["--dataset", "digits", "--name", "plain-s0", "--resume", "--runs-root", str(runs), *FAST])
    assert "config.json has batch_size 5000 but digits has 1437 training samples" in err
    assert files_under(run_dir) == before


# --- 3. a checkpoint of another run --------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("digits/ceda-s0", "method 'ceda' in the checkpoint, 'plain' in config.json"),
    ("moons/plain-s0", "dataset 'moons' in the checkpoint, 'digits' in config.json"),
])
def test_a_checkpoint_of_another_run_is_refused_by_resume_and_every_loader(runs, capsys, source, expected):
    target = runs / "digits" / "plain-s0"
    shutil.copy(runs / source / "model.pt", target / "model.pt")
    before = files_under(target)
    err = one_line_error(capsys, train, ["--dataset", "digits", "--name", "plain-s0", "--resume", "--runs-root", str(runs), *FAST])
    assert "belongs to another run" in err and expected in err and "run_id" in err
    assert files_under(target) == before  # nothing appended to "resumes", no log row
    for read in (methods.load_run, run_state):
        with pytest.raises(CheckpointError, match=expected):
            read(target)


def test_a_checkpoint_of_another_run_of_the_same_kind_is_refused_by_its_run_id(runs, tmp_path, capsys):
    other = tmp_path / "other"
    cli_call(train, ["--dataset", "digits", "--epochs", "1", "--runs-root", str(other), *FAST])
    shutil.copy(other / "digits" / "plain-s0" / "model.pt", runs / "digits" / "plain-s0" / "model.pt")
    with pytest.raises(CheckpointError, match="run_id '[0-9a-f]{16}' in the checkpoint, '[0-9a-f]{16}' in config"):
        methods.load_run(runs / "digits" / "plain-s0")


def test_runs_saved_before_the_run_id_are_compared_on_what_they_carry(runs, capsys):
    """Old checkpoints have no run_id: method, arch, dataset and seed are still compared; a match resumes."""
    target = runs / "digits" / "plain-s0"
    config = json.loads((target / "config.json").read_text())
    config.pop("run_id")
    write_config(target / "config.json", config)
    saved = torch.load(target / "model.pt", weights_only=True)
    saved["config"].pop("run_id")
    torch.save(saved, target / "model.pt")
    assert methods.load_run(target).run_config["method"] == "plain"
    cli_call(train, ["--dataset", "digits", "--name", "plain-s0", "--resume", "--runs-root", str(runs), *FAST])
    assert torch.load(target / "model.pt", weights_only=True)["epoch"] == 3
    ceda = torch.load(runs / "digits" / "ceda-s0" / "model.pt", weights_only=True)
    ceda["config"].pop("run_id")
    torch.save(ceda, target / "model.pt")
    with pytest.raises(CheckpointError, match="method 'ceda' in the checkpoint, 'plain' in config.json"):
        methods.load_run(target)


# --- 4. --resume of a run without a checkpoint ------------------------------------------------------------------

def test_resume_of_a_run_never_started_starts_it(tmp_path, capsys):
    run_dir = cli_call(train, ["--dataset", "digits", "--name", "fresh", "--resume", "--epochs", "1", "--lr",
                               "0.003", "--runs-root", str(tmp_path), *FAST])
    assert "has no checkpoint yet" in capsys.readouterr().out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 0.003 and "resumes" not in config  # the command's flags define the run
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 1


def test_resume_of_a_run_killed_in_its_first_epoch_starts_it_again(tmp_path, capsys):
    run_dir = tmp_path / "digits" / "killed"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "plain", "arch": "lenet", "dataset": "digits"}))
    (run_dir / "log.jsonl").write_text('{"epoch": 1, "train_loss": 2.3}\n')  # killed between the row and model.pt
    cli_call(train, ["--dataset", "digits", "--name", "killed", "--resume", "--epochs", "2", "--runs-root",
                     str(tmp_path), *FAST])
    out = capsys.readouterr().out
    assert "has no checkpoint yet" in out and "replacing a start that never finished" in out
    assert [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert torch.load(run_dir / "model.pt", weights_only=True)["epoch"] == 2


# --- 5. one checkpoint reader for the table drivers ---------------------------------------------------------------

@pytest.mark.parametrize("damage, expected", [
    ("truncated", "unreadable checkpoint, truncated or not a PyTorch file"),
    ("no-epoch", "lacks its epoch count ('epoch' None"),
])
def test_damaged_checkpoints_are_one_line_in_the_table_drivers(runs, capsys, damage, expected):
    path = runs / "digits" / "plain-s0" / "model.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        saved = torch.load(path, weights_only=True)
        del saved["epoch"]
        torch.save(saved, path)
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(")):
        run_state(path.parent)
    err = one_line_error(capsys, reproduce, ["--train-only", "--dataset", "digits", "--runs-root", str(runs),
                                             "--dry-run"])
    assert expected in err


# --- 6. hand-edited config.json -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("lr", "fast", '"lr": "fast", which --lr refuses: it takes a number'),
    ("seed", "x", '"seed": "x", which --seed refuses: it takes an integer'),
    ("milestones", "abc", '"milestones": "abc", which --milestones refuses: it takes a list of numbers'),
    ("milestones", ["abc"], 'which --milestones refuses: it takes a number'),
    ("optimizer", "rmsprop", '"optimizer": "rmsprop", which --optimizer refuses: it takes one of adam, sgd'),
    ("epochs", True, "which --epochs refuses: it takes an integer"),
    ("lr", -1.0, "--lr must be > 0, got -1.0"),
])
def test_a_hand_edited_config_is_refused_before_anything_is_written(runs, capsys, key, value, expected):
    run_dir = runs / "digits" / "plain-s0"
    write_config(run_dir / "config.json", {**json.loads((run_dir / "config.json").read_text()), key: value})
    before = files_under(run_dir)
    err = one_line_error(capsys, train, ["--dataset", "digits", "--name", "plain-s0", "--resume", "--runs-root", str(runs), *FAST])
    assert expected in err, err
    assert files_under(run_dir) == before  # "resumes" untouched


# --- 11. the GAN figure ----------------------------------------------------------------------------------------------

class _Foreign:  # a pickled object: loading it would run code
    pass


def test_gan_figure_of_a_refused_checkpoint_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "digits" / "gan-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "gan", "dataset": "digits", "num_classes": 10}))
    torch.save({"model": _Foreign(), "config": {}}, run_dir / "model.pt")
    err = one_line_error(capsys, gan_plot, ["--run", str(run_dir), "--out", str(tmp_path / "fig")])
    assert "refusing to load" in err and "weights_only" not in err
    (run_dir / "config.json").write_text(json.dumps({"method": "plain"}))
    assert "a --method plain run; pass --run with a train.py --method gan run folder" in \
        one_line_error(capsys, gan_plot, ["--run", str(run_dir)])
