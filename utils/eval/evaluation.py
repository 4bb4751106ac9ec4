"""Stage-2 evaluation of a generation run (reference spec 10.2), plus layout adherence.

`evaluate_run` is the one call per run: it lists the run's videos (`utils.eval.runs`), detects in
batches through the detection cache (`utils.eval.detector`, `utils.eval.detection_cache`), judges
each video (`utils.eval.verdicts`, `utils.eval.explain`), measures adherence (`utils.eval.metrics`)
and summarises (`utils.eval.results`). A bad video never stops the evaluation: expected problems are
skips with a reason; unexpected errors are reported through ``on_failure`` and count as skipped too,
unless ``fail_fast``.
"""
from __future__ import annotations

import functools
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from utils.eval.config import CacheSettings, EvalConfig, RunSelection
from utils.eval.detection_cache import (build_cache_key, cache_file_path, compute_file_digest, load_cached_detections,
                                        save_cached_detections)
from utils.eval.detector import DetectionRequest, Detector, VideoDetections, run_detector
from utils.eval.explain import explain_verdict
from utils.eval.metrics import score_adherence
from utils.eval.results import DetectorInfo, EvalStats, EvalSummary, Verdict, VideoInfo, VideoResult, summarize_results
from utils.eval.runs import (MIN_FRAME_SIDE, SKIP_FAILED, SKIP_NOTHING_TO_JUDGE, SKIP_TOO_SHORT, SKIP_TOO_SMALL,
                             SKIP_UNREADABLE, EvalInputError,
                             EvalItem, Skip, collect_eval_items, read_generation_layout)
from utils.eval.verdicts import FrameSelectionError, judge_detections, postprocess_detections, select_frame_indices
from utils.layout import SceneLayout, resample_boxes, strip_phrase
from utils.predicates import Check

logger = logging.getLogger(__name__)

OnResult = Callable[[VideoResult, "np.ndarray | None"], None]
OnFailure = Callable[[EvalItem, str, BaseException], None]   # (item, what failed, the exception)


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


def describe_detector(detector: Detector) -> DetectorInfo:
    return DetectorInfo(kind=detector.kind, identity=detector.identity, random_weights=detector.random_weights)


# --------------------------------------------------------------------------------------------
# One video: read, detect (or read the cache), judge


@dataclass
class _Prepared:
    """A video on its way through the batch (internal working state)."""

    item: EvalItem
    layout: SceneLayout | None
    frames_mode: str
    query_sets: tuple[tuple[str, ...], ...]
    adherence_queries: tuple[str, ...]
    adherence_labels: list[int]
    frames: np.ndarray | None = None                 # the whole video, when it had to be read
    num_frames: int | None = None
    eval_indices: tuple[int, ...] = ()
    detect_indices: tuple[int, ...] = ()
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
        raise EvalInputError(str(error), kind=SKIP_UNREADABLE) from error


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
                             "check and no layout.json to measure adherence against", kind=SKIP_NOTHING_TO_JUDGE)
    all_frames = config.adherence_all_frames and bool(adherence_queries)
    prepared = _Prepared(item, layout, "all" if all_frames else f"eval{config.num_eval_frames}", tuple(query_sets),
                         adherence_queries, adherence_labels)
    if cache.enabled:
        try:
            digest = compute_file_digest(item.video_path)
        except OSError as error:
            raise EvalInputError(f"cannot read {item.video_path}: {error}") from error
        folder = cache.folder_for(item.folder)
        for queries in query_sets:
            key = build_cache_key(digest, detector.identity, prepared.frames_mode, queries)
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
    if prepared.frames is not None:
        height, width = prepared.frames.shape[1:3]
    else:
        detections = next(iter(prepared.detections.values()))
        height, width = detections.height, detections.width
    if min(height, width) < MIN_FRAME_SIDE:
        raise EvalInputError(f"{item.video_path}: frames of {width}x{height} pixels are too small to judge (the "
                             f"detector needs at least {MIN_FRAME_SIDE} pixels a side)", kind=SKIP_TOO_SMALL)
    try:
        prepared.eval_indices = select_frame_indices(prepared.num_frames, config.num_eval_frames)
    except FrameSelectionError as error:
        raise EvalInputError(f"{item.video_path}: {error}", kind=SKIP_TOO_SHORT) from error
    prepared.detect_indices = tuple(range(prepared.num_frames)) if all_frames else prepared.eval_indices
    return prepared


