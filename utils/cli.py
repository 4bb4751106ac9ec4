"""Command-line manners shared by every CLI: numeric flags checked at parse time, an output folder checked
before any work, a closed pipe or Ctrl-C ending in one line instead of a traceback.

Value types raise ``argparse.ArgumentTypeError``, so argparse prints
``error: argument --fg_top_p: must be a number in [0, 1], found 2.0`` and exits 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


def _range_text(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return "finite"


def int_in(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, found {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_range_text(low, high)}, found {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, found {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number {_range_text(low, high, low_open)}, "
                                             f"found {text}")
        return value

    parse.__name__ = "number"
    return parse


class OutputDirError(OSError):
    """An output folder cannot be used (it is a file, or not writable)."""


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` if needed and check that files can be written in it; raises :class:`OutputDirError`
    naming the flag."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputDirError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{flag} {path}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {path}: the folder is not writable")
    return path


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
            interrupt_hint: str = "rerun the same command to resume") -> int:
    """``main(argv)``, with a closed stdout (``| head``) ending quietly and Ctrl-C in one line (exit 130)."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python would print an error when flushing stdout at exit: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted; {interrupt_hint}", file=sys.stderr)
        return 130
