"""Command-line plumbing shared by every script: user errors as one line, numbers checked before any work.

A mistake the user can fix (a missing dataset, an unknown name, a bad or foreign checkpoint, an unreadable
config.json, a full disk, a flag out of range) ends the script with ONE line on stderr, naming what was wrong
and what to do, and exit status 2 (the status argparse uses for bad flags); `--debug` shows the traceback
instead. Anything else is a bug and keeps its traceback.

What counts as a user error (`user_message`):
  * `UserError` (and its subclasses in utils.runs and train.py);
  * `data.DatasetNotFoundError` and `pickle.UnpicklingError` (a checkpoint that would need code to load);
  * `json.JSONDecodeError` and `OSError` with errno ENOSPC (no space left on the device);
  * `ValueError`, `FileNotFoundError` and `FileExistsError` raised by this repository's own code: the project's
    convention for a bad value or a missing/existing file. The same types raised inside torch, numpy or another
    library are bugs and keep their traceback.
torch's advice to retry a load with `weights_only=False` is never passed on: such a file is refused.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message is one line saying what was wrong and what to do."""

    exit_code = EXIT_USER_ERROR


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False,
                        help="on an error, show the full traceback instead of one line")


def add_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str) -> None:
    """Keep the old spelling `old` of the flag `new` working, hidden from --help, with a warning; it takes its
    values as `new` does (the same nargs, type and action: a list flag stays a list)."""
    target = parser._option_string_actions[new]

    class _Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            target(parser, namespace, values, new)

    parser.add_argument(old, dest=dest, action=_Deprecated, nargs=target.nargs, type=target.type,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _raised_in_repo(err: BaseException) -> bool:
    """True when the innermost frame of err's traceback is a file of this repository (not a library)."""
    tb = err.__traceback__
    if tb is None:
        return True  # constructed, not raised: our own code's
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return REPO_ROOT in path.parents and not any(part.startswith(".venv") or part == "site-packages"
                                                 for part in path.relative_to(REPO_ROOT).parts)


def first_line(text: str) -> str:
    """The first non-blank line of `text`, stripped ("" for none): what a one-line error message keeps."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def unpickling_reason(text: str) -> str:
    """What torch refused to unpickle, without torch's advice around it (retry with weights_only=False, i.e. run
    the file's code; file an issue; read the docs), which this project never passes on."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.split(":", 1)[1].strip().split(". Please")[0].rstrip(".")
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    specific = [line for line in lines if not line.startswith(advice) and "weights_only" not in line]
    return specific[0] if specific else "the file needs code to be unpickled"


def user_message(err: BaseException) -> Optional[str]:
    """The one-line message for a user error, or None when err is a bug (see the module docstring)."""
    from data import DatasetNotFoundError

    if getattr(err, "listing", False):  # a headline plus the commands that fix it (evaluate's missing runs)
        return str(err).strip()
    if isinstance(err, (UserError, DatasetNotFoundError)):
        return first_line(str(err)) or type(err).__name__
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = err.filename or "the device"
        return f"No space left on {where}; free some space and run the command again"
    if isinstance(err, PermissionError):  # an unwritable results or runs folder, wherever it sits
        where = err.filename or "a file or folder"
        return f"permission denied: {where}; make it writable (or pass another --results-root / --runs-root)"
    if isinstance(err, pickle.UnpicklingError):
        return ("refusing to load a file that is not a plain-tensor checkpoint "
                f"({unpickling_reason(str(err))}); only files written by this project load")
    if isinstance(err, json.JSONDecodeError):
        return f"unreadable JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix or restore the file"
    if isinstance(err, (ValueError, FileNotFoundError, FileExistsError)) and _raised_in_repo(err):
        text = str(err)
        return unpickling_reason(text) if "weights_only" in text else first_line(text) or type(err).__name__
    return None


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
        argv: Optional[list[str]] = None) -> Any:
    """Parse argv (default sys.argv[1:]) and call main(args); a user error ends with one line and exit 2.

    The parser gets a `--debug` flag if it has none: with it, errors keep their full traceback.
    """
    if not any("--debug" in action.option_strings for action in parser._actions):
        add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_message(err)
        if message is None or getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None


# --- numbers checked before any work -------------------------------------------------------------------------

class Range:
    """An allowed interval for a flag's number: low/high bounds (None = open end), each inclusive or not."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, low_inclusive: bool = True,
                 high_inclusive: bool = True, integer: bool = False) -> None:
        self.low, self.high = low, high
        self.low_inclusive, self.high_inclusive, self.integer = low_inclusive, high_inclusive, integer

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # NaN fails every comparison below too; inf is never a sensible flag value here
        if self.low is not None and not (value >= self.low if self.low_inclusive else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.high_inclusive else value < self.high)

    def __str__(self) -> str:
        if self.integer and self.high is None:
            return f"an integer >= {self.low}"
        if self.integer and self.low is not None and self.low_inclusive and self.high_inclusive:
            return f"an integer in [{self.low}, {self.high}]"
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_ONE = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0.0, low_inclusive=False)
NON_NEGATIVE = Range(0.0)
UNIT = Range(0.0, 1.0)                                      # a probability or fraction, ends included
UNIT_OPEN_HIGH = Range(0.0, 1.0, high_inclusive=False)      # a share that must leave something (val split)
UNIT_OPEN = Range(0.0, 1.0, low_inclusive=False, high_inclusive=False)


def check_ranges(args: argparse.Namespace, rules: dict[str, Range]) -> None:
    """Refuse any flag whose value lies outside its Range (None = not set, allowed); lists are checked
    element by element. The error names the flag as typed: `--val-fraction must be in [0, 1), got 1.5`."""
    for dest, allowed in rules.items():
        value = getattr(args, dest, None)
        values: Iterable = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is not None and not allowed.contains(item):
                flag = "--" + dest.replace("_", "-")
                raise UserError(f"{flag} must be {allowed}, got {value}")