def _judge(prepared: _Prepared, config: EvalConfig) -> VideoResult:
    item = prepared.item
    any_detections: VideoDetections = next(iter(prepared.detections.values()))
    positions = [prepared.detect_indices.index(i) for i in prepared.eval_indices]
    verdict = None
    if item.check is not None:
        detections = prepared.detections[tuple(item.check.queries)]
        judgement = judge_detections(item.check, detections, item.prompt, config, positions)
        verdict = Verdict(judgement.success, explain_verdict(item.check, judgement.pseudo_layout, prepared.eval_indices),
                          tuple(detections.queries), tuple(judgement.frame_boxes))
    adherence = None
    if prepared.adherence_labels:
        layout = prepared.layout
        detections = prepared.detections[prepared.adherence_queries]
        boxes = postprocess_detections(detections, config, one_box_per_class=False)
        layout_boxes = resample_boxes(layout, prepared.num_frames)[:, list(prepared.detect_indices)]
        adherence = score_adherence(layout_boxes, [t.id for t in layout.tracks], layout.phrases,
                                    prepared.adherence_labels, prepared.adherence_queries,
                                    [b.as_tuple() for b in boxes])
    video = VideoInfo(item.video_path, prepared.num_frames, any_detections.height, any_detections.width,
                      prepared.from_cache)
    return VideoResult(item=item, video=video, frame_indices=prepared.eval_indices, layout=prepared.layout,
                       verdict=verdict, adherence=adherence,
                       adherence_frame_indices=prepared.detect_indices if adherence is not None else ())


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


