"""Run folders and result files: atomic writes, provenance (git SHA, library versions), JSON lines."""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from utils.cli import REPO_ROOT, UserError  # noqa: F401  (REPO_ROOT: one definition, in utils.cli)


class DiskFullError(UserError):
    """No space left while writing a file; the message says whether the previous version is intact."""


def create_temp_beside(path: str | Path) -> tuple[int, Path]:
    """(fd, path) of a new, empty temporary file in path's folder, opened for writing.

    Created with mode 0o666 filtered by the user's umask, as any file the user makes (tempfile.mkstemp would
    give 0600, and os.replace keeps that mode on the final file)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**48 names: practically never twice
            continue


def no_space_message(path: str | Path, what: str = "file") -> str:
    path = Path(path)
    kept = f"the last {what} {path} is intact" if path.exists() else f"no {what} was written to {path}"
    return f"No space left on {path.parent}; {kept}. Free some space and run the command again"


def write_and_sync(fd: int, tmp: Path, content: bytes) -> None:
    """Write content to the open file fd (named tmp) and flush it to the disk; closes fd."""
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: str | Path, content: bytes, what: str = "file") -> None:
    """Write bytes so that readers see either the old or the complete new file, never a part; a full disk
    raises DiskFullError and leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)
    try:
        write_and_sync(fd, tmp, content)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(no_space_message(path, what)) from err
        raise


def git_sha() -> str:
    """The commit of the code that produced a result ("unknown" outside a git checkout), "+dirty" if modified."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty and sha else "")


def library_versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torch
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see either the old or the complete new content, never a part."""
    write_atomically(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows as JSON lines in one write (a line is never interleaved with another writer's). For logs
    (a run's log.jsonl); result rows go through utils.store, which replaces keyed rows and cannot tear a line.
    A last line cut off by a kill is left on a line of its own, never glued onto the first new row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows)
    with open(path, "a+b") as handle:
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text
        handle.write(text.encode())
        handle.flush()
        os.fsync(handle.fileno())


def trim_log(path: str | Path, epoch: int) -> int:
    """Drop the rows of a run's log.jsonl whose "epoch" is above `epoch` (rewritten atomically); how many went.
    train.py logs an epoch before it checkpoints it, so a run killed in between has one row more than its
    checkpoint: resuming trims it and then logs that epoch again, once. Unreadable lines (cut off by a kill)
    go too."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and int(row.get("epoch", 0)) > epoch:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def record_study(results_root: str | Path, rows_name: str, table_name: str, rows: list[dict],
                 render: Callable[[list[dict]], str], key_fields: tuple[str, ...] | None = None) -> str:
    """Upsert a study's rows into results/attacks/<rows_name>.jsonl (keyed by `key_fields`, default
    `utils.store.KEYS[row["study"]]`: a re-run replaces its rows) and rebuild results/tables/<table_name>.md from
    every row of that file (so other runs stay in the table); returns the table."""
    from utils.store import KEYS, locked, upsert_rows  # noqa: PLC0415 (runs.py is imported by everything)

    rows_path = Path(results_root) / "attacks" / f"{rows_name}.jsonl"
    if rows:
        upsert_rows(rows_path, rows, key_fields or KEYS[rows[0]["study"]])
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    with locked(rows_path):  # the table shows the rows as one writer left them (two studies finishing together)
        table = render(read_jsonl(rows_path))
        atomic_write_text(Path(results_root) / "tables" / f"{table_name}.md", table)
    return table


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file ([] if absent); an unreadable line raises naming `<file>:<line>`."""
    from utils.store import read_rows  # noqa: PLC0415

    return read_rows(path)


def file_hash(path: str | Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


# What a training start leaves before its first checkpoint: a folder holding only these never finished an
# epoch (a failed or killed start; log.jsonl when the kill fell between an epoch's row and its checkpoint) and
# is replaced by the next start of the same run.
UNFINISHED_START_FILES = ("config.json", "tb", "log.jsonl")
NAME_MAX_BYTES = 255  # the longest file name ext4, APFS, NTFS and most others accept


def check_run_name(name: str, flag: str = "--name") -> str:
    """Refuse a run name that is not exactly one folder name: it must stay inside <runs-root>/<dataset>/."""
    bad = None
    separators = [sep for sep in ("/", "\\", os.sep, os.altsep) if sep]
    if not name or name in (".", ".."):
        bad = "is empty or a relative folder"
    elif any(sep in name for sep in separators) or Path(name).is_absolute() or Path(name).drive:
        bad = "contains a path separator"
    elif "\0" in name:
        bad = "contains a NUL character"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        bad = f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long (at most {NAME_MAX_BYTES})"
    if bad:
        what = ("a run name is one folder name under <runs-root>/<dataset>/ (letters, digits, '-', '_', '.'), "
                "e.g. plain-s0") if flag == "--name" else "it names one folder under <runs-root>/"
        raise UserError(f"{flag} {name[:60]!r}{'...' if len(name) > 60 else ''} {bad}; {what}")
    return name


def check_runs_root(runs_root: str | Path, flag: str = "--runs-root") -> None:
    """Refuse a runs root that is, or lies under, something other than a folder (checked before any work)."""
    path = Path(runs_root)
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "is" if part == path else f"lies under {part}, which is"
                raise UserError(f"{flag} {runs_root} {where} not a folder; pass a folder (it is made if missing)")
            return


def _is_unfinished_start(run_dir: Path) -> bool:
    names = [p.name for p in run_dir.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))]
    return all(name in UNFINISHED_START_FILES for name in names)


