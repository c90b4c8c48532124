"""The results store (utils/store.py): no torn row, nothing lost between writers, keyed rows replaced in place."""
import errno
import json
import multiprocessing
import os

import pytest

from utils import runs, store, tables

KEY = ("name", "options")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torn_last_line_is_named_and_never_glued_onto(tmp_path):
    path = tmp_path / "ood" / "digits.jsonl"
    path.parent.mkdir()
    good = json.dumps({"dataset": "digits", "label": "Base", "run": "plain-s0", "detector": "msp", "ood": "uniform",
                       "date": "2026-01-01"})
    path.write_text(good + "\n" + good[: len(good) // 2])  # what a kill or a full disk left behind an append
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"{path}:2: unreadable row \(the last line is cut off"):
        runs.read_jsonl(path)
    with pytest.raises(ValueError, match=rf"{path}:2:"):  # --table names the line instead of a bare JSON error
        tables.write_tables("digits", tmp_path, "ccu", ["auroc"])
    assert path.read_bytes() == before
    study = tmp_path / "attacks" / "digits_alpha.jsonl"
    study.parent.mkdir()
    study.write_bytes(before)
    with pytest.raises(ValueError, match=rf"{study}:2:"):  # a new write refuses instead of gluing its first row on
        runs.record_study(tmp_path, "digits_alpha", "t", [{"study": "alpha", "label": "x"}], lambda rows: "")
    assert study.read_bytes() == before
    path.write_text(good + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:2: a row must be a JSON object"):
        store.read_rows(path)


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_full_disk_or_kill_during_a_write_leaves_the_old_file_intact(tmp_path, monkeypatch, failing):
    path = tmp_path / "rows.jsonl"
    store.upsert_rows(path, [{"name": f"r{i}", "value": i} for i in range(3)], KEY)
    before = path.read_bytes()
    error = OSError(errno.ENOSPC, "No space left on device")

    class FullDisk:  # writes half of what it is given, then fails like a full disk
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise error

    if failing == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(store.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(store.os, failing, lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(OSError, match="No space left"):
        store.upsert_rows(path, [{"name": "r1", "value": 10}, {"name": "new", "value": 4}], KEY)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rows.jsonl.lock", "rows.jsonl"]  # no temporary left
    # a writer killed before its rename leaves a temporary file; the next writer removes it
    (tmp_path / ".rows.jsonl.12345.tmp").write_text('{"name": "half')
    assert store.upsert_rows(path, [{"name": "r1", "value": 10}], KEY) == 3
    assert [r["value"] for r in _rows(path)] == [0, 10, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_rows_with_the_same_key_are_replaced_in_place(tmp_path):
    path = tmp_path / "rows.jsonl"
    store.upsert_rows(path, [{"name": "a", "options": {"x": 1, "y": 2}, "value": 1},
                             {"name": "b", "options": {}, "value": 2}], KEY)
    # the same key (dict options in another order) replaces; a different option is a different row
    count = store.upsert_rows(path, [{"options": {"y": 2, "x": 1}, "name": "a", "value": 3},
                                     {"name": "a", "options": {"x": 2}, "value": 4}], KEY)
    assert count == 3
    assert [(r["name"], r["value"]) for r in _rows(path)] == [("a", 3), ("b", 2), ("a", 4)]
    # active learning: a seed run again drops all of that seed's earlier rounds, even ones not rewritten
    store.upsert_rows(path, [{"name": "b", "options": {}, "value": 5}], KEY, drop=lambda row: row["name"] == "a")
    assert [(r["name"], r["value"]) for r in _rows(path)] == [("b", 5)]


def _writer(path, worker):
    for i in range(50):
        store.upsert_rows(path, [{"name": f"w{worker}-{i}", "worker": worker, "options": None}], KEY)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "rows.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(path, worker)) for worker in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    rows = store.read_rows(path)
    assert len(rows) == 100
    assert sorted(r["name"] for r in rows) == sorted(f"w{w}-{i}" for w in (0, 1) for i in range(50))


def test_study_rows_are_keyed_by_what_they_measured(tmp_path):
    row = {"study": "alpha", "dataset": "digits", "label": "Base", "run": "runs/digits/plain-s0", "checkpoint": "c0",
           "n": 100, "target": 0.99, "alpha_max": 1e6, "overconf": 0.99, "seed": 0, "float64": False,
           "median_alpha": 2.0, "date": "2026-01-01"}
    render = lambda rows: f"{len(rows)} rows\n"  # noqa: E731
    runs.record_study(tmp_path, "digits_alpha", "digits_alpha", [row], render)
    again = runs.record_study(tmp_path, "digits_alpha", "digits_alpha", [{**row, "median_alpha": 3.0,
                                                                          "date": "2026-01-02"}], render)
    other = runs.record_study(tmp_path, "digits_alpha", "digits_alpha", [{**row, "seed": 1}], render)
    rows = _rows(tmp_path / "attacks" / "digits_alpha.jsonl")
    assert again == "1 rows\n" and other == "2 rows\n"
    assert [(r["seed"], r["median_alpha"]) for r in rows] == [(0, 3.0), (1, 2.0)]


def test_appending_to_a_log_with_a_torn_last_line_never_glues_onto_it(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')  # a kill in the middle of an append
    runs.append_jsonl(log, [{"epoch": 2, "loss": 0.4}])
    lines = log.read_text().splitlines()
    assert lines[1] == '{"epoch": 2, "lo' and json.loads(lines[2]) == {"epoch": 2, "loss": 0.4}
    with pytest.raises(ValueError, match=rf"{log}:2: unreadable row"):
        runs.read_jsonl(log)


def test_a_retuned_evaluation_row_replaces_the_old_one(tmp_path):
    """The row key held "options", which carries the tuning result: a re-run whose tuning chose another
    temperature added a second row for the same measurement."""
    settings = {"detector_options": {"tune_ood": "uniform"}, "n_ood": 100, "ood_seed": 0, "fpr_convention": "id",
                "tune_n": 50, "tune_criterion": "fpr95"}
    row = {"dataset": "digits", "label": "ODIN", "run": "plain-s0", "checkpoint": "abc", "detector": "odin",
           "ood": "natural_patches", "settings": settings, "auroc": 0.9,
           "options": {"tune_ood": "uniform", "tuned": {"temperature": 10.0}}}
    path = tmp_path / "ood" / "digits.jsonl"
    store.upsert_rows(path, [row], store.KEYS["ood"])
    retuned = {**row, "auroc": 0.95, "options": {"tune_ood": "uniform", "tuned": {"temperature": 1000.0}}}
    assert store.upsert_rows(path, [retuned], store.KEYS["ood"]) == 1
    assert [json.loads(line)["auroc"] for line in path.read_text().splitlines()] == [0.95]


def test_full_disk_names_the_results_file(tmp_path, monkeypatch):
    """The one-line message of a full disk names the rows file (a failed write itself names no file)."""
    from utils import cli

    path = tmp_path / "rows.jsonl"
    store.upsert_rows(path, [{"name": "r0", "value": 0}], KEY)
    monkeypatch.setattr(store.os, "fsync", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as error:
        store.upsert_rows(path, [{"name": "r1", "value": 1}], KEY)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert cli.user_message(error.value) == f"No space left on {path}; free some space and run the command again"
