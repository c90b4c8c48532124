"""Progress bars where someone watches them, and none in logs.

Every tqdm bar of the project goes through `bar`, so one rule decides: `--progress` forces bars, `--no-progress`
hides them, and unset (the default) shows them only when stderr is a terminal. Redirected to a file, a bar
writes a `\\r`-separated fragment at every update (hundreds per epoch); the one-line summaries per epoch and per
stage are printed either way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, Optional, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
HELP = "tqdm progress bars (default: only when stderr is a terminal, never in a redirected log)"


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress, unset by default (see `wanted`)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=HELP)


def wanted(progress: Optional[bool], stream: Optional[TextIO] = None) -> bool:
    """Whether to draw bars: the flag when given, else whether `stream` (default stderr, where tqdm writes) is a
    terminal."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable[T], progress: Optional[bool] = None, **kwargs) -> Iterable[T]:
    """tqdm over `iterable`, drawn only when `wanted(progress)`."""
    return tqdm(iterable, disable=not wanted(progress), **kwargs)
