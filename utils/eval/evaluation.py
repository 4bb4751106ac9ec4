"""Stage-2 evaluation of a generation run (reference spec 10.2), plus layout adherence.

A run directory looks like::

    <run_base_path>/config.json               resolved run config; its "prompt_type" is checked
    <run_base_path>/<ind + run_start_ind>/video_<k>.joblib   uint8 (F, H, W, 3)
    <run_base_path>/<ind + run_start_ind>/layout.json        {"prompt", "layout": layout_to_dict(...)}

`collect_eval_items` lists the videos of benchmark indices ``[skip, skip + num)`` (with a skip
reason where the input is unusable), `evaluate_items` detects in batches (through the detection
cache) and judges each video, `summarize_results` builds the paper's table as JSON, and
`average_summaries` combines several runs the way the README's 1000-video numbers are made.
A bad video never stops the evaluation: it is reported and counted as skipped.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from utils.eval.detection import (CACHE_DIR_NAME, Detector, DetectionRequest, EvalConfig, FrameBoxes,
                                  FrameSelectionError, VideoDetections, build_cache_key, cache_file_path,
                                  compute_file_digest, describe_config, judge_detections,
                                  load_cached_detections, postprocess_detections, run_detector,
                                  save_cached_detections, select_frame_indices)
from utils.eval.metrics import VideoAdherence, score_adherence, summarize_adherence
from utils.layout import LayoutError, SceneLayout, layout_from_dict, normalize_prompt, resample_boxes, strip_phrase
from utils.predicates import Check, TaskTally

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"
LAYOUT_FILE = "layout.json"
EVAL_FILE = "eval.json"
VIDEO_GLOB = "video_*.joblib"
NO_TASK = "demo"  # the task name of prompts without a benchmark check (adherence only)


class EvalInputError(ValueError):
    """One video cannot be evaluated (missing, unreadable, too short, or from another prompt list)."""


# --------------------------------------------------------------------------------------------
# Listing the videos of a run


@dataclass(frozen=True)
class EvalItem:
    """One video to evaluate: benchmark index ``index``, stored in ``folder``."""

    index: int
    folder: Path
    prompt: str
    check: Check | None            # None for prompt types without a benchmark (adherence only)
    video_path: Path | None = None
    skip_reason: str | None = None

    @property
    def task(self) -> str:
        return self.check.task if self.check is not None else NO_TASK


def _find_key(data: Any, key: str) -> Any:
    """The first value of ``key`` in nested dicts (breadth first), or None."""
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node[key]
            queue.extend(node.values())
    return None


def read_run_prompt_type(run_base_path: str | Path) -> str | None:
    """The ``prompt_type`` recorded in the run's config.json; None if there is none (reference runs)."""
    path = Path(run_base_path) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        value = _find_key(json.loads(path.read_text(encoding="utf-8")), "prompt_type")
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable run config (%s); the prompt type is not checked", path, error)
        return None
    return value if isinstance(value, str) else None


def _video_sort_key(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"video_(\d+)", path.stem)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def collect_eval_items(run_base_path: str | Path, prompt_type: str, entries: Sequence[tuple[str, Check | None]], *,
                       skip_first_prompts: int = 0,
                       num_prompts: int | None = None, run_start_ind: int = 0,
                       all_repeats: bool = False) -> list[EvalItem]:
    """The videos of benchmark entries ``[skip_first_prompts, skip_first_prompts + num_prompts)``.

    Entry ``ind`` lives in ``<run>/<ind + run_start_ind>/`` (spec 10.2 step 1). Like the reference,
    a folder with no ``video_*.joblib`` or with several is skipped (``all_repeats`` evaluates each).
    Unusable entries come back with a ``skip_reason``; nothing here raises for bad input.
    """
    run = Path(run_base_path)
    end = len(entries) if num_prompts is None else min(len(entries), skip_first_prompts + num_prompts)
    run_type = read_run_prompt_type(run) if run.is_dir() else None
    items = []
    for ind in range(skip_first_prompts, end):
        prompt, check = entries[ind]
        folder = run / str(ind + run_start_ind)
        base = dict(index=ind, folder=folder, prompt=prompt, check=check)
        if not run.is_dir():
            items.append(EvalItem(**base, skip_reason=f"run directory {run} does not exist"))
            continue
        if run_type is not None and run_type != prompt_type:
            items.append(EvalItem(**base, skip_reason=f"{run / RUN_CONFIG_FILE} says the run was generated for "
                                  f"prompt type {run_type!r}, not {prompt_type!r} (pass --prompt-type {run_type})"))
            continue
        if not folder.is_dir():
            items.append(EvalItem(**base, skip_reason=f"no folder {folder} for prompt {ind}"))
            continue
        videos = sorted(folder.glob(VIDEO_GLOB), key=_video_sort_key)
        if not videos:
            items.append(EvalItem(**base, skip_reason=f"no {VIDEO_GLOB} in {folder}"))
        elif len(videos) > 1 and not all_repeats:
            names = ", ".join(v.name for v in videos)
            items.append(EvalItem(**base, skip_reason=f"{len(videos)} videos in {folder} ({names}); expected "
                                  "exactly one (pass --all-repeats to evaluate each)"))
        else:
            items.extend(EvalItem(**base, video_path=video) for video in videos)
    return items


