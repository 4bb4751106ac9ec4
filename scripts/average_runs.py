"""Average saved stage-2 evaluations of several runs (the README's numbers = mean over run0 and run1).

    python scripts/average_runs.py img_generations/.../run0 img_generations/.../run1 --json-out avg.json

Each argument is an eval.json written by ``scripts/eval_owl_vit.py --save-eval`` (any version, or the
reference script's) or a run directory holding one. No detector is loaded. Evaluations made with
different settings (thresholds, NMS, frames, detector, prompt type, video variant) are refused,
naming the settings that differ, unless ``--allow-mixed``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import OutputDirError, ensure_writable_dir, run_cli
from utils.eval.averaging import NOT_RECORDED, MixedSettingsError, average_summaries
from utils.eval.results import EVAL_FILE, EvalSummaryFormatError, load_eval_summary
from utils.eval.tables import format_average_summary_line, format_summary_table
from utils.io import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals", nargs="+", help=f"eval JSON files or run directories holding {EVAL_FILE}")
    parser.add_argument("--json-out", help="write the averaged table here")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="average even if the evaluations were made with different settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.json_out:
            ensure_writable_dir(Path(args.json_out).parent, "--json-out")
            if Path(args.json_out).is_dir():
                raise OutputDirError(f"--json-out {args.json_out}: is a folder; expected a file name")
        summaries = [load_eval_summary(name) for name in args.evals]
    except (OutputDirError, EvalSummaryFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = [str(Path(name) / EVAL_FILE if Path(name).is_dir() else Path(name)) for name in args.evals]
    unrecorded = [name for name, s in zip(names, summaries) if s.config is None]
    if unrecorded:
        print(f"warning: {', '.join(unrecorded)}: settings {NOT_RECORDED} (the reference's eval.json?); "
              "they cannot be checked against the others", file=sys.stderr)
    try:
        combined = average_summaries(summaries, names, allow_mixed=args.allow_mixed)
    except MixedSettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if combined.mixed_settings:
        print(f"warning: averaging evaluations with different settings: {', '.join(combined.mixed_settings)}",
              file=sys.stderr)
    print(format_summary_table(combined))
    print(format_average_summary_line(combined))
    if args.json_out:
        atomic_write_json(args.json_out, combined.to_dict())
        print(f"wrote {args.json_out}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` as the command line runs it: a closed pipe ends quietly, Ctrl-C in one line."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(run())
