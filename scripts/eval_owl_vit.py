"""Stage-2 evaluation: detect the benchmark objects in generated videos with OWL-ViT and score them
with the stage-1 predicates (reference spec 10.2), plus layout adherence and an HTML report.

The README's settings, on one run and then on both runs averaged (the paper's 1000-video table):

    python scripts/eval_owl_vit.py --run_base_path img_generations/imgs_lvd_templatev0.1_gpt-4-1106-preview_lvd_modelscope256/run0 \\
        --detection_score_threshold 0.1 --nms_threshold 0.1 --class-aware-nms --verbose --save-eval
    python scripts/eval_owl_vit.py --runs img_generations/.../run0 img_generations/.../run1 \\
        --detection_score_threshold 0.1 --nms_threshold 0.1 --class-aware-nms --save-eval --report eval_report

Detections are cached per video (``<prompt folder>/.detections/``), keyed by the video's content,
the detector, the frames and the queries, before thresholding and NMS: a rerun with other
thresholds, NMS settings or predicates does not run the detector again. Shards
(``--skip_first_prompts``/``--num_prompts``) can run in parallel; a final unsharded run then reads
every detection from the cache and prints the whole table in seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from prompt import get_prompt_entries
from utils.eval.detection import (DEFAULT_MODEL_IDS, DETECTOR_KINDS, TINY_DETECTOR_KINDS, DetectorConfig,
                                  DetectorLoadError, EvalConfig, load_detector)
from utils.eval.evaluation import (EVAL_FILE, CacheSettings, VideoResult, average_summaries, collect_eval_items,
                                   evaluate_items, format_average_summary_line, format_reference_lines,
                                   format_summary_table,
                                   summarize_results)
from utils.io import atomic_write_json

logger = logging.getLogger("eval_owl_vit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The reference's flags and defaults (spec 10.2).
    parser.add_argument("--prompt-type", default="lvd", help="prompt list the run was generated from (default: lvd)")
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run_base_path", help="a run directory, e.g. img_generations/.../run0")
    runs.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                      help="several run directories: each is evaluated, then the rates are averaged "
                           "(the README's stage-2 numbers are the mean over run0 and run1)")
    parser.add_argument("--run_start_ind", type=int, default=0, help="entry ind lives in folder ind + this")
    parser.add_argument("--num_prompts", type=int, default=None, help="evaluate this many entries (default: all)")
    parser.add_argument("--skip_first_prompts", type=int, default=0, help="skip entries below this index")
    parser.add_argument("--num_eval_frames", type=int, default=6)
    parser.add_argument("--detection_score_threshold", type=float, default=0.05, help="README: 0.1")
    parser.add_argument("--nms_threshold", type=float, default=0.5, help="README: 0.1")
    parser.add_argument("--class-aware-nms", action="store_true", help="NMS within each query (README: on)")
    parser.add_argument("--save-eval", action="store_true", help=f"write <run_base_path>/{EVAL_FILE}")
    parser.add_argument("--verbose", action="store_true", help="print the surviving detections of every video")
    parser.add_argument("--no-cuda", action="store_true", help="run the detector on the CPU")
    # Ours.
    parser.add_argument("--detector", default="owlvit", choices=DETECTOR_KINDS + TINY_DETECTOR_KINDS,
                        help=f"owlvit = {DEFAULT_MODEL_IDS['owlvit']} (the reference), owlv2 = "
                             f"{DEFAULT_MODEL_IDS['owlv2']}; tiny* = random weights for offline demos "
                             "(meaningless verdicts)")
    parser.add_argument("--detector-path", help="local folder holding the detector (config, weights, preprocessor)")
    parser.add_argument("--detector-id", help="hub id to load instead of the default of --detector")
    parser.add_argument("--detector-revision", help="hub revision of the detector")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per detector forward pass")
    parser.add_argument("--video-batch", type=int, default=8, help="videos whose frames are batched together")
    parser.add_argument("--detections-dir", help="cache detections here instead of <prompt folder>/.detections")
    parser.add_argument("--no-detection-cache", action="store_true", help="neither read nor write cached detections")
    parser.add_argument("--no-adherence", action="store_true", help="skip the layout-adherence metrics")
    parser.add_argument("--adherence-all-frames", action="store_true",
                        help="measure adherence on every frame (detector cost x F / num_eval_frames)")
    parser.add_argument("--all-repeats", action="store_true",
                        help="evaluate every video_<k>.joblib of a prompt folder (the reference skips such folders)")
    parser.add_argument("--save-eval-path", help=f"where --save-eval writes (default: <run_base_path>/{EVAL_FILE})")
    parser.add_argument("--average-json", help="with --runs: write the averaged table here")
    parser.add_argument("--report", metavar="DIR", help="write a self-contained HTML report to DIR/index.html")
    parser.add_argument("--report-max-videos", type=int, default=None, help="draw at most this many videos")
    parser.add_argument("--failures-file", help="append unexpected per-video errors here "
                                                "(default: <run_base_path>/eval_failures.jsonl)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first unexpected error")
    return parser


def _device(no_cuda: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not no_cuda else "cpu"


def _print_video(result: VideoResult, verbose: bool, write) -> None:
    item = result.item
    if result.skipped:
        write(f"[{item.index}] {item.prompt}\nSKIPPED ({item.task}): {result.skipped}")
        return
    lines = [f"[{item.index}] {item.prompt}"]
    if result.success is not None:
        lines.append(f"Eval success ({item.task}): {result.success}")
    if verbose and result.frame_boxes is not None:
        for index, frame in zip(result.frame_indices, result.frame_boxes):
            boxes = ", ".join(f"{result.queries[int(label)]} {float(score):.3f} "
                              f"[{', '.join(f'{v:.3f}' for v in box)}]"
                              for box, score, label in zip(frame.boxes_xyxy, frame.scores, frame.labels))
            lines.append(f"  frame {index}: {boxes or '-'}")
    if verbose and result.adherence is not None:
        a = result.adherence
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"  adherence: mIoU {fmt(a.miou)}, coverage {fmt(a.coverage)}, "
                     f"centroid distance {fmt(a.centroid_distance)}, AP50 {fmt(a.ap50)}")
    write("\n".join(lines))


def evaluate_run(run: Path, args, detector, config: EvalConfig, report_dir: Path | None) -> tuple[dict, int]:
    """Evaluate one run directory; returns (summary, number of unexpected failures)."""
    from tqdm import tqdm

    items = collect_eval_items(run, config.prompt_type, get_prompt_entries(config.prompt_type), skip_first_prompts=args.skip_first_prompts,
                               num_prompts=args.num_prompts, run_start_ind=args.run_start_ind,
                               all_repeats=args.all_repeats)
    if not run.is_dir():
        logger.error("run directory %s does not exist: all %d entries are counted as skipped", run, len(items))
    writer = None
    if report_dir is not None:
        from utils.eval.report import ReportWriter

        writer = ReportWriter(report_dir, title=f"LVD stage-2 evaluation: {run}", max_videos=args.report_max_videos)
    progress = tqdm(total=len(items), desc=run.name or str(run), unit="video", file=sys.stderr)

    def on_result(result: VideoResult, frames) -> None:
        progress.update(1)
        _print_video(result, args.verbose, progress.write)
        if writer is not None:
            writer.add(result, frames)

    cache = CacheSettings(enabled=not args.no_detection_cache,
                          directory=str(Path(args.detections_dir) / run.name) if args.detections_dir else None)
    results, stats = evaluate_items(items, detector, config, cache=cache, video_batch_size=args.video_batch,
                                    on_result=on_result, need_frames=writer is not None, fail_fast=args.fail_fast)
    progress.close()
    summary = summarize_results(results, config, detector)
    summary["run_base_path"] = str(run)
    summary["timing"] = asdict(stats)
    print(f"\nRun {run}")
    print("\n".join(format_reference_lines(summary)))
    print(format_summary_table(summary))
    print(stats.describe())
    failures = [r for r in results if r.error]
    if failures:
        failures_path = Path(args.failures_file) if args.failures_file else run / "eval_failures.jsonl"
        try:
            with open(failures_path, "a", encoding="utf-8") as handle:
                for result in failures:
                    handle.write(json.dumps({"index": result.item.index, "video": str(result.item.video_path),
                                             "prompt": result.item.prompt, "error": result.error}) + "\n")
            print(f"{len(failures)} unexpected failure(s) logged to {failures_path}")
        except OSError as error:
            logger.error("cannot write %s: %s", failures_path, error)
    if args.save_eval:
        path = Path(args.save_eval_path) if args.save_eval_path else run / EVAL_FILE
        atomic_write_json(path, {**summary, "videos": [r.to_dict() for r in results]})
        print(f"wrote {path}")
    if writer is not None:
        notes = [_random_weights_note(detector)] if detector.random_weights else []
        print(f"wrote {writer.write(summary, notes)}")
    return summary, len(failures)


def _random_weights_note(detector) -> str:
    return (f"The detector ({detector.identity}) has random weights: its detections, verdicts and adherence "
            "numbers are meaningless. Use it only to try the pipeline offline.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    runs = [Path(r) for r in (args.runs or [args.run_base_path])]
    if args.save_eval_path and len(runs) > 1:
        print("error: --save-eval-path needs a single --run_base_path", file=sys.stderr)
        return 2
    config = EvalConfig(prompt_type=args.prompt_type, num_eval_frames=args.num_eval_frames,
                        detection_score_threshold=args.detection_score_threshold,
                        nms_threshold=args.nms_threshold, class_aware_nms=args.class_aware_nms,
                        adherence=not args.no_adherence, adherence_all_frames=args.adherence_all_frames)
    try:
        from prompt import PROMPT_TYPES

        if config.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"unknown --prompt-type {config.prompt_type!r}; expected one of {list(PROMPT_TYPES)}")
        if config.num_eval_frames < 1:
            raise ValueError(f"--num_eval_frames must be >= 1, got {config.num_eval_frames}")
        detector = load_detector(DetectorConfig(kind=args.detector, model_id=args.detector_id,
                                                model_path=args.detector_path, revision=args.detector_revision,
                                                device=_device(args.no_cuda), batch_size=args.batch_size))
    except (ValueError, DetectorLoadError, FileNotFoundError) as error:  # MissingWeightsError is a FileNotFoundError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Detector: {detector.identity} on {detector.device}; threshold {config.detection_score_threshold}, "
          f"NMS {config.nms_threshold} ({'class-aware' if config.class_aware_nms else 'plain'}), "
          f"{config.num_eval_frames} frames")
    if detector.random_weights:
        print("WARNING: " + _random_weights_note(detector))
    summaries, failures = [], 0
    for index, run in enumerate(runs):
        report_dir = None
        if args.report:
            report_dir = Path(args.report) / f"{index}_{run.name}" if len(runs) > 1 else Path(args.report)
        summary, run_failures = evaluate_run(run, args, detector, config, report_dir)
        summaries.append(summary)
        failures += run_failures
    if len(runs) > 1:
        combined = average_summaries(summaries, [str(r) for r in runs])
        print(f"\nAverage over {len(runs)} runs (rate % = pooled counts; run-mean % = mean of the per-run rates, "
              "as in the README)")
        print(format_summary_table(combined))
        print(format_average_summary_line(combined))
        if args.average_json:
            atomic_write_json(args.average_json, combined)
            print(f"wrote {args.average_json}")
    if detector.random_weights:
        print("WARNING: random-weight detector: the numbers above are meaningless.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