def read_generation_layout(item: EvalItem) -> SceneLayout | None:
    """The layout the video was generated from (``layout.json``), None if the run has none.

    Raises :class:`EvalInputError` if layout.json names another prompt: the run was generated for
    another prompt list (or ``--run_start_ind`` is off). An unreadable layout only costs adherence.
    """
    path = item.folder / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s); no adherence for this video", path, error)
        return None
    recorded = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(recorded, str) and normalize_prompt(recorded) != item.prompt:
        raise EvalInputError(f"{path} was generated for {recorded!r}, but entry {item.index} of this prompt "
                             f"list is {item.prompt!r}: wrong --prompt-type or --run_start_ind?")
    try:
        return layout_from_dict(data["layout"])
    except (KeyError, TypeError, LayoutError) as error:
        logger.warning("%s: no usable layout (%s); no adherence for this video", path, error)
        return None


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def build_adherence_queries(phrases: Sequence[str]) -> tuple[tuple[str, ...], list[int]]:
    """Detector queries for layout phrases, in the benchmark's form ("a photo of a cat").

    Returns the unique queries (first-seen order) and, per phrase, the index of its query.
    """
    queries: list[str] = []
    labels = []
    for phrase in phrases:
        noun = strip_phrase(phrase) or phrase.strip()
        has_article = noun.split(" ", 1)[0].lower() in ("a", "an", "the")
        query = f"a photo of {noun if has_article else _inflect().a(noun)}"
        if query not in queries:
            queries.append(query)
        labels.append(queries.index(query))
    return tuple(queries), labels


# --------------------------------------------------------------------------------------------
# Evaluating videos


@dataclass(frozen=True)
class CacheSettings:
    """Where detections are cached: ``<prompt folder>/.detections/`` unless ``directory`` is given."""

    enabled: bool = True
    directory: str | None = None

    def folder_for(self, item: EvalItem) -> Path:
        if self.directory is None:
            return item.folder / CACHE_DIR_NAME
        return Path(self.directory) / item.folder.parent.name / item.folder.name


@dataclass
class VideoResult:
    """The outcome for one video; ``skipped`` holds the reason when it could not be evaluated."""

    item: EvalItem
    success: bool | None = None
    skipped: str | None = None
    error: str | None = None                    # traceback of an unexpected failure
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    frame_indices: tuple[int, ...] = ()
    queries: tuple[str, ...] = ()
    frame_boxes: list[FrameBoxes] | None = None  # what entered the pseudo-layout, per evaluated frame
    layout: SceneLayout | None = None            # the generating layout
    adherence: VideoAdherence | None = None
    adherence_frame_indices: tuple[int, ...] = ()
    from_cache: bool = False

    def to_dict(self) -> dict:
        item = self.item
        data = {"index": item.index, "folder": item.folder.name,
                "video": str(item.video_path) if item.video_path else None, "prompt": item.prompt,
                "task": item.task, "success": self.success, "skipped": self.skipped,
                "num_frames": self.num_frames, "height": self.height, "width": self.width,
                "frame_indices": list(self.frame_indices), "queries": list(self.queries),
                "from_cache": self.from_cache}
        if self.frame_boxes is not None:
            data["detections"] = [
                [{"label": int(label), "query": self.queries[int(label)], "score": float(score),
                  "box_xyxy": [float(v) for v in box]}
                 for box, score, label in zip(frame.boxes_xyxy, frame.scores, frame.labels)]
                for frame in self.frame_boxes]
        if self.adherence is not None:
            data["adherence"] = {**self.adherence.to_dict(),
                                 "frame_indices": list(self.adherence_frame_indices)}
        return data


