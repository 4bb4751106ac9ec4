"""Benchmark checks (reference spec 9.3): pure functions from box tracks to pass / fail.

A check is a small frozen dataclass that says what a prompt asks for; :func:`score_check` judges
resampled tracks against it. Stage 1 feeds it the LLM's layout, stage 2 the pseudo-layout built
from detections, through the same code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from utils.layout import LayoutCondition, SceneLayout, build_condition

TASKS = ("numeracy", "attribution", "visibility", "dynamic_spatial", "sequential")
NUM_EVAL_FRAMES = 6  # both stages judge six frames (spec 9.3)
LEFT_TO_RIGHT = "left_to_right"
RIGHT_TO_LEFT = "right_to_left"


@dataclass(frozen=True)
class NumeracyCheck:
    """The majority over frames of the number of visible objects equals ``count``."""

    name: str
    count: int
    queries: tuple[str, ...]
    task = "numeracy"
    one_box_per_class = False


@dataclass(frozen=True)
class AttributionCheck:
    """Each ``"<colour> <object>"`` is present in at least half of the frames."""

    names: tuple[str, ...]
    queries: tuple[str, ...]
    task = "attribution"
    one_box_per_class = True


@dataclass(frozen=True)
class VisibilityCheck:
    """The object is seen only in the second half (``appears``) or only in the first half."""

    name: str
    appears: bool
    queries: tuple[str, ...]
    task = "visibility"
    one_box_per_class = True


@dataclass(frozen=True)
class DynamicSpatialCheck:
    """One object moves left/right; or object 1 moves from one side of object 2 to the other."""

    names: tuple[str, ...]  # (object,) or (moving object, reference object)
    direction: str          # LEFT_TO_RIGHT or RIGHT_TO_LEFT
    queries: tuple[str, ...]
    task = "dynamic_spatial"
    one_box_per_class = True


@dataclass(frozen=True)
class SequentialCheck:
    """The object is at ``locations[0]`` first, ``[1]`` in the middle and ``[2]`` at the end."""

    name: str
    locations: tuple[str, str, str]  # e.g. ("lower left", "lower right", "upper right")
    queries: tuple[str, ...]
    task = "sequential"
    one_box_per_class = True


Check = Union[NumeracyCheck, AttributionCheck, VisibilityCheck, DynamicSpatialCheck, SequentialCheck]


# --------------------------------------------------------------------------------------------
# Helpers on (tracks, frames, 4) xyxy arrays


def compute_valid(boxes_xyxy: np.ndarray) -> np.ndarray:
    """(tracks, frames) bool: the reference tests entries 2 and 3 (x_max, y_max) for non-zero."""
    return (boxes_xyxy[..., 2] != 0) & (boxes_xyxy[..., 3] != 0)


def find_track(phrases: Sequence[str], names: Sequence[str]) -> int | None:
    """Index of the first track whose phrase contains ``"<name> "`` or ends with ``name``."""
    for index, phrase in enumerate(phrases):
        if any(f"{name} " in phrase or phrase.endswith(name) for name in names):
            return index
    return None


def _center_x(box: np.ndarray) -> float:
    return float((box[0] + box[2]) / 2)


def _center_y(box: np.ndarray) -> float:
    return float((box[1] + box[3]) / 2)


def _at_location(box: np.ndarray, location: str) -> bool:
    tests = {"lower": _center_y(box) > 0.5, "upper": _center_y(box) < 0.5,
             "left": _center_x(box) < 0.5, "right": _center_x(box) > 0.5}
    words = location.split()
    unknown = [word for word in words if word not in tests]
    if unknown:
        raise ValueError(f"unknown location word(s) {unknown} in {location!r}; expected lower/upper/left/right")
    return all(tests[word] for word in words)


# --------------------------------------------------------------------------------------------
# Scoring


def score_check(check: Check, phrases: Sequence[str], boxes_xyxy: np.ndarray) -> bool:
    """Judge tracks against a check. ``boxes_xyxy`` is (tracks, frames, 4), zeros where absent."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64)
    if len(phrases) == 0 and boxes_xyxy.size == 0:
        boxes_xyxy = boxes_xyxy.reshape(0, boxes_xyxy.shape[1] if boxes_xyxy.ndim == 3 else 0, 4)
    if boxes_xyxy.ndim != 3 or boxes_xyxy.shape[0] != len(phrases) or boxes_xyxy.shape[2] != 4:
        raise ValueError(f"expected boxes_xyxy of shape ({len(phrases)} tracks, frames, 4), one track per "
                         f"phrase, found shape {boxes_xyxy.shape}")
    valid = compute_valid(boxes_xyxy)
    num_frames = boxes_xyxy.shape[1]
    last = num_frames - 1

    if isinstance(check, NumeracyCheck):
        if len(phrases) == 0:
            return check.count == 0
        counts = valid.sum(axis=0)
        majority = int(np.argmax(np.bincount(counts)))  # smallest count on ties
        return majority == check.count

    if isinstance(check, AttributionCheck):
        for name in check.names:
            index = find_track(phrases, [name])
            if index is None or valid[index].mean() < 0.5:
                return False
        return True

    if isinstance(check, VisibilityCheck):
        index = find_track(phrases, [check.name])
        if index is None:
            return False
        half = num_frames // 2
        in_first = bool(valid[index, 0: half - 1].any())
        in_second = bool(valid[index, half + 1: num_frames].any())
        return (not in_first and in_second) if check.appears else (in_first and not in_second)

    if isinstance(check, DynamicSpatialCheck):
        if check.direction not in (LEFT_TO_RIGHT, RIGHT_TO_LEFT):
            raise ValueError(f"unknown direction {check.direction!r}; expected {LEFT_TO_RIGHT!r} or "
                             f"{RIGHT_TO_LEFT!r}")
        indices = [find_track(phrases, [name]) for name in check.names]
        if any(index is None or not (valid[index, 0] and valid[index, last]) for index in indices):
            return False
        sign = 1.0 if check.direction == LEFT_TO_RIGHT else -1.0
        if len(indices) == 1:
            start, end = (_center_x(boxes_xyxy[indices[0], f]) for f in (0, last))
            return sign * start < sign * end
        moving, reference = indices
        starts_on_side = sign * _center_x(boxes_xyxy[moving, 0]) < sign * _center_x(boxes_xyxy[reference, 0])
        ends_on_other = sign * _center_x(boxes_xyxy[reference, last]) < sign * _center_x(boxes_xyxy[moving, last])
        return starts_on_side and ends_on_other

    if isinstance(check, SequentialCheck):
        index = find_track(phrases, [check.name])
        frames = (0, num_frames // 2, last)
        if index is None or not all(valid[index, f] for f in frames):
            return False
        return all(_at_location(boxes_xyxy[index, f], location)
                   for f, location in zip(frames, check.locations))

    raise TypeError(f"unknown check type {type(check).__name__}")


def build_eval_condition(layout: SceneLayout, num_eval_frames: int = NUM_EVAL_FRAMES) -> LayoutCondition:
    """The condition both stages judge: boxes resampled to ``num_eval_frames``, phrases stripped."""
    return build_condition(layout, num_eval_frames, strip_phrases=True)


def score_layout(check: Check, layout: SceneLayout, num_eval_frames: int = NUM_EVAL_FRAMES) -> bool:
    condition = build_eval_condition(layout, num_eval_frames)
    return score_check(check, condition.phrases, condition.boxes_xyxy)


@dataclass
class TaskTally:
    """Success counts per task, in the order tasks are first seen; JSON shape of the paper's table."""

    counts: dict[str, list[int]]

    @classmethod
    def empty(cls) -> "TaskTally":
        return cls(counts={})

    def add(self, task: str, success: bool) -> None:
        correct_total = self.counts.setdefault(task, [0, 0])
        correct_total[0] += int(bool(success))
        correct_total[1] += 1

    def to_dict(self) -> dict:
        tasks = {task: {"correct": c, "total": t} for task, (c, t) in self.counts.items()}
        correct = sum(c for c, _ in self.counts.values())
        total = sum(t for _, t in self.counts.values())
        return {"tasks": tasks, "overall": {"correct": correct, "total": total}}

    def format_table(self) -> str:
        """The paper's table: one row per task, then overall (rates in percent)."""
        data = self.to_dict()
        rows = [(task, v["correct"], v["total"]) for task, v in data["tasks"].items()]
        rows.append(("overall", data["overall"]["correct"], data["overall"]["total"]))
        width = max(len(name) for name, _, _ in rows + [("task", 0, 0)])
        lines = [f"{'task':<{width}}  {'correct':>7}  {'total':>5}  {'rate %':>6}"]
        for name, correct, total in rows:
            rate = 100.0 * correct / total if total else float("nan")
            lines.append(f"{name:<{width}}  {correct:>7}  {total:>5}  {rate:>6.2f}")
        return "\n".join(lines)
