"""Stage-2 evaluation: detect the benchmark objects in generated videos with OWL-ViT and score them
with the stage-1 predicates (reference spec 10.2), plus layout adherence and an HTML report.

The README's settings, on one run and then on both runs averaged (the paper's 1000-video table):

    python scripts/eval_owl_vit.py --run_base_path img_generations/imgs_lvd_templatev0.1_gpt-4-1106-preview_lvd_modelscope256/run0 \\
        --detection_score_threshold 0.1 --nms_threshold 0.1 --class-aware-nms --verbose --save-eval
    python scripts/eval_owl_vit.py --runs img_generations/.../run0 img_generations/.../run1 \\
        --detection_score_threshold 0.1 --nms_threshold 0.1 --class-aware-nms --save-eval --report eval_report

The prompt type is read from each run's config.json unless --prompt-type is given. Detections are
cached per video (``<prompt folder>/.detections/``), keyed by the video's content, the detector, the
frames and the queries, before thresholding and NMS: a rerun with other thresholds, NMS settings or
predicates does not run the detector again. Shards (``--skip_first_prompts``/``--num_prompts``) can
run in parallel; a final unsharded run then reads every detection from the cache.

Exit status: 0 when every run evaluated at least one video without unexpected errors; 1 when a run
evaluated nothing (the reason is printed), a video failed unexpectedly (logged to the failures file)
or the runs could not be averaged; 2 for bad flags, an unusable output path or a missing detector.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from prompt import PROMPT_TYPES, get_prompt_entries
from shapes.detector import SHAPES_DETECTOR_KIND, build_shapes_detector
from utils.cli import OutputDirError, ensure_writable_dir, float_in, int_in, run_cli
from utils.eval.averaging import MixedSettingsError, average_summaries
from utils.eval.config import (DEFAULT_MODEL_IDS, DEFAULT_VIDEO_FORMATS, DETECTOR_KINDS, TINY_DETECTOR_KINDS,
                               VIDEO_FORMATS, CacheSettings, DetectorConfig, EvalConfig, RunSelection)
from utils.eval.detector import DetectorLoadError, load_detector
from utils.eval.evaluation import RunEvaluation, evaluate_run
from utils.eval.report import ReportWriter, RunPage, write_runs_index
from utils.eval.results import EVAL_FILE, EvalSummary, VideoResult
from utils.eval.runs import SKIP_NOT_GENERATED, EvalItem, read_run_prompt_type
from utils.eval.tables import (format_average_summary_line, format_reference_lines, format_skip_line,
                               format_summary_table)
from utils.failures import record_failure
from utils.io import atomic_write_json

logger = logging.getLogger("eval_owl_vit")

FAILURES_FILE = "eval_failures.jsonl"
DEFAULT_PROMPT_TYPE = "lvd"   # spec 10.2; used for runs without a config.json (the reference's)
INTERRUPT_HINT = "detections computed so far are cached: rerun the same command to continue"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The reference's flags and defaults (spec 10.2).
    parser.add_argument("--prompt-type", default=None, choices=PROMPT_TYPES,
                        help="prompt list the run was generated from (default: the run's config.json, else lvd)")
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run_base_path", help="a run directory, e.g. img_generations/.../run0")
    runs.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                      help="several run directories: each is evaluated, then the rates are averaged "
                           "(the README's stage-2 numbers are the mean over run0 and run1)")
    parser.add_argument("--run_start_ind", type=int_in(0), default=0, help="entry ind lives in folder ind + this")
    parser.add_argument("--num_prompts", type=int_in(1), default=None, help="evaluate this many entries (default: all)")
    parser.add_argument("--skip_first_prompts", type=int_in(0), default=0, help="skip entries below this index")
    parser.add_argument("--num_eval_frames", type=int_in(1), default=6)
    parser.add_argument("--detection_score_threshold", type=float_in(0, 1), default=0.05, help="README: 0.1")
    parser.add_argument("--nms_threshold", type=float_in(0, 1), default=0.5, help="README: 0.1")
    parser.add_argument("--class-aware-nms", action="store_true", help="NMS within each query (README: on)")
    parser.add_argument("--save-eval", action="store_true", help=f"write <run_base_path>/{EVAL_FILE}")
    parser.add_argument("--verbose", action="store_true",
                        help="print the surviving detections and the reason of every verdict")
    parser.add_argument("--no-cuda", action="store_true", help="run the detector on the CPU")
    # Ours.
    parser.add_argument("--detector", default="owlvit",
                        choices=DETECTOR_KINDS + TINY_DETECTOR_KINDS + (SHAPES_DETECTOR_KIND,),
                        help=f"owlvit = {DEFAULT_MODEL_IDS['owlvit']} (the reference), owlv2 = "
                             f"{DEFAULT_MODEL_IDS['owlv2']}; tiny* = random weights for offline demos "
                             "(meaningless verdicts); shapes = colour segmentation for videos of the shapes "
                             "world (shapes/detector.py, no weights)")
    parser.add_argument("--detector-path", help="local folder holding the detector (config, weights, preprocessor)")
    parser.add_argument("--detector-id", help="hub id to load instead of the default of --detector")
    parser.add_argument("--detector-revision", help="hub revision of the detector")
    parser.add_argument("--batch-size", type=int_in(1), default=32, help="frames per detector forward pass")
    parser.add_argument("--video-batch", type=int_in(1), default=8, help="videos whose frames are batched together")
    parser.add_argument("--detections-dir", help="cache detections here instead of <prompt folder>/.detections")
    parser.add_argument("--no-detection-cache", action="store_true", help="neither read nor write cached detections")
    parser.add_argument("--no-adherence", action="store_true", help="skip the layout-adherence metrics")
    parser.add_argument("--adherence-all-frames", action="store_true",
                        help="measure adherence on every frame (detector cost x F / num_eval_frames)")
    parser.add_argument("--all-repeats", action="store_true",
                        help="evaluate every video_<k> of a prompt folder (the reference skips such folders)")
    parser.add_argument("--video-variant", default="", metavar="VARIANT",
                        help="evaluate the upsampled copies video_<k>_VARIANT written by scripts/upsample.py "
                             "(zsxl, sdxl, zsxl_sdxl_s0.1, ...) instead of the generated videos")
    parser.add_argument("--video-formats", nargs="+", choices=VIDEO_FORMATS, default=list(DEFAULT_VIDEO_FORMATS),
                        help="read each video from the first of these files that exists (default: joblib mp4; "
                             "GIF changes colours and can merge frames)")
    parser.add_argument("--save-eval-path", help=f"where --save-eval writes (default: <run_base_path>/{EVAL_FILE})")
    parser.add_argument("--average-json", help="with --runs: write the averaged table here")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="with --runs: average runs even if their settings (e.g. prompt type) differ")
    parser.add_argument("--report", metavar="DIR",
                        help="write an HTML report to DIR/index.html (with --runs: one page per run in "
                             "DIR/<i>_<run>/ and the averaged table in DIR/index.html)")
    parser.add_argument("--report-max-videos", type=int_in(0), default=None, help="draw at most this many videos")
    parser.add_argument("--failures-file", help=f"append unexpected per-video errors here "
                                                f"(default: <run_base_path>/{FAILURES_FILE})")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first unexpected error")
    return parser


def _device(no_cuda: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not no_cuda else "cpu"


def _check_output_file(path: Path, flag: str) -> None:
    """One clear error (OutputDirError) before any work if ``path`` cannot be written."""
    ensure_writable_dir(path.parent, flag)
    if path.is_dir():
        raise OutputDirError(f"{flag} {path}: is a folder; expected a file name")


def _check_outputs(args, runs: list[Path]) -> None:
    if args.report:
        ensure_writable_dir(args.report, "--report")
    for flag, value in (("--save-eval-path", args.save_eval_path), ("--average-json", args.average_json),
                        ("--failures-file", args.failures_file)):
        if value:
            _check_output_file(Path(value), flag)
    if args.save_eval and not args.save_eval_path:
        for run in runs:
            if run.is_dir() and not os.access(run, os.W_OK | os.X_OK):
                raise OutputDirError(f"--save-eval: cannot write {run / EVAL_FILE}: the folder is not writable "
                                     "(pass --save-eval-path)")


def _resolve_prompt_type(run: Path, given: str | None) -> tuple[str, str]:
    """(prompt type, where it came from) for one run."""
    if given is not None:
        return given, "--prompt-type"
    recorded = read_run_prompt_type(run) if run.is_dir() else None
    if recorded is None:
        return DEFAULT_PROMPT_TYPE, "default: the run records no prompt_type"
    return recorded, str(run / "config.json")


def _print_video(result: VideoResult, verbose: bool, write) -> None:
    item = result.item
    if result.skip is not None:
        if result.skip.kind != SKIP_NOT_GENERATED:  # those are counted in one line at the end (format_skip_line)
            write(f"[{item.index}] {item.prompt}\nSKIPPED ({item.task}): {result.skip.message}")
        return
    lines = [f"[{item.index}] {item.prompt}"]
    if result.verdict is not None:
        lines.append(f"Eval success ({item.task}): {result.verdict.success}")
        if verbose:
            lines.append(f"  why: {result.verdict.reason}")
            for index, frame in zip(result.frame_indices, result.verdict.frame_boxes):
                boxes = ", ".join(f"{result.verdict.queries[int(label)]} {float(score):.3f} "
                                  f"[{', '.join(f'{v:.3f}' for v in box)}]"
                                  for box, score, label in zip(frame.boxes_xyxy, frame.scores, frame.labels))
                lines.append(f"  frame {index}: {boxes or '-'}")
    if verbose and result.adherence is not None:
        a = result.adherence
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"  adherence: mIoU {fmt(a.miou)}, coverage {fmt(a.coverage)}, "
                     f"centroid distance {fmt(a.centroid_distance)}, AP50 {fmt(a.ap50)}")
    write("\n".join(lines))


def _variants_note(items: list[EvalItem], variant: str) -> str | None:
    with_others = [i for i in items if i.other_variants]
    if not with_others or variant:
        return None
    variants = ", ".join(dict.fromkeys(v for i in with_others for v in i.other_variants))
    return (f"note: {len(with_others)} prompt folder(s) also hold upsampled videos ({variants}); they are not "
            f"repeats and are not evaluated here: --video-variant {with_others[0].other_variants[0]} evaluates them")


def _random_weights_note(detector) -> str:
    return (f"The detector ({detector.identity}) has random weights: its detections, verdicts and adherence "
            "numbers are meaningless. Use it only to try the pipeline offline.")


def _evaluate_one_run(run: Path, args, detector, config: EvalConfig, report_dir: Path | None) -> RunEvaluation:
    """Evaluate one run with the CLI's batch concerns: progress, per-video lines, failures log, eval.json,
    report."""
    from tqdm import tqdm

    writer = None
    if report_dir is not None:
        writer = ReportWriter(report_dir, title=f"LVD stage-2 evaluation: {run}", max_videos=args.report_max_videos)
    failures_path = Path(args.failures_file) if args.failures_file else run / FAILURES_FILE
    progress = None

    def on_items(items: list[EvalItem]) -> None:
        nonlocal progress
        note = _variants_note(items, config.video_variant)
        if note:
            print(note)
        progress = tqdm(total=len(items), desc=run.name or str(run), unit="video", file=sys.stderr)

    def on_result(result: VideoResult, frames) -> None:
        progress.update(1)
        _print_video(result, args.verbose, progress.write)
        if writer is not None:
            writer.add(result, frames)

    def on_failure(item: EvalItem, what: str, error: BaseException) -> None:
        try:
            record_failure(failures_path, error, run=str(run), index=item.index, task=item.task, prompt=item.prompt,
                           video=str(item.video_path), stage=what)
        except OSError as write_error:
            logger.error("cannot write %s: %s", failures_path, write_error)

    cache = CacheSettings(enabled=not args.no_detection_cache,
                          directory=str(Path(args.detections_dir) / run.name) if args.detections_dir else None)
    selection = RunSelection(skip_first_prompts=args.skip_first_prompts, num_prompts=args.num_prompts,
                             run_start_ind=args.run_start_ind, all_repeats=args.all_repeats,
                             video_formats=tuple(args.video_formats))
    try:
        evaluation = evaluate_run(run, get_prompt_entries(config.prompt_type), detector, config, selection,
                                  cache=cache, video_batch_size=args.video_batch, on_items=on_items,
                                  on_result=on_result, on_failure=on_failure, need_frames=writer is not None,
                                  fail_fast=args.fail_fast)
    finally:
        if progress is not None:
            progress.close()
    summary = evaluation.summary
    print(f"\nRun {run}")
    print("\n".join(format_reference_lines(summary)))
    print(format_summary_table(summary))
    print(format_skip_line(summary))
    print(evaluation.stats.describe())
    if evaluation.failures:
        print(f"{len(evaluation.failures)} unexpected failure(s) logged to {failures_path}")
    if args.save_eval:
        path = Path(args.save_eval_path) if args.save_eval_path else run / EVAL_FILE
        atomic_write_json(path, {**summary.to_dict(), "videos": [r.to_dict() for r in evaluation.results]})
        print(f"wrote {path}")
    if writer is not None:
        notes = [_random_weights_note(detector)] if detector.random_weights else []
        print(f"wrote {writer.write(summary, notes)}")
    return evaluation


def _nothing_evaluated_line(run: Path, evaluation: RunEvaluation) -> str:
    first = next((r.skip.message for r in evaluation.results if r.skip is not None), None)
    line = f"error: nothing was evaluated in {run}: {format_skip_line(evaluation.summary)}"
    return line + (f". First reason: {first}" if first else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    runs = [Path(r) for r in (args.runs or [args.run_base_path])]
    if args.save_eval_path and len(runs) > 1:
        parser.error("--save-eval-path needs a single --run_base_path")
    try:
        _check_outputs(args, runs)
        if args.detector == SHAPES_DETECTOR_KIND:
            detector = build_shapes_detector(batch_size=args.batch_size)
        else:
            detector = load_detector(DetectorConfig(kind=args.detector, model_id=args.detector_id,
                                                    model_path=args.detector_path, revision=args.detector_revision,
                                                    device=_device(args.no_cuda), batch_size=args.batch_size))
    except (OutputDirError, DetectorLoadError, FileNotFoundError) as error:  # MissingWeightsError: FileNotFoundError
        print(f"error: {error}", file=sys.stderr)
        return 2
    base = EvalConfig(num_eval_frames=args.num_eval_frames, detection_score_threshold=args.detection_score_threshold,
                      nms_threshold=args.nms_threshold, class_aware_nms=args.class_aware_nms,
                      adherence=not args.no_adherence, adherence_all_frames=args.adherence_all_frames,
                      video_variant=args.video_variant)
    print(f"Detector: {detector.identity} on {detector.device}; threshold {base.detection_score_threshold}, "
          f"NMS {base.nms_threshold} ({'class-aware' if base.class_aware_nms else 'plain'}), "
          f"{base.num_eval_frames} frames" + (f", variant {base.video_variant}" if base.video_variant else ""))
    if detector.random_weights:
        print("WARNING: " + _random_weights_note(detector))
    summaries: list[EvalSummary] = []
    pages: list[RunPage] = []
    problems = 0
    for index, run in enumerate(runs):
        prompt_type, source = _resolve_prompt_type(run, args.prompt_type)
        if prompt_type not in PROMPT_TYPES:
            print(f"error: {source} names prompt type {prompt_type!r}, which this checkout does not know "
                  f"(known: {', '.join(PROMPT_TYPES)}); pass --prompt-type. Nothing was evaluated in {run}",
                  file=sys.stderr)
            problems += 1
            continue
        print(f"Run {run}: prompt type {prompt_type} ({source})")
        report_dir = None
        if args.report:
            report_dir = Path(args.report) / f"{index}_{run.name}" if len(runs) > 1 else Path(args.report)
        evaluation = _evaluate_one_run(run, args, detector, dataclasses.replace(base, prompt_type=prompt_type),
                                       report_dir)
        summaries.append(evaluation.summary)
        if report_dir is not None:
            pages.append(RunPage(str(run), report_dir / "index.html", evaluation.summary))
        if evaluation.summary.evaluated_videos == 0:
            print(_nothing_evaluated_line(run, evaluation), file=sys.stderr)
            problems += 1
        problems += bool(evaluation.failures)
    combined = None
    if len(runs) > 1 and summaries:
        try:
            combined = average_summaries(summaries, [s.run_base_path for s in summaries], allow_mixed=args.allow_mixed)
        except MixedSettingsError as error:
            print(f"error: not averaged: {error}", file=sys.stderr)
            problems += 1
        if combined is not None:
            print(f"\nAverage over {len(summaries)} runs (rate % = pooled counts; run-mean % = mean of the per-run "
                  "rates, as in the README)")
            print(format_summary_table(combined))
            print(format_average_summary_line(combined))
            if args.average_json:
                atomic_write_json(args.average_json, combined.to_dict())
                print(f"wrote {args.average_json}")
    if args.report and len(runs) > 1:
        notes = [_random_weights_note(detector)] if detector.random_weights else []
        print(f"wrote {write_runs_index(args.report, pages, combined, notes)}")
    if detector.random_weights:
        print("WARNING: random-weight detector: the numbers above are meaningless.")
    return 1 if problems else 0


def run(argv: list[str] | None = None) -> int:
    """``main`` as the command line runs it: a closed pipe ends quietly, Ctrl-C in one line."""
    return run_cli(main, argv, interrupt_hint=INTERRUPT_HINT)


if __name__ == "__main__":
    sys.exit(run())