@dataclass
class EvalStats:
    videos: int = 0
    skipped: int = 0
    detected_videos: int = 0
    cached_videos: int = 0
    detected_frames: int = 0
    detector_seconds: float = 0.0
    total_seconds: float = 0.0

    def describe(self) -> str:
        rate = self.detected_frames / self.detector_seconds if self.detector_seconds > 0 else float("nan")
        return (f"{self.videos} videos ({self.skipped} skipped) in {self.total_seconds:.1f} s; detector ran on "
                f"{self.detected_videos} videos ({self.detected_frames} frames, {self.detector_seconds:.1f} s, "
                f"{rate:.1f} frames/s); {self.cached_videos} videos from the detection cache")


@dataclass(eq=False)  # compared by identity
class _Prepared:
    item: EvalItem
    layout: SceneLayout | None
    frames: np.ndarray | None                       # the whole video, when it had to be read
    num_frames: int | None
    eval_indices: tuple[int, ...] | None
    detect_indices: tuple[int, ...] | None
    frames_mode: str
    query_sets: tuple[tuple[str, ...], ...]
    adherence_labels: list[int] = field(default_factory=list)
    cache_files: dict = field(default_factory=dict)  # queries -> (path, key)
    detections: dict = field(default_factory=dict)   # queries -> VideoDetections
    from_cache: bool = False                          # every query set came from the cache

    @property
    def missing(self) -> list[tuple[str, ...]]:
        return [q for q in self.query_sets if q not in self.detections]


def _load_frames(path: Path) -> np.ndarray:
    from utils.video_io import VideoReadError, load_video

    try:
        return load_video(path)
    except VideoReadError as error:
        raise EvalInputError(str(error)) from error


def _prepare(item: EvalItem, detector: Detector, config: EvalConfig, cache: CacheSettings,
             need_frames: bool) -> _Prepared:
    if item.video_path is None or not item.video_path.is_file():
        raise EvalInputError(f"video file not found: {item.video_path}")
    layout = read_generation_layout(item)
    query_sets: list[tuple[str, ...]] = []
    if item.check is not None:
        query_sets.append(tuple(item.check.queries))
    adherence_queries, adherence_labels = (), []
    if config.adherence and layout is not None and layout.tracks:
        adherence_queries, adherence_labels = build_adherence_queries(layout.phrases)
        if adherence_queries not in query_sets:
            query_sets.append(adherence_queries)
    if not query_sets:
        raise EvalInputError(f"nothing to evaluate for {item.video_path}: prompt type without a benchmark "
                             "check and no layout.json to measure adherence against")
    all_frames = config.adherence_all_frames and bool(adherence_queries)
    frames_mode = "all" if all_frames else f"eval{config.num_eval_frames}"
    prepared = _Prepared(item, layout, None, None, None, None, frames_mode, tuple(query_sets), adherence_labels)
    if cache.enabled:
        try:
            digest = compute_file_digest(item.video_path)
        except OSError as error:
            raise EvalInputError(f"cannot read {item.video_path}: {error}") from error
        folder = cache.folder_for(item)
        for queries in query_sets:
            key = build_cache_key(digest, detector.identity, frames_mode, queries)
            path = cache_file_path(folder, item.video_path, key)
            prepared.cache_files[queries] = (path, key)
            cached = load_cached_detections(path, key)
            if cached is not None:
                prepared.detections[queries] = cached
    prepared.from_cache = not prepared.missing
    if prepared.detections:
        prepared.num_frames = next(iter(prepared.detections.values())).num_frames
    if prepared.missing or need_frames or prepared.num_frames is None:
        prepared.frames = _load_frames(item.video_path)
        prepared.num_frames = int(prepared.frames.shape[0])
    try:
        prepared.eval_indices = select_frame_indices(prepared.num_frames, config.num_eval_frames)
    except FrameSelectionError as error:
        raise EvalInputError(f"{item.video_path}: {error}") from error
    prepared.detect_indices = tuple(range(prepared.num_frames)) if all_frames else prepared.eval_indices
    return prepared


