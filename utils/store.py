"""The results store: JSON-lines files of keyed rows that no crash, full disk or second writer can corrupt.

Every result row (evaluate.py, the studies of gen_attack_stats.py, active_learning.py) lives in a plain JSON-lines
file under results/ (`results/<kind>/<DATASET>.jsonl`), one JSON object per line with sorted keys. The files stay
text because they are committed: a re-evaluation shows up in `git diff` as the lines that changed.

Why this mechanism (and not appending, nor SQLite):
  * Appending (the old store) cannot keep its promises: a kill or ENOSPC in the middle of a write leaves a torn
    last line, and the next append glues its first row onto it; nothing can replace an earlier row.
  * SQLite (standard library) would give transactions and keys, but a binary database is neither diffable nor
    mergeable when committed, and a text export next to it would be a second copy that can disagree.
  * So every write rewrites the file: under an exclusive `fcntl.flock` on a sidecar lock file
    (`.<name>.lock`, never committed), the writer reads the current rows, replaces those with the same key,
    appends the new ones, writes everything to a temporary file in the same folder, fsyncs it and
    `os.replace`s it over the old file (then fsyncs the folder). A reader sees the old or the new file, never a
    part of one; a kill or a full disk leaves the old file untouched (and at worst a stale temporary file,
    removed by the next writer); two writers take turns, so neither loses the other's rows. The cost is a
    read and rewrite of the file per write (per run group for evaluate.py): measured 0.17 s for a file of
    1000 rows of 1 kB and 1.1 s for 5000 rows, on 2 busy CPU cores; scoring one run takes far longer.

Keys. A row is identified by what it measured, never by when: `KEYS[kind]` names the fields of each kind's key,
and writing a row whose key is already present replaces the old row in place (so the diff shows the change
where it happened). Rows written by older versions without some key field keep `None` there.

Unreadable lines (a torn row left by an old version, a hand edit) are reported as `<file>:<line>` with the
reason; they are never silently dropped or glued onto.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from utils.cli import UserError

# The key of each kind of row. Fields absent from a row count as None.
KEYS: dict[str, tuple[str, ...]] = {
    # evaluate.py, results/ood/<DATASET>[_adhoc_<name>].jsonl: one row per (model, detector, OOD set).
    # "settings" holds what changes the numbers: the detector's options as given (tuned values are results, not
    # settings: the row's "options" carry them too, so they are no part of the key), n_ood, the OOD sampling seed,
    # the FPR convention, tuning and attack settings.
    "ood": ("dataset", "label", "run", "checkpoint", "detector", "ood", "settings"),
    # gen_attack_stats.py --study ccu, results/attacks/<DATASET>.jsonl
    "ccu_attack": ("study", "dataset", "label", "runs", "checkpoints", "detector", "options", "ccu_run", "seeds",
                   "n_seeds", "n_test", "restarts", "steps", "step_size", "f", "seed"),
    # gen_attack_stats.py --study alpha, results/attacks/<DATASET>_alpha.jsonl
    "alpha": ("study", "dataset", "label", "run", "checkpoint", "n", "target", "alpha_max", "overconf", "seed",
              "float64"),
    # gen_attack_stats.py --study audit, results/attacks/<DATASET>_audit.jsonl
    # (detector: None for the confidence's own row, else the --detectors name whose limit the row audits)
    "audit": ("study", "dataset", "label", "run", "checkpoint", "source", "noise", "threshold", "alpha_check",
              "seed", "detector"),
    # gen_attack_stats.py --study gauc, results/attacks/<DATASET>_gauc.jsonl: one row per (model, OOD set)
    # (precision: float32 / float64 for both sides of every AUROC, None in rows from before issue 19, which compared
    # float32 confidences with float64 bounds; attack: the AAUC attack's name; detector: None for the max-softmax
    # confidence, else the --detectors name whose own score was attacked)
    "gauc": ("study", "dataset", "label", "run", "checkpoint", "ood", "eps", "n_ood", "n_test", "apgd_steps",
             "apgd_restarts", "pgd_steps", "seed", "precision", "attack", "pgd_step_size", "pgd_restarts", "detector"),
    # active_learning.py, results/active_learning/<DATASET>_<acquisition>.jsonl: one row per round
    "active_learning": ("dataset", "acquisition", "seed", "round"),
}


RESULT_FOLDERS = ("ood", "scores", "tables", "ddu", "attacks")  # what the scripts write under a results root


def check_results_root(root: str | Path, flag: str = "--results-root") -> None:
    """Refuse, before any work, a results root that is a file or a folder this user cannot write in (the root,
    its result folders that exist, or the nearest existing folder above a root still to be made)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root} is a file; give a folder (it is made if missing)")
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {root}: {existing} is a file, so no folder can be made there; give another path")
    folders = [existing, *(root / name for name in RESULT_FOLDERS if (root / name).is_dir())]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {root}: no permission to write in {folder}; fix its permissions or give "
                            "another folder")


