"""Compare the layout control families side by side: every family and combination, on pairs of run-models
(a guided one and its baseline, same weights), the same layouts and seeds, one table.

For each pair ``GUIDED:BASELINE`` and each arm (the baseline run-model; the guided run-model with each
``--control`` set of ``--arms``), this script generates the prompt type's videos with ``generate.py`` (each
arm in a process of its own, so that its peak memory is its own), evaluates them with the stage-2
evaluation (``scripts/eval_owl_vit.py``: mIoU, coverage, centroid distance, AP50 against the generating
layouts, and the five-task accuracy where the prompt type has benchmark checks) and writes a markdown table:
adherence, accuracy, generation time per video and peak memory, each relative to the pair's baseline.

Offline on the CPU, tiny random models and detector (meaningless adherence, real relative cost)::

    python scripts/compare_controls.py --pairs lvd_tiny:baseline_tiny lvd_wan_tiny:wan_tiny \\
        --prompt-type demo --model handwritten --detector tiny --num_inference_steps 12 --out compare.md

The shapes benchmark (when its model lands; README, "Layout control families")::

    python scripts/compare_controls.py --pairs lvd_shapes:baseline_shapes lvd_wan_shapes:wan_shapes \\
        --prompt-type shapes --model <llm> --detector shapes --out docs/bench/compare_shapes.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utils.cache import cache_path, describe_missing_cache

REPO = Path(__file__).resolve().parents[1]
# The arms of each pair besides its baseline: --control sets, in table order ("none": the layout's prompt, no
# control; the reference of the adherence columns, since the baseline run-model has no layout).
DEFAULT_ARMS = ("none", "energy", "mask", "modulate", "mask+energy", "modulate+energy", "mask+modulate",
                "mask+modulate+energy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, metavar="GUIDED:BASELINE",
                        help="run-model pairs, e.g. lvd_tiny:baseline_tiny lvd_wan_tiny:wan_tiny")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help="--control sets to run on the guided run-model, families joined by + (default: all)")
    parser.add_argument("--prompt-type", default="demo", help="the prompt list (demo, lvd, ..., shapes)")
    parser.add_argument("--model", default="handwritten", help="the LLM whose layout cache to read")
    parser.add_argument("--template_version", default="v0.1")
    parser.add_argument("--cache-dir", default=str(REPO / "cache"))
    parser.add_argument("--num_prompts", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: each run-model's")
    parser.add_argument("--detector", default="owlvit", help="eval_owl_vit.py --detector (tiny offline; shapes)")
    parser.add_argument("--detector-path", default=None)
    parser.add_argument("--device", default=None, help="generate.py --device (default: automatic)")
    parser.add_argument("--output-dir", default="img_generations/compare_controls")
    parser.add_argument("--out", default=None, help="write the markdown table (and a .json next to it) here")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further generate.py flags for every arm (last on the line)")
    return parser


def generate_arm(args, run_model: str, arm: str | None, output_dir: Path) -> tuple[Path, dict]:
    """Generate one arm in a child process; returns (run folder, {"peak_memory_mb", "seconds_per_video"})."""
    suffix = arm.replace("+", "-") if arm else "baseline"
    argv = ["--run-model", run_model, "--prompt-type", args.prompt_type, "--model", args.model,
            "--template_version", args.template_version, "--cache-dir", args.cache_dir, "--output-dir",
            str(output_dir), "--save-suffix", suffix, "--force_run_ind", "0", "--save-formats", "joblib",
            "--no-annotate"]
    if arm:
        argv += ["--control", *arm.split("+")]
    for flag, value in (("--num_prompts", args.num_prompts), ("--num_inference_steps", args.num_inference_steps),
                        ("--device", args.device)):
        if value is not None:
            argv += [flag, str(value)]
    argv += list(args.extra)
    stats_path = output_dir / f".{run_model}_{suffix}.stats.json"
    code = subprocess.call([sys.executable, __file__, "--child", str(stats_path), *argv], cwd=REPO)
    if code != 0:
        raise RuntimeError(f"generate.py {' '.join(argv)} exited with {code}")
    runs = sorted(output_dir.glob(f"imgs_*_{run_model}*_{suffix}/run0"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder for {run_model} {suffix} under {output_dir}, found {runs}")
    elapsed = [json.loads(path.read_text())["elapsed_s"] for path in runs[0].glob("*/video_*.json")]
    stats = json.loads(stats_path.read_text())
    stats["seconds_per_video"] = statistics.mean(elapsed) if elapsed else None
    return runs[0], stats


def run_child(stats_path: str, argv: list[str]) -> int:
    """Generate in this process and record its peak memory (CUDA: allocated by torch; CPU: resident set)."""
    sys.path.insert(0, str(REPO))
    import torch

    import generate

    code = generate.main(argv)
    if torch.cuda.is_available() and "cpu" not in argv:
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    Path(stats_path).write_text(json.dumps({"peak_memory_mb": peak}))
    return code


def evaluate_arm(args, run: Path) -> dict:
    """The stage-2 evaluation of a run: overall adherence and accuracy (None where not defined)."""
    from utils.eval.results import load_eval_summary

    out = run / "compare_eval.json"
    argv = [sys.executable, str(REPO / "scripts" / "eval_owl_vit.py"), "--run_base_path", str(run), "--detector",
            args.detector, "--detection_score_threshold", "0.1", "--nms_threshold", "0.1", "--class-aware-nms",
            "--save-eval", "--save-eval-path", str(out), "--prompt-type", args.prompt_type]
    if args.detector_path:
        argv += ["--detector-path", args.detector_path]
    if args.device == "cpu":
        argv.append("--no-cuda")
    code = subprocess.call(argv, cwd=REPO, stdout=subprocess.DEVNULL)
    if not out.is_file():
        raise RuntimeError(f"the evaluation of {run} wrote no summary (exit {code})")
    summary = load_eval_summary(out)
    adherence = summary.adherence.overall
    return {"miou": adherence.miou, "coverage": adherence.coverage, "cd": adherence.centroid_distance,
            "ap50": adherence.ap50, "accuracy": summary.overall.rate,
            "tasks": {task: count.rate for task, count in summary.tasks.items()}}


def format_table(rows: list[dict]) -> str:
    def number(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    tasks = sorted({task for row in rows for task in row["tasks"]})
    header = ["run-model", "controls", "mIoU", "coverage", "CD", "AP50", "accuracy", *tasks, "s / video",
              "time x", "peak MB", "memory x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["run_model"], row["controls"], number(row["miou"]), number(row["coverage"]), number(row["cd"]),
                 number(row["ap50"]), number(row["accuracy"]), *(number(row["tasks"].get(t)) for t in tasks),
                 number(row["seconds_per_video"], 2), number(row["time_ratio"], 2), number(row["peak_memory_mb"], 0),
                 number(row["memory_ratio"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    pairs = [pair.partition(":")[::2] for pair in args.pairs]
    for pair, (_, baseline) in zip(args.pairs, pairs):
        if not baseline:
            print(f"error: --pairs takes GUIDED:BASELINE run-model pairs, got {pair!r}", file=sys.stderr)
            return 2
    # Checked before the first arm: the baseline arm reads no layout, so a missing cache would otherwise
    # surface only after the whole baseline has been generated.
    layouts = cache_path(args.prompt_type, args.template_version, args.model, args.cache_dir)
    if not layouts.is_file():
        print(f"error: {describe_missing_cache(layouts)}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.time()
    for guided, baseline in pairs:
        reference = None
        for run_model, arm in [(baseline, None)] + [(guided, arm) for arm in args.arms]:
            print(f"[{time.time() - started:6.0f}s] {run_model} {arm or 'baseline'}", file=sys.stderr, flush=True)
            try:
                run, stats = generate_arm(args, run_model, arm, output_dir)
            except RuntimeError as error:  # the child has printed its own error line
                print(f"error: {error}", file=sys.stderr)
                return 1
            row = {"run_model": run_model, "controls": arm or "none", **stats, **evaluate_arm(args, run)}
            reference = reference or row
            row["time_ratio"] = (row["seconds_per_video"] / reference["seconds_per_video"]
                                 if row["seconds_per_video"] and reference["seconds_per_video"] else None)
            row["memory_ratio"] = row["peak_memory_mb"] / reference["peak_memory_mb"]
            rows.append(row)
    table = format_table(rows)
    print(table)
    if args.out:
        from utils.io import atomic_write_json, atomic_write_text

        command = "python scripts/compare_controls.py " + " ".join(argv)
        atomic_write_text(Path(args.out), f"{table}\n\nCommand: `{command}`\n")
        atomic_write_json(Path(args.out).with_suffix(".json"), {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