def run_folder(runs_root: str | Path, dataset: str, name: str) -> Path:
    """`<runs_root>/<dataset>/<name>`, after checking that the name is one folder name and the root a folder."""
    check_run_name(name)
    check_runs_root(runs_root)
    return Path(runs_root) / dataset / name


def prepare_run_dir(runs_root: str | Path, dataset: str, name: str, resume: bool) -> Path:
    """`<runs_root>/<dataset>/<name>/`, refusing to reuse an existing run unless resuming it.

    A folder left by a start that never finished an epoch (only config.json, tb/ and log.jsonl, no model.pt)
    holds no trained work: a new start replaces it, so a failed start never blocks the corrected command. The
    name must be one folder name, so nothing outside <runs_root>/<dataset>/ is ever made or removed."""
    run_dir = run_folder(runs_root, dataset, name)
    if resume:
        if not (run_dir / "model.pt").exists():
            hint = ("it stopped before its first epoch ended; start it again without --resume"
                    if run_dir.exists() else "start the run without --resume")
            raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / 'model.pt'}; {hint}")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not _is_unfinished_start(run_dir):
            raise FileExistsError(f"run folder {run_dir} already exists; pass --resume to continue it or choose "
                                  "another --name (runs are never overwritten)")
        if run_dir.is_symlink() or run_dir.resolve().parent != (Path(runs_root) / dataset).resolve():
            raise UserError(f"{run_dir} is a link out of {Path(runs_root) / dataset}; it is left as it is: "
                            "choose another --name")
        print(f"{run_dir}: replacing a start that never finished an epoch (no model.pt)", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def provenance() -> dict[str, Any]:
    return {"git_sha": git_sha(), "versions": library_versions(), "argv": sys.argv, "date": now()}


def resolve_data_root(root: str | None) -> str:
    """--data-root, else $DATA_ROOT, else ./datasets."""
    return root or os.environ.get("DATA_ROOT") or "datasets"


def benchmark_data_root() -> str:
    """Where the benchmarks look for real datasets: $DATA_ROOT, else `shared/datasets` beside the repository
    (`../shared/datasets` seen from its root); built-in data is used where that holds nothing."""
    return os.environ.get("DATA_ROOT") or str(REPO_ROOT.parent / "shared" / "datasets")