class UnreadableRowError(ValueError):
    """A line of a results file that is not one JSON object; the message names `<file>:<line>`."""


def row_key(row: dict, key_fields: Iterable[str]) -> str:
    """The row's key as canonical JSON (dicts and lists compare by content, field order does not matter)."""
    return json.dumps([row.get(field) for field in key_fields], sort_keys=True, default=str)


def _line(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str) + "\n"


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a results file ([] if it does not exist); an unreadable line raises naming file and line."""
    return [row for row, _ in _rows_and_lines(Path(path))]


def _rows_and_lines(path: Path) -> list[tuple[dict, str]]:
    """(row, its line as stored) for every non-blank line; rewriting kept rows from their stored text keeps
    their bytes (and `git diff`) unchanged and skips re-encoding them."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                torn = "" if line.endswith("\n") else " (the last line is cut off: a write was interrupted)"
                raise UnreadableRowError(f"{path}:{number}: unreadable row{torn}: {error.msg}; delete or "
                                         "repair that line, the other rows are intact") from None
            if not isinstance(row, dict):
                raise UnreadableRowError(f"{path}:{number}: a row must be a JSON object, found "
                                         f"{type(row).__name__}; delete or repair that line")
            rows.append((row, line if line.endswith("\n") else line + "\n"))
    return rows


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for writing `path` (a sidecar `.<name>.lock`, so the data file can be replaced)."""
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _replace_file(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # os.open with 0o666 (not mkstemp's 0o600) so the file gets the user's umask like any other file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            # name the results file (a failed write names none) in the one-line message of utils.cli
            raise OSError(errno.ENOSPC, f"{error.strerror}; the rows in {path} are intact", str(path)) from error
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writers that were killed (safe: we hold the lock, so no writer is running)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def upsert_rows(path: str | Path, rows: Iterable[dict], key_fields: Iterable[str],
                drop: Callable[[dict], bool] | None = None) -> int:
    """Add `rows` to the results file `path`, replacing the rows with the same key; returns the number of rows.

    A replaced row keeps its position; new keys go to the end in the given order (a key repeated among `rows`:
    the last one wins). `drop`, if given, also removes every existing row for which it is true (active
    learning: all rounds of a seed that is run again). Atomic and serialised with other writers (see above).
    """
    path = Path(path)
    key_fields = tuple(key_fields)
    new = {row_key(row, key_fields): row for row in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        _remove_stale_temporaries(path)
        lines, placed = [], set()
        for row, line in _rows_and_lines(path):
            key = row_key(row, key_fields)
            if key in new:
                if key not in placed:
                    lines.append(_line(new[key]))
                    placed.add(key)
            elif drop is None or not drop(row):
                lines.append(line)
        lines += [_line(row) for key, row in new.items() if key not in placed]
        _replace_file(path, "".join(lines))
    return len(lines)
