"""User OOD sets given as NAME=PATH (data/path_sets.py): image folders, .npz files, errors, and the scripts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train


def _image_folder(root: Path) -> Path:
    """Mixed formats, sizes and modes, nested, plus a hidden file that must be ignored."""
    folder = root / "mine"
    (folder / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "a" / "grey.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").save(folder / "a" / "b" / "alpha.png")
    Image.fromarray(np.full((64, 20), 200, dtype=np.uint8)).convert("P").save(folder / "a" / "b" / "pal.gif")
    (folder / ".DS_Store").write_bytes(b"\0junk")
    return folder


def test_image_folder_loads_at_in_distribution_shape(tmp_path):
    folder = _image_folder(tmp_path)
    for like, shape in (("digits", (1, 8, 8)), ("CIFAR10", (3, 32, 32))):
        dataset = data.get_dataset(f"mine={folder}", "test", like=like)
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert x.shape == (4, *shape) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
        assert all(int(dataset[i][1]) == -1 for i in range(len(dataset)))
    # the 8x8 RGBA image is already at the digits shape: only converted to grey by the ITU-R 601-2 luma rule
    rgba = np.asarray(Image.open(folder / "a" / "b" / "alpha.png").convert("RGB"), dtype=np.float64)
    luma = np.floor(rgba @ np.array([299, 587, 114]) / 1000 + 0.5)
    digits_x = data.get_dataset(f"mine={folder}", "test", like="digits")[0][0]  # sorted: a/b/alpha.png first
    np.testing.assert_allclose(digits_x[0].numpy() * 255, luma, atol=1.0)
    # the constant palette image stays constant (200/255) after the antialiased bilinear resize
    pal = data.get_dataset(f"mine={folder}", "test", like="CIFAR10")[1][0]
    assert torch.allclose(pal, torch.full_like(pal, 200 / 255), atol=1e-6)


def test_npz_of_grey_and_colour_images(tmp_path):
    rng = np.random.default_rng(1)
    grey, colour = tmp_path / "grey.npz", tmp_path / "colour.npz"
    np.savez(grey, x=rng.integers(0, 256, (5, 8, 8), dtype=np.uint8))
    np.savez(colour, x=rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8))
    same = data.get_dataset(f"g={grey}", "train", like="digits")
    assert len(same) == 5
    np.testing.assert_allclose(same[2][0][0].numpy(), np.load(grey)["x"][2] / 255, atol=1e-6)  # no resize needed
    moved = data.get_dataset(f"c={colour}", "test", like="digits", n=4)
    assert len(moved) == 4 and moved[0][0].shape == (1, 8, 8)
    assert data.get_dataset(f"g={grey}", "test", like="CIFAR10")[0][0].shape == (3, 32, 32)
    assert data.set_name(f"c={colour}") == "c"


def test_unreadable_files_are_named_in_one_error(tmp_path):
    folder = _image_folder(tmp_path)
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(data.PathSetError, match=r"2 of 6 files are not readable images: a/notes.txt .*broken.png"):
        data.check_dataset(f"mine={folder}", like="digits")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, x=np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(data.PathSetError, match=r"bad.npz: 'x' must be uint8"):
        data.check_dataset(f"b={bad_npz}", like="digits")
    with pytest.raises(data.DatasetNotFoundError, match="nowhere"):
        data.check_dataset(f"n={tmp_path / 'nowhere'}", like="digits")
    with pytest.raises(data.PathSetError, match="already a dataset key"):
        data.check_dataset(f"uniform={bad_npz}", like="digits")


def test_evaluate_rows_use_the_given_name(tmp_path):
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(2).integers(0, 256, (60, 12, 12), dtype=np.uint8))
    run = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), "--epochs", "1", "--no-progress"]))
    results = tmp_path / "results"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs", str(run), "--ood", f"mine={tmp_path / 'mine.npz'},uniform",
         "--results-root", str(results), "--no-progress", "--no-print", "--table-name", "t"]))
    rows = [json.loads(line) for line in (results / "ood" / "digits_adhoc_t.jsonl").read_text().splitlines()]
    assert sorted(row["ood"] for row in rows) == ["mine", "uniform"]
    assert next(r for r in rows if r["ood"] == "mine")["n_out"] == 60
    assert "| mine |" in (results / "tables" / "digits_adhoc_t_ood.md").read_text()


def test_evaluate_refuses_unreadable_set_before_writing(tmp_path):
    folder = _image_folder(tmp_path)
    (folder / "oops.jpg").write_text("text")
    run = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), "--epochs", "1", "--max-batches", "2",
         "--no-progress"]))
    args = evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs", str(run), "--ood", f"mine={folder}",
         "--results-root", str(tmp_path / "results")])
    with pytest.raises(data.PathSetError, match="oops.jpg"):
        evaluate.main(args)
    assert not (tmp_path / "results").exists()


def test_train_ceda_on_a_folder_out_distribution(tmp_path):
    folder = _image_folder(tmp_path)
    for i in range(64):  # at least one out batch (64) besides the 4 mixed images
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
            folder / f"extra{i}.png")
    run = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--method", "ceda", "--out-data", f"mine={folder}", "--epochs", "1",
         "--max-batches", "3", "--runs-root", str(tmp_path / "runs"), "--no-progress"]))
    config = json.loads((run / "config.json").read_text())
    assert config["out_data"] == f"mine={folder}"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    (folder / "zzz.bmp").write_text("x")
    with pytest.raises(data.PathSetError, match="zzz.bmp"):
        train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--method", "ceda", "--out-data", f"mine={folder}", "--epochs", "1",
             "--runs-root", str(tmp_path / "runs"), "--name", "second", "--no-progress"]))
    assert not (tmp_path / "runs" / "digits" / "second").exists()


def test_out_set_smaller_than_a_batch_is_refused_not_waited_on(tmp_path):
    """The training loader drops incomplete batches: a 10-image out set used to make training wait forever."""
    np.savez(tmp_path / "few.npz", x=np.zeros((10, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="has 10 samples, fewer than one out batch"):
        train.main(train.get_args_parser().parse_args(
            ["--dataset", "digits", "--method", "ceda", "--out-data", f"few={tmp_path / 'few.npz'}",
             "--runs-root", str(tmp_path / "runs"), "--no-progress"]))
    assert not (tmp_path / "runs").exists()


def test_odin_tunes_on_a_path_set(tmp_path):
    """`--tune-ood NAME=PATH` used to stop with "tuning set ... is not loaded": sets are keyed by NAME."""
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(3).integers(0, 256, (120, 12, 12), dtype=np.uint8))
    run = train.main(train.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs-root", str(tmp_path / "runs"), "--epochs", "1", "--max-batches", "3",
         "--no-progress"]))
    results = tmp_path / "results"
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--dataset", "digits", "--runs", str(run), "--detectors", "odin", "--tune-ood", f"mine={tmp_path / 'mine.npz'}",
         "--tune-n", "40", "--ood", "uniform", "--n-ood", "100", "--results-root", str(results), "--no-progress",
         "--no-print", "--table-name", "t"]))
    rows = [json.loads(line) for line in (results / "ood" / "digits_adhoc_t.jsonl").read_text().splitlines()]
    assert {row["ood"] for row in rows} == {"mine", "uniform"}
    assert all(row["options"]["tune_ood"] == "mine" for row in rows)
    assert next(r for r in rows if r["ood"] == "mine")["n_out"] == 100 - 40  # --n-ood, less tuning
    with pytest.raises(data.DatasetNotFoundError, match="nowhere"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--dataset", "digits", "--runs", str(run), "--detectors", "odin", "--tune-ood",
             f"other={tmp_path / 'nowhere'}", "--results-root", str(tmp_path / "r2"), "--no-progress"]))
    assert not (tmp_path / "r2").exists()
