"""The failures log of a batch (``failures.jsonl``): one JSON line per failed item, appended atomically.

Every batch CLI (generation, evaluation, upsampling) records a failure the same way: when, where
(the caller's context: prompt index, prompt, rank, input file ...), the error in one line and its
traceback, with secrets redacted. Each record is one ``write`` on a file opened with ``O_APPEND``, so
concurrent processes never interleave lines and a crash never leaves half a record.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

from utils.redact import redact_value

FAILURES_FILE = "failures.jsonl"


def describe_error(error: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def record_failure(path: str | os.PathLike, error: BaseException, *, secrets: Iterable[str | None] = (),
                   **context: Any) -> dict:
    """Append ``{"time", **context, "error", "traceback"}`` to the JSON-lines file ``path``; returns the record."""
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **context, "error": describe_error(error),
              "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))}
    record = redact_value(record, secrets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record

