"""Average saved stage-2 evaluations of several runs (the README's numbers = mean over run0 and run1).

    python scripts/average_runs.py img_generations/.../run0 img_generations/.../run1 --json-out avg.json

Each argument is an eval.json written by ``scripts/eval_owl_vit.py --save-eval`` or a run directory
holding one. No detector is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.eval.evaluation import EVAL_FILE, average_summaries, format_average_summary_line, format_summary_table
from utils.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals", nargs="+", help=f"eval JSON files or run directories holding {EVAL_FILE}")
    parser.add_argument("--json-out", help="write the averaged table here")
    args = parser.parse_args(argv)
    summaries, names = [], []
    for name in args.evals:
        path = Path(name)
        path = path / EVAL_FILE if path.is_dir() else path
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            print(f"error: cannot read {path}: {error}", file=sys.stderr)
            return 2
        names.append(str(path))
    combined = average_summaries(summaries, names)
    print(format_summary_table(combined))
    print(format_average_summary_line(combined))
    if args.json_out:
        atomic_write_json(args.json_out, combined)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
