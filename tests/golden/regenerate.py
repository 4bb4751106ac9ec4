"""Recompute the expected outputs of the parser goldens in ``tests/golden/parse/``.

``parse/cases.json`` (hand-written) lists each case: its prompt, what it should give (``"layout"``
or an error type) and substrings its error message must contain. The raw replies are
``parse/<case>.txt`` (or ``parse/<case>.json`` for a serialised layout, ``"input": "json"``).
The expected outputs, ``parse/<case>.expected.json``, are what this script writes:

    python tests/golden/regenerate.py           # show the diff against the stored goldens
    python tests/golden/regenerate.py --write   # rewrite them; review the diff before committing

It exits with status 1 when a stored golden differs (or is missing) and ``--write`` is not given.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any

from utils.io import atomic_write_text
from utils.layout import LayoutError, build_diffusion_prompt, layout_from_json, layout_to_dict, parse_layout

GOLDEN_DIR = Path(__file__).resolve().parent / "parse"
CASES_FILE = GOLDEN_DIR / "cases.json"


def load_cases(folder: Path = GOLDEN_DIR) -> dict[str, dict[str, Any]]:
    """The hand-written manifest: case name -> {prompt, expect, message_contains, input, note}."""
    return json.loads((folder / "cases.json").read_text(encoding="utf-8"))


def input_path(name: str, case: dict[str, Any], folder: Path = GOLDEN_DIR) -> Path:
    return folder / (f"{name}.json" if case.get("input") == "json" else f"{name}.txt")


def expected_path(name: str, folder: Path = GOLDEN_DIR) -> Path:
    return folder / f"{name}.expected.json"


def compute_expected(name: str, case: dict[str, Any], folder: Path = GOLDEN_DIR) -> dict[str, Any]:
    """What the parser gives today: ``{"layout", "diffusion_prompt"}`` or ``{"error", "message"}``."""
    text = input_path(name, case, folder).read_text(encoding="utf-8")
    try:
        if case.get("input") == "json":
            layout = layout_from_json(text)
        else:
            layout = parse_layout(text, case["prompt"])
    except LayoutError as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"layout": layout_to_dict(layout),
            "diffusion_prompt": build_diffusion_prompt(layout.prompt, layout.background, layout.phrases)}


def format_expected(expected: dict[str, Any]) -> str:
    text = json.dumps(expected, indent=2, ensure_ascii=False)
    # One box per line: collapse the innermost lists of numbers.
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the expected files")
    args = parser.parse_args(argv)
    changed = []
    for name, case in load_cases().items():
        new_text = format_expected(compute_expected(name, case))
        path = expected_path(name)
        old_text = path.read_text(encoding="utf-8") if path.is_file() else ""
        if new_text == old_text:
            continue
        changed.append(name)
        sys.stdout.writelines(difflib.unified_diff(
            old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=f"{path.name} (stored)", tofile=f"{path.name} (now)"))
        if args.write:
            atomic_write_text(path, new_text)
    verb = "rewrote" if args.write else "differ"
    print(f"{len(changed)} golden(s) {verb}: {', '.join(changed) or '-'}")
    return 0 if (args.write or not changed) else 1


if __name__ == "__main__":
    sys.exit(main())