def evaluate_items(items: Sequence[EvalItem], detector: Detector, config: EvalConfig, *,
                   cache: CacheSettings = CacheSettings(), video_batch_size: int = 8,
                   on_result: OnResult | None = None, on_failure: OnFailure | None = None,
                   need_frames: bool = False, fail_fast: bool = False) -> tuple[list[VideoResult], EvalStats]:
    """Evaluate ``items`` ``video_batch_size`` videos at a time (their frames share detector batches).

    ``on_result(result, frames)`` is called once per item in order; ``frames`` is the whole video
    when it was read (always with ``need_frames``), else None. Bad input is recorded as skipped.
    Unless ``fail_fast``, an unexpected exception for one video is passed to ``on_failure(item, what,
    error)`` and recorded as skipped (with its traceback in ``result.error``) instead of stopping the
    run: a batch job must not die on video 400.
    """
    stats = EvalStats()
    results: list[VideoResult] = []
    started = time.perf_counter()

    def emit(result: VideoResult, frames: np.ndarray | None = None) -> None:
        stats.videos += 1
        if result.skip is not None:
            stats.skipped += 1
            logger.debug("skipped prompt %d (%s): %s", result.item.index, result.item.task, result.skip.message)
        results.append(result)
        if on_result is not None:
            on_result(result, frames)

    def failure(item: EvalItem, what: str, error: BaseException) -> VideoResult:
        if fail_fast:
            raise error
        logger.error("prompt %d: %s failed: %s: %s", item.index, what, type(error).__name__, error)
        if on_failure is not None:
            on_failure(item, what, error)
        return VideoResult(item=item, skip=Skip(SKIP_FAILED, f"{what} failed: {type(error).__name__}: {error}"),
                           error="".join(traceback.format_exception(error)))

    for chunk in _chunks(list(items), video_batch_size):
        # One slot per item, emitted in item order once the chunk is done: a finished VideoResult
        # (skipped or failed) or a _Prepared video still to detect and judge.
        slots: list[VideoResult | _Prepared] = []
        for item in chunk:
            if item.skip is not None:
                slots.append(VideoResult(item=item, skip=item.skip))
                continue
            try:
                slots.append(_prepare(item, detector, config, cache, need_frames))
            except EvalInputError as error:
                slots.append(VideoResult(item=item, skip=Skip(error.kind, str(error))))
            except Exception as error:  # noqa: BLE001 - see the docstring
                slots.append(failure(item, "reading the video", error))
        todo = [position for position, slot in enumerate(slots) if isinstance(slot, _Prepared) and slot.missing]
        if todo:
            requests = [DetectionRequest(slots[i].frames[list(slots[i].detect_indices)], slots[i].detect_indices,
                                         slots[i].num_frames, tuple(slots[i].missing)) for i in todo]
            detect_started = time.perf_counter()
            outputs = _detect_with_retry(detector, requests, fail_fast)
            stats.detector_seconds += time.perf_counter() - detect_started
            for position, request, video_outputs in zip(todo, requests, outputs):
                prepared = slots[position]
                if isinstance(video_outputs, BaseException):
                    slots[position] = failure(prepared.item, "detection", video_outputs)
                    continue
                stats.detected_videos += 1
                stats.detected_frames += len(request.frame_indices)
                for queries, detections in zip(request.query_sets, video_outputs):
                    prepared.detections[queries] = detections
                    if queries in prepared.cache_files:
                        path, key = prepared.cache_files[queries]
                        try:
                            save_cached_detections(path, key, detections)
                        except OSError as error:
                            logger.warning("cannot write the detection cache %s: %s", path, error)
        for slot in slots:
            if isinstance(slot, VideoResult):
                emit(slot)
                continue
            stats.cached_videos += int(slot.from_cache)
            try:
                result = _judge(slot, config)
            except Exception as error:  # noqa: BLE001 - see the docstring
                result = failure(slot.item, "judging", error)
            emit(result, slot.frames)
    stats.total_seconds = time.perf_counter() - started
    return results, stats


# --------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class RunEvaluation:
    """Everything one run's evaluation produced."""

    run: Path
    config: EvalConfig
    results: tuple[VideoResult, ...]
    stats: EvalStats
    summary: EvalSummary

    @property
    def failures(self) -> tuple[VideoResult, ...]:
        return tuple(r for r in self.results if r.error is not None)


def evaluate_run(run: str | Path, entries: Sequence[tuple[str, Check | None]], detector: Detector,
                 config: EvalConfig, selection: RunSelection = RunSelection(), *,
                 cache: CacheSettings = CacheSettings(), video_batch_size: int = 8,
                 on_items: Callable[[list[EvalItem]], None] | None = None,
                 on_result: OnResult | None = None, on_failure: OnFailure | None = None,
                 need_frames: bool = False, fail_fast: bool = False) -> RunEvaluation:
    """Evaluate the entries ``selection`` picks from ``run``; ``entries`` are ``config.prompt_type``'s
    (prompt, check) pairs. ``on_items`` sees the listed items before any video is read (e.g. for a
    progress bar); the other callbacks are those of :func:`evaluate_items`."""
    run = Path(run)
    items = collect_eval_items(run, config.prompt_type, entries, selection, variant=config.video_variant)
    if on_items is not None:
        on_items(items)
    results, stats = evaluate_items(items, detector, config, cache=cache, video_batch_size=video_batch_size,
                                    on_result=on_result, on_failure=on_failure, need_frames=need_frames,
                                    fail_fast=fail_fast)
    summary = summarize_results(results, config, describe_detector(detector), run_base_path=str(run), stats=stats)
    return RunEvaluation(run, config, tuple(results), stats, summary)