def _judge(prepared: _Prepared, config: EvalConfig) -> VideoResult:
    item = prepared.item
    any_detections: VideoDetections = next(iter(prepared.detections.values()))
    result = VideoResult(item=item, num_frames=prepared.num_frames, height=any_detections.height,
                         width=any_detections.width, frame_indices=prepared.eval_indices,
                         layout=prepared.layout,
                         from_cache=prepared.from_cache)
    positions = [prepared.detect_indices.index(i) for i in prepared.eval_indices]
    if item.check is not None:
        detections = prepared.detections[tuple(item.check.queries)]
        result.success, _, result.frame_boxes = judge_detections(item.check, detections, item.prompt, config,
                                                                 positions)
        result.queries = detections.queries
    if prepared.adherence_labels:
        layout = prepared.layout
        adherence_queries, _ = build_adherence_queries(layout.phrases)
        detections = prepared.detections[adherence_queries]
        boxes = postprocess_detections(detections, config, one_box_per_class=False)
        layout_boxes = resample_boxes(layout, prepared.num_frames)[:, list(prepared.detect_indices)]
        result.adherence = score_adherence(layout_boxes, [t.id for t in layout.tracks], layout.phrases,
                                           prepared.adherence_labels, adherence_queries,
                                           [b.as_tuple() for b in boxes])
        result.adherence_frame_indices = prepared.detect_indices
    return result


def _chunks(values: Sequence, size: int) -> Iterable[Sequence]:
    size = max(1, size)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _detect_with_retry(detector: Detector, requests: list[DetectionRequest],
                       fail_fast: bool) -> list[list[VideoDetections] | BaseException]:
    """run_detector on the batch; if it fails (e.g. CUDA out of memory), each video alone, so one bad
    video costs only itself. Failures come back as the exception, in place of the detections."""
    try:
        return run_detector(detector, requests)
    except Exception as error:  # noqa: BLE001 - see evaluate_items
        if fail_fast:
            raise
        if len(requests) == 1:
            return [error]
        logger.warning("detection of %d videos failed together (%s: %s); retrying one by one",
                       len(requests), type(error).__name__, error)
    outputs: list[list[VideoDetections] | BaseException] = []
    for request in requests:
        try:
            outputs.append(run_detector(detector, [request])[0])
        except Exception as error:  # noqa: BLE001 - see evaluate_items
            outputs.append(error)
    return outputs


OnResult = Callable[[VideoResult, "np.ndarray | None"], None]


def evaluate_items(items: Sequence[EvalItem], detector: Detector, config: EvalConfig, *,
                   cache: CacheSettings = CacheSettings(), video_batch_size: int = 8,
                   on_result: OnResult | None = None, need_frames: bool = False,
                   fail_fast: bool = False) -> tuple[list[VideoResult], EvalStats]:
    """Evaluate ``items`` ``video_batch_size`` videos at a time (their frames share detector batches).

    ``on_result(result, frames)`` is called once per item in order; ``frames`` is the whole video
    when it was read (always with ``need_frames``), else None. Bad input is recorded as skipped.
    Unless ``fail_fast``, an unexpected exception for one video is also recorded (with its
    traceback in ``result.error``) instead of stopping the run: a batch job must not die on video 400.
    """
    stats = EvalStats()
    results: list[VideoResult] = []
    started = time.perf_counter()

    def emit(result: VideoResult, frames: np.ndarray | None = None) -> None:
        stats.videos += 1
        if result.skipped:
            stats.skipped += 1
            logger.info("skipped prompt %d (%s): %s", result.item.index, result.item.task, result.skipped)
        results.append(result)
        if on_result is not None:
            on_result(result, frames)

    def failure(item: EvalItem, what: str, error: BaseException) -> VideoResult:
        if fail_fast:
            raise error
        logger.error("prompt %d: %s failed: %s", item.index, what, error, exc_info=error)
        return VideoResult(item=item, skipped=f"{what} failed: {type(error).__name__}: {error}",
                           error="".join(traceback.format_exception(error)))

    for chunk in _chunks(list(items), video_batch_size):
        # One slot per item, emitted in item order once the chunk is done: a finished VideoResult
        # (skipped or failed) or a _Prepared video still to detect and judge.
        slots: list[VideoResult | _Prepared] = []
        for item in chunk:
            if item.skip_reason:
                slots.append(VideoResult(item=item, skipped=item.skip_reason))
                continue
            try:
                slots.append(_prepare(item, detector, config, cache, need_frames))
            except EvalInputError as error:
                slots.append(VideoResult(item=item, skipped=str(error)))
            except Exception as error:  # noqa: BLE001 - see the docstring
                slots.append(failure(item, "reading the video", error))
        todo = [p for p in slots if isinstance(p, _Prepared) and p.missing]
        failed: dict[int, VideoResult] = {}
        if todo:
            requests = [DetectionRequest(p.frames[list(p.detect_indices)], p.detect_indices, p.num_frames,
                                         tuple(p.missing)) for p in todo]
            detect_started = time.perf_counter()
            outputs = _detect_with_retry(detector, requests, fail_fast)
            stats.detector_seconds += time.perf_counter() - detect_started
            for p, request, video_outputs in zip(todo, requests, outputs):
                if isinstance(video_outputs, BaseException):
                    failed[id(p)] = failure(p.item, "detection", video_outputs)
                    continue
                stats.detected_videos += 1
                stats.detected_frames += len(request.frame_indices)
                for queries, detections in zip(request.query_sets, video_outputs):
                    p.detections[queries] = detections
                    if queries in p.cache_files:
                        path, key = p.cache_files[queries]
                        try:
                            save_cached_detections(path, key, detections)
                        except OSError as error:
                            logger.warning("cannot write the detection cache %s: %s", path, error)
        for slot in slots:
            if isinstance(slot, VideoResult):
                emit(slot)
            elif id(slot) in failed:
                emit(failed[id(slot)], slot.frames)
            else:
                stats.cached_videos += int(slot.from_cache)
                try:
                    result = _judge(slot, config)
                except Exception as error:  # noqa: BLE001 - see the docstring
                    result = failure(slot.item, "judging", error)
                emit(result, slot.frames)
    stats.total_seconds = time.perf_counter() - started
    return results, stats


