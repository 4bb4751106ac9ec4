"""Per-video measurements on the shapes world, against the planned scene of a caption: prompt following and
layout adherence (the stage-2 evaluation's `score_adherence` on every frame, with the shapes detector).

Used by `scripts/bench_shapes.py` and the tests; the benchmark tables themselves come from the stage-2
evaluation (`scripts/eval_owl_vit.py --detector shapes`).
"""
from __future__ import annotations

import numpy as np

from shapes.detector import ShapeDetection, detect_frame
from shapes.planner import detector_query
from shapes.world import Scene, scene_boxes
from utils.eval.metrics import VideoAdherence, score_adherence

# A detection counts for a query when its score (colour prob x shape prob x fit quality) reaches this.
MIN_SCORE = 0.3


def detect_video(frames: np.ndarray) -> list[list[ShapeDetection]]:
    """The shapes detector on every frame of (F, H, W, 3) uint8."""
    return [detect_frame(frame) for frame in frames]


def follows_prompt(scene: Scene, detections: list[list[ShapeDetection]]) -> bool:
    """Every requested (colour, shape) is detected in at least half of the frames where the plan has it."""
    present = scene_boxes(scene, len(detections)).any(axis=-1)                    # (objects, F)
    first_of_kind = {}
    for index, obj in enumerate(scene.objects):
        first_of_kind.setdefault((obj.colour, obj.shape), index)
    for (colour, shape), index in first_of_kind.items():
        frames = np.nonzero(present[index])[0]
        hits = sum(any(d.score(colour, shape) >= MIN_SCORE for d in detections[f]) for f in frames)
        if hits * 2 < len(frames):
            return False
    return True


def score_video_adherence(scene: Scene, detections: list[list[ShapeDetection]], height: int,
                          width: int) -> VideoAdherence:
    """mIoU, coverage, CD and AP50 of one video against ``scene``'s boxes, over every frame."""
    boxes = scene_boxes(scene, len(detections))
    queries = list(dict.fromkeys(detector_query(obj.colour, obj.shape) for obj in scene.objects))
    labels = [queries.index(detector_query(obj.colour, obj.shape)) for obj in scene.objects]
    scale = np.asarray([width, height, width, height], dtype=np.float64)
    frame_detections = []
    for per_frame in detections:
        kept = [(d, [d.score(*_kind(q)) for q in queries]) for d in per_frame]
        kept = [(d, s) for d, s in kept if max(s) >= MIN_SCORE]
        frame_detections.append((
            np.asarray([np.asarray(d.box_xyxy_px) / scale for d, _ in kept]).reshape(-1, 4),
            np.asarray([max(s) for _, s in kept], dtype=np.float64),
            np.asarray([int(np.argmax(s)) for _, s in kept], dtype=np.int64)))
    return score_adherence(boxes, list(range(len(scene.objects))), [o.phrase for o in scene.objects], labels,
                           queries, frame_detections)


def _kind(query: str) -> tuple[str | None, str | None]:
    from shapes.detector import parse_query

    return parse_query(query)
