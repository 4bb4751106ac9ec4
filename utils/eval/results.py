"""Typed results of a stage-2 evaluation: one :class:`VideoResult` per video, and :class:`EvalSummary`,
the schema of eval.json, which the CLI, the table printer, the report and the averaging read.

eval.json (``EvalSummary.to_dict()`` plus the CLI's per-video ``"videos"`` list)::

    {"tasks": {task: {"correct", "total"}}, "overall": {"correct", "total"},   the stage-1 shape
     "evaluated_videos": n,                        videos judged or measured (not skipped)
     "skipped": {"total", "tasks": {task: n}, "kinds": {kind: n}},
     "adherence": {"tasks": {task: {"videos", "miou", "coverage", "centroid_distance", "ap50"}},
                   "overall": {...}},
     "success_counts", "sample_counts", "successes",                          the reference's fields
     "success_counts_overall", "sample_counts_overall",                        (spec 10.2), derived
     "config": {EvalConfig fields..., "detector": {"kind", "identity", "random_weights"}},
     "run_base_path", "timing": {EvalStats fields},
     averaged summaries only: "rates_mean": {"tasks", "overall"}, "runs": [names], "mixed_settings"}

:func:`load_eval_summary` reads every version of it: ours (older files lack ``evaluated_videos``,
``skipped.kinds`` and some config keys), the reference script's (only the ``success_counts`` family),
and averaged summaries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from utils.eval.config import COMPARED_SETTINGS, EvalConfig
from utils.eval.metrics import VideoAdherence, summarize_adherence
from utils.eval.runs import EvalItem, Skip
from utils.eval.verdicts import FrameBoxes
from utils.layout import SceneLayout
from utils.predicates import TaskTally

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
ADHERENCE_METRICS = ("miou", "coverage", "centroid_distance", "ap50")


class EvalSummaryFormatError(ValueError):
    """A file that is not an evaluation summary (eval.json or an averaged summary)."""


# --------------------------------------------------------------------------------------------
# One video


@dataclass(frozen=True)
class VideoInfo:
    """The file that was evaluated and its size."""

    path: Path
    num_frames: int
    height: int
    width: int
    from_cache: bool      # every detection of this video came from the detection cache


@dataclass(frozen=True)
class Verdict:
    """The benchmark verdict of one video."""

    success: bool
    reason: str                        # what the check asked for and what was detected (utils.eval.explain)
    queries: tuple[str, ...]
    frame_boxes: tuple[FrameBoxes, ...]  # what entered the pseudo-layout, per evaluated frame


@dataclass(frozen=True)
class VideoResult:
    """The outcome for one video: a skip, or what was evaluated (a verdict and/or adherence)."""

    item: EvalItem
    skip: Skip | None = None
    error: str | None = None                     # traceback of an unexpected failure (skip.kind "unexpected error")
    video: VideoInfo | None = None
    frame_indices: tuple[int, ...] = ()          # the evaluated frames
    layout: SceneLayout | None = None            # the generating layout
    verdict: Verdict | None = None               # None without a benchmark check
    adherence: VideoAdherence | None = None
    adherence_frame_indices: tuple[int, ...] = ()

    @property
    def skipped(self) -> str | None:
        return self.skip.message if self.skip is not None else None

    @property
    def success(self) -> bool | None:
        return self.verdict.success if self.verdict is not None else None

    @property
    def frame_boxes(self) -> tuple[FrameBoxes, ...] | None:
        return self.verdict.frame_boxes if self.verdict is not None else None

    @property
    def queries(self) -> tuple[str, ...]:
        return self.verdict.queries if self.verdict is not None else ()

    def to_dict(self) -> dict:
        item, video = self.item, self.video
        data = {"index": item.index, "folder": item.folder.name,
                "video": str(item.video_path) if item.video_path else None, "prompt": item.prompt,
                "task": item.task, "success": self.success, "reason": self.verdict.reason if self.verdict else None,
                "skipped": self.skipped, "skip_kind": self.skip.kind if self.skip else None,
                "num_frames": video.num_frames if video else None, "height": video.height if video else None,
                "width": video.width if video else None, "frame_indices": list(self.frame_indices),
                "queries": list(self.queries), "from_cache": bool(video and video.from_cache)}
        if self.verdict is not None:
            data["detections"] = [
                [{"label": int(label), "query": self.queries[int(label)], "score": float(score),
                  "box_xyxy": [float(v) for v in box]}
                 for box, score, label in zip(frame.boxes_xyxy, frame.scores, frame.labels)]
                for frame in self.verdict.frame_boxes]
        if self.adherence is not None:
            data["adherence"] = {**self.adherence.to_dict(), "frame_indices": list(self.adherence_frame_indices)}
        return data


@dataclass
class EvalStats:
    """Counters of one evaluation (updated while it runs)."""

    videos: int = 0
    skipped: int = 0
    detected_videos: int = 0
    cached_videos: int = 0
    detected_frames: int = 0
    detector_seconds: float = 0.0
    total_seconds: float = 0.0

    def describe(self) -> str:
        rate = (f"{self.detected_frames / self.detector_seconds:.1f} frames/s" if self.detector_seconds > 0
                else "- frames/s")
        return (f"{self.videos} videos ({self.skipped} skipped) in {self.total_seconds:.1f} s; detector ran on "
                f"{self.detected_videos} videos ({self.detected_frames} frames, {self.detector_seconds:.1f} s, "
                f"{rate}); {self.cached_videos} videos from the detection cache")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalStats":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------
# The summary


@dataclass(frozen=True)
class TaskCount:
    correct: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total}


@dataclass(frozen=True)
class SkippedCounts:
    tasks: dict[str, int] = field(default_factory=dict)   # task -> skipped entries
    kinds: dict[str, int] = field(default_factory=dict)   # Skip.kind -> skipped entries

    @property
    def total(self) -> int:
        return sum(self.tasks.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "tasks": dict(self.tasks), "kinds": dict(self.kinds)}


@dataclass(frozen=True)
class AdherenceSummary:
    videos: int = 0
    miou: float | None = None
    coverage: float | None = None
    centroid_distance: float | None = None
    ap50: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdherenceSummary":
        return cls(int(data.get("videos", 0)), *(data.get(m) for m in ADHERENCE_METRICS))


@dataclass(frozen=True)
class AdherenceTable:
    tasks: dict[str, AdherenceSummary] = field(default_factory=dict)
    overall: AdherenceSummary = AdherenceSummary()

    def to_dict(self) -> dict:
        return {"tasks": {t: a.to_dict() for t, a in self.tasks.items()}, "overall": self.overall.to_dict()}


@dataclass(frozen=True)
class RateMeans:
    """Mean of the per-run success rates (averaged summaries; the README's figures)."""

    tasks: dict[str, float | None]
    overall: float | None

    def to_dict(self) -> dict:
        return {"tasks": dict(self.tasks), "overall": self.overall}


@dataclass(frozen=True)
class DetectorInfo:
    kind: str
    identity: str
    random_weights: bool


@dataclass(frozen=True)
class EvalSummary:
    """The paper's table for one run (or several, averaged) and how it was made. See the module docstring."""

    tasks: dict[str, TaskCount]
    overall: TaskCount
    evaluated_videos: int = 0
    successes: dict[str, tuple[bool, ...]] = field(default_factory=dict)
    skipped: SkippedCounts = SkippedCounts()
    adherence: AdherenceTable = AdherenceTable()
    config: EvalConfig | None = None             # None: not recorded (the reference's eval.json)
    detector: DetectorInfo | None = None
    run_base_path: str | None = None
    timing: EvalStats | None = None
    rates_mean: RateMeans | None = None          # averaged summaries only
    runs: tuple[str, ...] = ()                   # averaged summaries only: what was averaged
    mixed_settings: dict[str, tuple] = field(default_factory=dict)  # averaged with --allow-mixed: setting -> per run

    @property
    def settings(self) -> dict[str, Any] | None:
        """The settings that make evaluations comparable (config.COMPARED_SETTINGS and the detector)."""
        if self.config is None:
            return None
        values = {name: getattr(self.config, name) for name in COMPARED_SETTINGS}
        values["detector"] = self.detector.identity if self.detector is not None else None
        return values

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "tasks": {t: c.to_dict() for t, c in self.tasks.items()}, "overall": self.overall.to_dict(),
            "evaluated_videos": self.evaluated_videos, "skipped": self.skipped.to_dict(),
            "adherence": self.adherence.to_dict(),
            # The reference's eval.json fields (spec 10.2), derived from the counts above.
            "success_counts": {t: c.correct for t, c in self.tasks.items()},
            "sample_counts": {t: c.total for t, c in self.tasks.items()},
            "successes": {t: list(s) for t, s in self.successes.items()},
            "success_counts_overall": self.overall.correct, "sample_counts_overall": self.overall.total,
            "config": None if self.config is None else {
                **dataclasses.asdict(self.config),
                **({"detector": dataclasses.asdict(self.detector)} if self.detector is not None else {})},
            "run_base_path": self.run_base_path,
            "timing": dataclasses.asdict(self.timing) if self.timing is not None else None,
        }
        if self.rates_mean is not None:
            data["rates_mean"] = self.rates_mean.to_dict()
            data["runs"] = list(self.runs)
        if self.mixed_settings:
            data["mixed_settings"] = {k: list(v) for k, v in self.mixed_settings.items()}
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<data>") -> "EvalSummary":
        """Parse any version of eval.json (see the module docstring); raises EvalSummaryFormatError."""
        if not isinstance(data, dict):
            raise EvalSummaryFormatError(f"{source}: expected a JSON object, found {type(data).__name__}")
        try:
            return _parse_summary(data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise EvalSummaryFormatError(f"{source}: not an evaluation summary ({type(error).__name__}: "
                                         f"{error}); expected the eval.json of scripts/eval_owl_vit.py "
                                         "--save-eval, the reference's, or an averaged summary") from None


def _parse_config(data: Any) -> tuple[EvalConfig | None, DetectorInfo | None]:
    if not isinstance(data, dict):
        return None, None
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    config = EvalConfig(**{k: v for k, v in data.items() if k in names})
    detector = data.get("detector")
    info = DetectorInfo(str(detector["kind"]), str(detector["identity"]), bool(detector["random_weights"])) \
        if isinstance(detector, dict) else None
    return config, info


def _parse_summary(data: dict) -> EvalSummary:
    if "tasks" in data and "overall" in data:
        tasks = {t: TaskCount(int(c["correct"]), int(c["total"])) for t, c in data["tasks"].items()}
        overall = TaskCount(int(data["overall"]["correct"]), int(data["overall"]["total"]))
    elif "success_counts" in data and "sample_counts" in data:  # the reference script's eval.json
        tasks = {t: TaskCount(int(data["success_counts"].get(t, 0)), int(n)) for t, n in data["sample_counts"].items()}
        overall = TaskCount(int(data.get("success_counts_overall", sum(c.correct for c in tasks.values()))),
                            int(data.get("sample_counts_overall", sum(c.total for c in tasks.values()))))
    else:
        raise KeyError("neither 'tasks' and 'overall' nor 'success_counts' and 'sample_counts'")
    skipped = data.get("skipped") or {}
    adherence = data.get("adherence") or {}
    adherence_table = AdherenceTable(
        {t: AdherenceSummary.from_dict(a) for t, a in (adherence.get("tasks") or {}).items()},
        AdherenceSummary.from_dict(adherence.get("overall") or {}))
    config, detector = _parse_config(data.get("config"))
    rates = data.get("rates_mean")
    runs = data.get("runs")
    return EvalSummary(
        tasks=tasks, overall=overall,
        evaluated_videos=int(data.get("evaluated_videos", max(overall.total, adherence_table.overall.videos))),
        successes={t: tuple(bool(s) for s in v) for t, v in (data.get("successes") or {}).items()},
        skipped=SkippedCounts({t: int(n) for t, n in (skipped.get("tasks") or {}).items()},
                              {k: int(n) for k, n in (skipped.get("kinds") or {}).items()}),
        adherence=adherence_table, config=config, detector=detector,
        run_base_path=data.get("run_base_path"),
        timing=EvalStats.from_dict(data["timing"]) if isinstance(data.get("timing"), dict) else None,
        rates_mean=RateMeans(dict(rates.get("tasks") or {}), rates.get("overall")) if isinstance(rates, dict) else None,
        runs=tuple(str(r) for r in runs) if isinstance(runs, list) else (),
        mixed_settings={k: tuple(v) for k, v in (data.get("mixed_settings") or {}).items()})


def load_eval_summary(path: str | os.PathLike) -> EvalSummary:
    """Read an eval.json (or a run directory holding one, or an averaged summary).

    Raises EvalSummaryFormatError for a file that is missing, not JSON, or not a summary.
    """
    path = Path(path)
    path = path / EVAL_FILE if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise EvalSummaryFormatError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise EvalSummaryFormatError(f"{path}: not valid JSON ({error})") from None
    return EvalSummary.from_dict(data, str(path))


def summarize_results(results: Sequence[VideoResult], config: EvalConfig, detector: DetectorInfo | None = None, *,
                      run_base_path: str | None = None, stats: EvalStats | None = None) -> EvalSummary:
    """The paper's table of one run: success counts per task (first-seen order), skips, adherence."""
    tally = TaskTally.empty()
    successes: dict[str, list[bool]] = {}
    skipped_tasks: dict[str, int] = {}
    skipped_kinds: dict[str, int] = {}
    adherence: dict[str, list[dict]] = {}
    evaluated = 0
    for result in results:
        task = result.item.task
        if result.skip is not None:
            skipped_tasks[task] = skipped_tasks.get(task, 0) + 1
            skipped_kinds[result.skip.kind] = skipped_kinds.get(result.skip.kind, 0) + 1
            continue
        evaluated += 1
        if result.verdict is not None:
            tally.add(task, result.verdict.success)
            successes.setdefault(task, []).append(result.verdict.success)
        if result.adherence is not None:
            adherence.setdefault(task, []).append(result.adherence.to_dict())
    counts = tally.to_dict()
    return EvalSummary(
        tasks={t: TaskCount(c["correct"], c["total"]) for t, c in counts["tasks"].items()},
        overall=TaskCount(counts["overall"]["correct"], counts["overall"]["total"]),
        evaluated_videos=evaluated, successes={t: tuple(s) for t, s in successes.items()},
        skipped=SkippedCounts(skipped_tasks, skipped_kinds),
        adherence=AdherenceTable(
            {t: AdherenceSummary.from_dict(summarize_adherence(v)) for t, v in adherence.items()},
            AdherenceSummary.from_dict(summarize_adherence([v for vs in adherence.values() for v in vs]))),
        config=config, detector=detector, run_base_path=run_base_path, timing=stats)