# --------------------------------------------------------------------------------------------
# The paper's table


def summarize_results(results: Sequence[VideoResult], config: EvalConfig,
                      detector: Detector | None = None) -> dict:
    """``{"tasks": {name: {"correct", "total"}}, "overall": {...}}`` (the stage-1 JSON shape), plus
    ``skipped``, ``adherence`` (per task and overall), the reference's eval.json fields
    (``success_counts``, ``sample_counts``, ``successes``, ``*_overall``) and ``config``."""
    tally = TaskTally.empty()
    successes: dict[str, list[bool]] = {}
    skipped: dict[str, int] = {}
    adherence: dict[str, list[dict]] = {}
    for result in results:
        task = result.item.task
        if result.skipped:
            skipped[task] = skipped.get(task, 0) + 1
            continue
        if result.success is not None:
            tally.add(task, result.success)
            successes.setdefault(task, []).append(bool(result.success))
        if result.adherence is not None:
            adherence.setdefault(task, []).append(result.adherence.to_dict())
    summary = tally.to_dict()
    summary["skipped"] = {"total": sum(skipped.values()), "tasks": skipped}
    summary["adherence"] = {"tasks": {task: summarize_adherence(videos) for task, videos in adherence.items()},
                            "overall": summarize_adherence([v for videos in adherence.values() for v in videos])}
    summary["success_counts"] = {task: counts[0] for task, counts in tally.counts.items()}
    summary["sample_counts"] = {task: counts[1] for task, counts in tally.counts.items()}
    summary["successes"] = successes
    summary["success_counts_overall"] = summary["overall"]["correct"]
    summary["sample_counts_overall"] = summary["overall"]["total"]
    summary["config"] = describe_config(detector, config)
    return summary


