"""Why a verdict is what it is: one line per video, e.g. for a numeracy FAIL
``expected 2 cat; boxes per frame: 0:1 3:1 6:2 9:1 12:1 15:1 -> majority 1``.

Pure functions over the same inputs as ``utils.predicates.score_check`` (the tracks resampled to the
evaluated frames, phrases stripped), read the same way: the first track whose phrase names the
object, a box counting when x_max != 0 and y_max != 0. They only describe; the verdict itself always
comes from ``score_check``. Frames are named by their index in the video.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from utils.layout import SceneLayout
from utils.predicates import (LEFT_TO_RIGHT, AttributionCheck, Check, DynamicSpatialCheck, NumeracyCheck,
                              SequentialCheck, VisibilityCheck, build_eval_condition, compute_valid, find_track)


def _frames_text(frame_indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in frame_indices) if len(frame_indices) else "none"


def _center(box: np.ndarray) -> tuple[float, float]:
    return float((box[0] + box[2]) / 2), float((box[1] + box[3]) / 2)


def describe_location(box: np.ndarray) -> str:
    """Where a normalised box's centre is, in the words of the sequential prompts: 'lower left' etc."""
    cx, cy = _center(box)
    vertical = "upper" if cy < 0.5 else "lower" if cy > 0.5 else "middle"
    horizontal = "left" if cx < 0.5 else "right" if cx > 0.5 else "centre"
    return f"{vertical} {horizontal} ({cx:.2f}, {cy:.2f})"


def explain_check(check: Check, phrases: Sequence[str], boxes_xyxy: np.ndarray,
                  frame_indices: Sequence[int]) -> str:
    """What ``check`` asks for and what ``boxes_xyxy`` (tracks, frames, 4) shows, at ``frame_indices``."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64).reshape(len(phrases), len(frame_indices), 4)
    valid = compute_valid(boxes_xyxy)
    frames = list(frame_indices)
    last = len(frames) - 1

    def seen_in(track: int | None) -> list[int]:
        return [] if track is None else [frames[f] for f in np.nonzero(valid[track])[0]]

    if isinstance(check, NumeracyCheck):
        counts = valid.sum(axis=0) if len(phrases) else np.zeros(len(frames), dtype=int)
        majority = int(np.argmax(np.bincount(counts))) if len(phrases) else 0
        per_frame = " ".join(f"{frame}:{int(count)}" for frame, count in zip(frames, counts))
        return f"expected {check.count} {check.name}; boxes per frame: {per_frame} -> majority {majority}"

    if isinstance(check, AttributionCheck):
        parts = []
        for name in check.names:
            track = find_track(phrases, [name])
            seen = seen_in(track)
            parts.append(f"{name} not detected" if track is None else
                         f"{name} in {len(seen)} of {len(frames)} (frames {_frames_text(seen)})")
        return f"each object in at least half of the {len(frames)} frames: " + "; ".join(parts)

    if isinstance(check, VisibilityCheck):
        half = len(frames) // 2
        first, second = frames[0: max(0, half - 1)], frames[half + 1:]
        wanted = (f"absent in frames {_frames_text(first)} and present in one of {_frames_text(second)}"
                  if check.appears else
                  f"present in one of frames {_frames_text(first)} and absent in {_frames_text(second)}")
        track = find_track(phrases, [check.name])
        found = "never detected" if track is None else f"detected in frames {_frames_text(seen_in(track))}"
        return f"expected the {check.name} {wanted}; {found}"

    if isinstance(check, DynamicSpatialCheck):
        direction = "left to right" if check.direction == LEFT_TO_RIGHT else "right to left"
        tracks = [find_track(phrases, [name]) for name in check.names]
        ends = (0, last)
        missing = [f"{name} not detected in frame {frames[f]}" for name, track in zip(check.names, tracks)
                   for f in ends if track is None or not valid[track, f]]
        if len(check.names) == 1:
            wanted = f"expected the {check.names[0]} in frames {frames[0]} and {frames[last]}, moving {direction}"
            if missing:
                return f"{wanted}; {', '.join(missing)}"
            start, end = (_center(boxes_xyxy[tracks[0], f])[0] for f in ends)
            return f"{wanted}; centre x {start:.2f} -> {end:.2f}"
        moving, reference = check.names
        side, other = ("left", "right") if check.direction == LEFT_TO_RIGHT else ("right", "left")
        wanted = (f"expected the {moving} {side} of the {reference} in frame {frames[0]} and {other} of it in "
                  f"frame {frames[last]}")
        if missing:
            return f"{wanted}; {', '.join(missing)}"
        found = "; ".join(f"frame {frames[f]}: {moving} x {_center(boxes_xyxy[tracks[0], f])[0]:.2f}, "
                          f"{reference} x {_center(boxes_xyxy[tracks[1], f])[0]:.2f}" for f in ends)
        return f"{wanted}; {found}"

    if isinstance(check, SequentialCheck):
        track = find_track(phrases, [check.name])
        positions = (0, len(frames) // 2, last)
        wanted = " -> ".join(f"{location} (frame {frames[p]})" for p, location in zip(positions, check.locations))
        found = ", ".join(
            f"frame {frames[p]} " + (describe_location(boxes_xyxy[track, p]) if track is not None and valid[track, p]
                                     else "not detected")
            for p in positions)
        return f"expected the {check.name} at {wanted}; found {found}"

    raise TypeError(f"unknown check type {type(check).__name__}")


def explain_verdict(check: Check, pseudo_layout: SceneLayout, frame_indices: Sequence[int]) -> str:
    """:func:`explain_check` on a pseudo-layout, judged as stage 2 judges it (spec 10.2 step 5)."""
    condition = build_eval_condition(pseudo_layout, len(frame_indices))
    return explain_check(check, condition.phrases, condition.boxes_xyxy, frame_indices)
