"""Layout adherence: how closely the detected boxes of a generated video follow its layout.

Pure NumPy functions, no model. Beyond the reference (which only reports pass / fail), in the
manner Peekaboo and TrailBlazer report box control. For each layout object (track) and each
evaluated frame where the layout places it ("expected frames", the layout box is valid in the sense
of the benchmark predicates: x_max != 0 and y_max != 0):

- the detections of that object's query are matched to the tracks sharing the query, one to one,
  maximising the summed IoU (Hungarian; a single track gets its best-overlapping detection);
- **coverage** = covered expected frames / expected frames, a frame being *covered* when its matched
  detection overlaps the layout box (IoU > ``COVERAGE_MIN_IOU`` = 0): a detection elsewhere in the
  frame is not the object, even when the one-to-one matching pairs it with the object;
- **mIoU** = mean IoU over the expected frames, a frame without a match counting 0;
- **centroid distance** = mean Euclidean distance between box centres, in units of the frame's width
  and height (so 0 .. sqrt(2)), over the matched frames only, overlapping or not (None if never
  matched);
- **AP50** = average precision at IoU >= 0.5 (VOC all-points interpolation): every detection of the
  object queries is a candidate, in descending score order, and is a true positive if it overlaps an
  unmatched layout box of the same query in the same frame by IoU >= 0.5. Pooled over videos for the
  per-task numbers (the ground-truth counts and the scored detections are concatenated).

Boxes are normalised xyxy and clipped to [0, 1] before any comparison (the generator's masks clip
them too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

AP_IOU_THRESHOLD = 0.5
COVERAGE_MIN_IOU = 0.0  # a frame is covered when the matched detection's IoU is above this


# --------------------------------------------------------------------------------------------
# Boxes


def compute_iou_matrix(boxes_a_xyxy: np.ndarray, boxes_b_xyxy: np.ndarray) -> np.ndarray:
    """IoU of every pair: (N, 4) x (M, 4) xyxy -> (N, M) float64; 0 where the union is empty."""
    a = np.asarray(boxes_a_xyxy, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b_xyxy, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter_w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def compute_centroid_distance(box_a_xyxy: Sequence[float], box_b_xyxy: Sequence[float]) -> float:
    """Euclidean distance between the centres of two normalised xyxy boxes."""
    a = np.asarray(box_a_xyxy, dtype=np.float64)
    b = np.asarray(box_b_xyxy, dtype=np.float64)
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))


def clip_boxes(boxes_xyxy: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(boxes_xyxy, dtype=np.float64), 0.0, 1.0)


def match_boxes(track_boxes_xyxy: np.ndarray, detection_boxes_xyxy: np.ndarray) -> np.ndarray:
    """One-to-one assignment maximising summed IoU: (T, 4), (D, 4) -> (T,) detection index or -1."""
    from scipy.optimize import linear_sum_assignment

    num_tracks, num_detections = len(track_boxes_xyxy), len(detection_boxes_xyxy)
    assignment = np.full(num_tracks, -1, dtype=np.int64)
    if num_tracks == 0 or num_detections == 0:
        return assignment
    iou = compute_iou_matrix(track_boxes_xyxy, detection_boxes_xyxy)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    assignment[rows] = cols
    return assignment


# --------------------------------------------------------------------------------------------
# Average precision


@dataclass
class APRecords:
    """What AP needs, poolable across videos: the ground-truth count and every scored detection."""

    num_ground_truth: int = 0
    scores: list[float] = field(default_factory=list)
    true_positive: list[bool] = field(default_factory=list)

    def extend(self, other: "APRecords") -> None:
        self.num_ground_truth += other.num_ground_truth
        self.scores.extend(other.scores)
        self.true_positive.extend(other.true_positive)

    def to_dict(self) -> dict:
        return {"num_ground_truth": self.num_ground_truth, "scores": [float(s) for s in self.scores],
                "true_positive": [bool(t) for t in self.true_positive]}

    @classmethod
    def from_dict(cls, data: dict) -> "APRecords":
        return cls(int(data["num_ground_truth"]), [float(s) for s in data["scores"]],
                   [bool(t) for t in data["true_positive"]])


def compute_average_precision(records: APRecords) -> float | None:
    """VOC all-points AP: area under the monotone precision envelope; None without ground truth."""
    if records.num_ground_truth == 0:
        return None
    if not records.scores:
        return 0.0
    order = np.argsort(-np.asarray(records.scores, dtype=np.float64), kind="stable")
    tp = np.asarray(records.true_positive, dtype=np.float64)[order]
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum(1.0 - tp)
    recall = cum_tp / records.num_ground_truth
    precision = cum_tp / (cum_tp + cum_fp)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def collect_ap_records(layout_boxes_xyxy: np.ndarray, track_labels: Sequence[int],
                       frame_detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       iou_threshold: float = AP_IOU_THRESHOLD) -> APRecords:
    """Greedy VOC matching of one video's detections to its layout boxes.

    ``layout_boxes_xyxy``: (tracks, frames, 4) normalised; ``track_labels[t]``: the query index of
    track t; ``frame_detections[f]``: (boxes (D, 4) normalised, scores (D,), labels (D,)).
    """
    layout_boxes_xyxy = np.asarray(layout_boxes_xyxy, dtype=np.float64)
    track_labels = np.asarray(track_labels, dtype=np.int64)
    valid = (layout_boxes_xyxy[..., 2] != 0) & (layout_boxes_xyxy[..., 3] != 0)  # (tracks, frames)
    records = APRecords(num_ground_truth=int(valid.sum()))
    for frame_index, (boxes, scores, labels) in enumerate(frame_detections):
        boxes = clip_boxes(boxes).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        for label in np.unique(labels):
            if label not in track_labels:
                continue  # a query no layout object asked for (not part of this evaluation)
            gt_tracks = np.nonzero((track_labels == label) & valid[:, frame_index])[0]
            gt_boxes = clip_boxes(layout_boxes_xyxy[gt_tracks, frame_index])
            taken = np.zeros(len(gt_tracks), dtype=bool)
            candidates = np.nonzero(labels == label)[0]
            candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
            iou = compute_iou_matrix(boxes[candidates], gt_boxes)  # (candidates, gt)
            for row, det_index in enumerate(candidates):
                available = np.where(taken, -1.0, iou[row]) if len(gt_tracks) else np.zeros(0)
                best = int(np.argmax(available)) if len(available) else -1
                hit = best >= 0 and available[best] >= iou_threshold
                if hit:
                    taken[best] = True
                records.scores.append(float(scores[det_index]))
                records.true_positive.append(bool(hit))
    return records


# --------------------------------------------------------------------------------------------
# Adherence


@dataclass(frozen=True)
class ObjectAdherence:
    track_id: int
    phrase: str
    query: str
    expected_frames: int
    matched_frames: int              # expected frames with a matched detection (any IoU)
    covered_frames: int              # ... whose IoU with the layout box is > the coverage threshold
    miou: float | None              # None if the layout never places the object in the frames
    coverage: float | None
    centroid_distance: float | None  # None if never matched

    def to_dict(self) -> dict:
        return {"id": self.track_id, "phrase": self.phrase, "query": self.query,
                "expected_frames": self.expected_frames, "matched_frames": self.matched_frames,
                "covered_frames": self.covered_frames,
                "miou": self.miou, "coverage": self.coverage, "centroid_distance": self.centroid_distance}


@dataclass(frozen=True)
class VideoAdherence:
    objects: tuple[ObjectAdherence, ...]
    ap_records: APRecords
    matched_boxes_xyxy: np.ndarray   # (tracks, frames, 4): the matched detection, zeros where none
    matched_scores: np.ndarray       # (tracks, frames): its score, 0 where none

    @property
    def miou(self) -> float | None:
        return _mean([o.miou for o in self.objects])

    @property
    def coverage(self) -> float | None:
        return _mean([o.coverage for o in self.objects])

    @property
    def centroid_distance(self) -> float | None:
        return _mean([o.centroid_distance for o in self.objects])

    @property
    def ap50(self) -> float | None:
        return compute_average_precision(self.ap_records)

    def to_dict(self) -> dict:
        return {"miou": self.miou, "coverage": self.coverage, "centroid_distance": self.centroid_distance,
                "ap50": self.ap50, "objects": [o.to_dict() for o in self.objects],
                "ap_records": self.ap_records.to_dict()}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def score_adherence(layout_boxes_xyxy: np.ndarray, track_ids: Sequence[int], phrases: Sequence[str],
                    track_labels: Sequence[int], queries: Sequence[str],
                    frame_detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                    coverage_min_iou: float = COVERAGE_MIN_IOU) -> VideoAdherence:
    """Adherence of one video (see the module docstring for the definitions).

    ``layout_boxes_xyxy``: (tracks, frames, 4) normalised layout boxes at the evaluated frames (zeros
    where absent); ``track_labels[t]``: index into ``queries`` of track t; ``frame_detections[f]``:
    (boxes (D, 4) normalised, scores (D,), labels (D,)) after thresholding and NMS.
    """
    layout_boxes_xyxy = np.asarray(layout_boxes_xyxy, dtype=np.float64)
    num_tracks, num_frames = layout_boxes_xyxy.shape[:2]
    if len(frame_detections) != num_frames:
        raise ValueError(f"expected detections for {num_frames} frames, got {len(frame_detections)}")
    track_labels = np.asarray(track_labels, dtype=np.int64)
    valid = (layout_boxes_xyxy[..., 2] != 0) & (layout_boxes_xyxy[..., 3] != 0)
    iou = np.zeros((num_tracks, num_frames))
    matched = np.zeros((num_tracks, num_frames), dtype=bool)
    distance = np.full((num_tracks, num_frames), np.nan)
    matched_boxes = np.zeros((num_tracks, num_frames, 4))
    matched_scores = np.zeros((num_tracks, num_frames))
    for frame_index, (boxes, scores, labels) in enumerate(frame_detections):
        boxes = clip_boxes(boxes).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        for label in np.unique(track_labels):
            tracks = np.nonzero((track_labels == label) & valid[:, frame_index])[0]
            candidates = np.nonzero(labels == label)[0]
            if len(tracks) == 0 or len(candidates) == 0:
                continue
            layout_boxes = clip_boxes(layout_boxes_xyxy[tracks, frame_index])
            assignment = match_boxes(layout_boxes, boxes[candidates])
            for row, column in enumerate(assignment):
                if column < 0:
                    continue
                track, box = tracks[row], boxes[candidates[column]]
                matched[track, frame_index] = True
                matched_boxes[track, frame_index] = box
                matched_scores[track, frame_index] = scores[candidates[column]]
                iou[track, frame_index] = compute_iou_matrix(layout_boxes[row][None], box[None])[0, 0]
                distance[track, frame_index] = compute_centroid_distance(layout_boxes[row], box)
    objects = []
    for track in range(num_tracks):
        expected = int(valid[track].sum())
        hits = int((matched[track] & valid[track]).sum())
        covered = int((matched[track] & valid[track] & (iou[track] > coverage_min_iou)).sum())
        objects.append(ObjectAdherence(
            track_id=int(track_ids[track]), phrase=phrases[track], query=queries[track_labels[track]],
            expected_frames=expected, matched_frames=hits, covered_frames=covered,
            miou=float(iou[track][valid[track]].mean()) if expected else None,
            coverage=covered / expected if expected else None,
            centroid_distance=float(np.nanmean(distance[track][valid[track]])) if hits else None))
    records = collect_ap_records(layout_boxes_xyxy, track_labels, frame_detections)
    return VideoAdherence(tuple(objects), records, matched_boxes, matched_scores)


def summarize_adherence(videos: Sequence[dict]) -> dict:
    """Averages of per-video adherence dicts (``VideoAdherence.to_dict()``): each video counts once
    for mIoU, coverage and centroid distance; AP50 pools the detections of all videos."""
    pooled = APRecords()
    for video in videos:
        pooled.extend(APRecords.from_dict(video["ap_records"]))
    return {"videos": len(videos),
            "miou": _mean([v["miou"] for v in videos]),
            "coverage": _mean([v["coverage"] for v in videos]),
            "centroid_distance": _mean([v["centroid_distance"] for v in videos]),
            "ap50": compute_average_precision(pooled)}