def _rate(correct: int, total: int) -> float | None:
    return correct / total if total else None


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def summary_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper's table: success rate per task and overall (percent), skipped
    counts and the adherence columns; averaged summaries also get the mean of the per-run rates."""
    adherence = summary.get("adherence", {"tasks": {}, "overall": {}})
    skipped = summary.get("skipped", {"total": 0, "tasks": {}})
    rates_mean = summary.get("rates_mean")
    tasks = list(dict.fromkeys([*summary["tasks"], *adherence["tasks"], *skipped["tasks"]]))
    header = ["task", "correct", "total", "rate %"] + (["run-mean %"] if rates_mean else []) + \
             ["skipped", "mIoU", "coverage", "CD", "AP50"]
    rows = []
    for name in tasks + ["overall"]:
        counts = summary["overall"] if name == "overall" else summary["tasks"].get(name, {"correct": 0, "total": 0})
        adh = adherence["overall"] if name == "overall" else adherence["tasks"].get(name, {})
        row = [name, str(counts["correct"]), str(counts["total"]), _fmt(_rate(counts["correct"], counts["total"]), 100)]
        if rates_mean:
            mean = rates_mean["overall"] if name == "overall" else rates_mean["tasks"].get(name)
            row.append(_fmt(mean, 100))
        row.append(str(skipped["total"] if name == "overall" else skipped["tasks"].get(name, 0)))
        row += [_fmt(adh.get(m), 1, 3) for m in ("miou", "coverage", "centroid_distance", "ap50")]
        rows.append(row)
    return header, rows


def format_summary_table(summary: dict) -> str:
    """:func:`summary_rows` as aligned text."""
    header, rows = summary_rows(summary)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header)] + [line(row) for row in rows])


def format_reference_lines(summary: dict) -> list[str]:
    """The reference script's closing lines (spec 10.1/10.2): rates as fractions with 2 decimals."""
    lines, rates = [], []
    for task, counts in summary["tasks"].items():
        rate = _rate(counts["correct"], counts["total"]) or 0.0
        rates.append(rate)
        lines.append(f"Eval type: {task}, success: {counts['correct']}/{counts['total']}, rate: {rate:.2f}")
    overall = summary["overall"]
    overall_rate = _rate(overall["correct"], overall["total"]) or 0.0
    lines.append(f"Overall: success: {overall['correct']}/{overall['total']}, rate: {overall_rate:.2f}")
    lines.append("Summary: " + "/".join(f"{r:.2f}" for r in rates + [overall_rate]))
    return lines


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def format_average_summary_line(combined: dict) -> str:
    """``Summary: r1/r2/.../overall`` of the mean per-run rates (the README's multi-run figures)."""
    rates = list(combined["rates_mean"]["tasks"].values()) + [combined["rates_mean"]["overall"]]
    return "Summary: " + "/".join("-" if r is None else f"{r:.2f}" for r in rates)


def average_summaries(summaries: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """Combine the summaries of several runs (e.g. run0 and run1 = the README's 1000 videos).

    ``tasks`` / ``overall`` hold the summed counts (same JSON shape as one run), ``rates_mean`` the
    mean of the per-run rates (what the README reports; equal to the pooled rate when the runs have
    the same counts), ``adherence`` the mean of the per-run adherence values.
    """
    tasks = list(dict.fromkeys(task for s in summaries for task in s["tasks"]))
    combined: dict[str, Any] = {"tasks": {}, "overall": {"correct": 0, "total": 0}}
    rates_tasks = {}
    for task in tasks:
        counts = [s["tasks"][task] for s in summaries if task in s["tasks"]]
        combined["tasks"][task] = {"correct": sum(c["correct"] for c in counts),
                                   "total": sum(c["total"] for c in counts)}
        rates_tasks[task] = _mean(_rate(c["correct"], c["total"]) for c in counts)
    for s in summaries:
        combined["overall"]["correct"] += s["overall"]["correct"]
        combined["overall"]["total"] += s["overall"]["total"]
    combined["rates_mean"] = {"tasks": rates_tasks, "overall": _mean(
        _rate(s["overall"]["correct"], s["overall"]["total"]) for s in summaries)}
    skipped_tasks: dict[str, int] = {}
    for s in summaries:
        for task, count in s.get("skipped", {}).get("tasks", {}).items():
            skipped_tasks[task] = skipped_tasks.get(task, 0) + count
    combined["skipped"] = {"total": sum(skipped_tasks.values()), "tasks": skipped_tasks}
    metrics = ("miou", "coverage", "centroid_distance", "ap50")

    def mean_adherence(parts: list[dict]) -> dict:
        return {"videos": sum(p.get("videos", 0) for p in parts),
                **{m: _mean(p.get(m) for p in parts) for m in metrics}}

    adherence_tasks = list(dict.fromkeys(t for s in summaries for t in s.get("adherence", {}).get("tasks", {})))
    combined["adherence"] = {
        "tasks": {t: mean_adherence([s["adherence"]["tasks"][t] for s in summaries
                                     if t in s.get("adherence", {}).get("tasks", {})]) for t in adherence_tasks},
        "overall": mean_adherence([s["adherence"]["overall"] for s in summaries if "adherence" in s])}
    combined["runs"] = list(names) if names is not None else len(summaries)
    return combined
