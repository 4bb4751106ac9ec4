"""From detections to a verdict (reference spec 10.2 steps 3-5), pure NumPy.

`select_frame_indices` picks the evaluated frames; per frame, `postprocess_frame` thresholds the
scores, normalises the boxes, runs NMS (plain or class-aware) and, except for numeracy, keeps one
box per query; `build_pseudo_layout` turns the survivors into a layout, and `judge_detections`
scores it through ``utils.predicates.score_layout``, the same code path as stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from utils.eval.config import EvalConfig
from utils.eval.detector import VideoDetections
from utils.eval.metrics import compute_iou_matrix
from utils.layout import SceneLayout, build_layout_from_frames
from utils.predicates import Check, score_layout


class FrameSelectionError(ValueError):
    """The video has too few frames for the requested number of evaluated frames."""


def select_frame_indices(num_frames: int, num_eval_frames: int) -> tuple[int, ...]:
    """``round(linspace(0, F - 1, n))`` (half to even), which must be unique (spec 10.2 step 3)."""
    if num_eval_frames < 1:
        raise FrameSelectionError(f"num_eval_frames must be >= 1, got {num_eval_frames}")
    indices = np.round(np.linspace(0, num_frames - 1, num_eval_frames)).astype(int)
    if num_frames < 1 or len(np.unique(indices)) != num_eval_frames:
        raise FrameSelectionError(f"the video has {num_frames} frames; evaluating {num_eval_frames} "
                                  f"distinct frames needs at least {num_eval_frames}")
    return tuple(int(i) for i in indices)


def threshold_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``score >= threshold``, compared in float32 like the reference's tensors."""
    return np.asarray(scores, dtype=np.float32) >= np.float32(threshold)


def _iou_one_to_many(box_xyxy: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    return compute_iou_matrix(box_xyxy[None], boxes_xyxy)[0]


def compute_nms_keep(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: repeatedly keep the highest score (first index on ties) and drop the remaining boxes
    whose IoU with it is >= ``iou_threshold``. Returns kept indices in the order they were picked."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(int(best))
        order = rest[_iou_one_to_many(boxes_xyxy[best], boxes_xyxy[rest]) < iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def compute_class_aware_nms_keep(boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                                 iou_threshold: float) -> np.ndarray:
    """NMS within each label, labels in ``np.unique`` order; indices label by label, in pick order."""
    labels = np.asarray(labels)
    keep = [np.nonzero(labels == label)[0][compute_nms_keep(boxes_xyxy[labels == label],
                                                            np.asarray(scores)[labels == label],
                                                            iou_threshold)]
            for label in np.unique(labels)]
    return np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


def select_top_box_per_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Index of the highest-scoring box of each label (first on ties), labels in ``np.unique`` order."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    picks = []
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        picks.append(members[int(np.argmax(scores[members]))])
    return np.asarray(picks, dtype=np.int64)


@dataclass(frozen=True)
class FrameBoxes:
    """The detections of one frame that survive thresholding, NMS (and one-box-per-class)."""

    boxes_xyxy: np.ndarray   # (n, 4) float32, normalised by the frame's W and H
    scores: np.ndarray       # (n,) float32
    labels: np.ndarray       # (n,) int64

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.boxes_xyxy, self.scores, self.labels


def postprocess_frame(boxes_xyxy_px: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                      width: int, height: int, score_threshold: float, nms_threshold: float,
                      class_aware_nms: bool, one_box_per_class: bool) -> FrameBoxes:
    """Spec 10.2 step 4 for one frame: threshold, normalise by (W, H), NMS, optional top-1 per label."""
    keep = threshold_mask(scores, score_threshold)
    boxes = np.asarray(boxes_xyxy_px, dtype=np.float32)[keep] / np.asarray([width, height, width, height],
                                                                           dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)[keep]
    labels = np.asarray(labels, dtype=np.int64)[keep]
    if class_aware_nms:
        order = compute_class_aware_nms_keep(boxes, scores, labels, nms_threshold)
    else:
        order = compute_nms_keep(boxes, scores, nms_threshold)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    if one_box_per_class:
        order = select_top_box_per_label(scores, labels)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
    return FrameBoxes(boxes.reshape(-1, 4), scores, labels)


def postprocess_detections(detections: VideoDetections, config: EvalConfig, one_box_per_class: bool,
                           positions: Sequence[int] | None = None) -> list[FrameBoxes]:
    """:func:`postprocess_frame` on the frames at ``positions`` (default: all) of ``detections``."""
    positions = range(len(detections.frame_indices)) if positions is None else positions
    return [postprocess_frame(*detections.frame(p), width=detections.width, height=detections.height,
                              score_threshold=config.detection_score_threshold,
                              nms_threshold=config.nms_threshold, class_aware_nms=config.class_aware_nms,
                              one_box_per_class=one_box_per_class)
            for p in positions]


def _round_half_even(value: float) -> int:
    return int(np.rint(value))


def build_pseudo_layout(frames: Sequence[FrameBoxes], queries: Sequence[str], prompt: str,
                        width: int, height: int) -> SceneLayout:
    """Detections -> a layout (spec 10.2 step 4): per frame, id = label * 100 + running count of that
    label in the frame, name = the query text, box = half-to-even rounded pixel xywh, no background;
    parsed by the same ``build_layout_from_frames`` as LLM layouts, dividing by the frame's W and H."""
    layout_frames = []
    for frame in frames:
        counts: dict[int, int] = {}
        objects = []
        for (x0, y0, x1, y1), score, label in zip(frame.boxes_xyxy, frame.scores, frame.labels):
            label = int(label)
            rank = counts.get(label, 0)
            counts[label] = rank + 1
            box = [_round_half_even(x0 * width), _round_half_even(y0 * height),
                   _round_half_even((x1 - x0) * width), _round_half_even((y1 - y0) * height)]
            objects.append({"id": label * 100 + rank, "name": queries[label], "box": box, "score": float(score)})
        layout_frames.append(objects)
    return build_layout_from_frames(layout_frames, prompt=prompt, background=None, canvas_size=(width, height))


class Judgement(NamedTuple):
    """The verdict of one video and what it was based on."""

    success: bool
    pseudo_layout: SceneLayout       # what the predicate judged
    frame_boxes: list[FrameBoxes]    # the surviving boxes of each evaluated frame


def judge_detections(check: Check, detections: VideoDetections, prompt: str, config: EvalConfig,
                     positions: Sequence[int] | None = None) -> Judgement:
    """The verdict for one video: post-process, build the pseudo-layout, score it like stage 1.

    ``positions`` picks the evaluated frames among ``detections.frame_indices`` (default: all of them).
    """
    if tuple(detections.queries) != tuple(check.queries):
        raise ValueError(f"detections are for queries {list(detections.queries)}, the check needs "
                         f"{list(check.queries)}")
    frames = postprocess_detections(detections, config, check.one_box_per_class, positions)
    layout = build_pseudo_layout(frames, detections.queries, prompt, detections.width, detections.height)
    success = score_layout(check, layout, num_eval_frames=len(frames))
    return Judgement(bool(success), layout, frames)
