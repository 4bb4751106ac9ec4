"""Stage-2 verdicts without a detector: frame selection, NMS, one box per class, pseudo-layouts and
injected detections for every task family (reference spec 10.2, 9.3)."""
from __future__ import annotations

import numpy as np
import pytest

import utils.eval.verdicts as verdicts
import utils.predicates as predicates
from eval_run_fixtures import make_detections
from prompt import get_benchmark
from utils.eval.config import EvalConfig
from utils.eval.verdicts import (FrameBoxes, FrameSelectionError, build_pseudo_layout, compute_class_aware_nms_keep,
                                 compute_nms_keep, judge_detections, postprocess_frame, select_frame_indices,
                                 select_top_box_per_label)
from utils.predicates import (AttributionCheck, DynamicSpatialCheck, NumeracyCheck, SequentialCheck,
                              VisibilityCheck)

README = EvalConfig(detection_score_threshold=0.1, nms_threshold=0.1, class_aware_nms=True)
W, H = 256, 256
EVAL_FRAMES = (0, 3, 6, 9, 12, 15)


# --------------------------------------------------------------------------------------------
# Frame selection


def test_frame_selection_matches_the_spec():
    assert select_frame_indices(16, 6) == (0, 3, 6, 9, 12, 15)
    assert select_frame_indices(24, 6) == (0, 5, 9, 14, 18, 23)
    assert select_frame_indices(6, 6) == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("num_frames", [0, 1, 5])
def test_frame_selection_rejects_short_videos(num_frames):
    with pytest.raises(FrameSelectionError, match=f"{num_frames} frames"):
        select_frame_indices(num_frames, 6)


# --------------------------------------------------------------------------------------------
# NMS against a brute-force reference


def _brute_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_nms(boxes, scores, threshold):
    remaining = list(range(len(boxes)))
    kept = []
    while remaining:
        best = max(remaining, key=lambda i: (scores[i], -i))  # highest score, first index on ties
        kept.append(best)
        remaining = [i for i in remaining if i != best and _brute_iou(boxes[best], boxes[i]) < threshold]
    return kept


def _random_boxes(rng, n):
    xy = rng.random((n, 2)) * 0.8
    wh = rng.random((n, 2)) * 0.4 + 0.01
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_nms_matches_brute_force(seed, threshold):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    boxes = _random_boxes(rng, n)
    scores = np.round(rng.random(n), 1)  # rounded: ties happen
    labels = rng.integers(0, 3, n)
    assert compute_nms_keep(boxes, scores, threshold).tolist() == _brute_nms(boxes, scores, threshold)
    expected = []
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        expected += [int(members[i]) for i in _brute_nms(boxes[members], scores[members], threshold)]
    assert compute_class_aware_nms_keep(boxes, scores, labels, threshold).tolist() == expected


def test_nms_drops_iou_equal_to_threshold():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 0.5]])  # IoU exactly 0.5
    assert compute_nms_keep(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0]
    assert compute_nms_keep(boxes, np.array([0.9, 0.8]), 0.51).tolist() == [0, 1]


def test_top_box_per_label():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    labels = np.array([1, 0, 1, 0, 2])
    assert select_top_box_per_label(scores, labels).tolist() == [1, 2, 4]


def test_threshold_keeps_scores_equal_to_it_and_normalises_by_frame_size():
    boxes = np.array([[10, 20, 110, 60], [0, 0, 5, 5]], dtype=np.float32)
    kept = postprocess_frame(boxes, np.array([0.1, 0.0999], dtype=np.float32), np.array([0, 0]),
                             width=200, height=100, score_threshold=0.1, nms_threshold=0.5,
                             class_aware_nms=False, one_box_per_class=False)
    np.testing.assert_allclose(kept.boxes_xyxy, [[0.05, 0.2, 0.55, 0.6]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Pseudo-layouts


def test_pseudo_layout_ids_names_and_half_even_pixel_boxes():
    width, height = 256, 128
    frame = FrameBoxes(np.array([[2.5, 3.5, 10.5, 20.5], [100, 10, 150, 60], [0, 0, 64, 64]], dtype=np.float32)
                       / np.array([width, height, width, height], dtype=np.float32),
                       np.array([0.9, 0.8, 0.7], dtype=np.float32), np.array([0, 0, 1]))
    layout = build_pseudo_layout([frame, FrameBoxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))],
                                 ("a photo of a cat", "a photo of a dog"), "prompt", width, height)
    assert [t.id for t in layout.tracks] == [0, 1, 100]
    assert layout.phrases == ("a photo of a cat", "a photo of a cat", "a photo of a dog")
    assert layout.background == "" and layout.num_keyframes == 2
    first = layout.tracks[0].keyframes[0]
    # [2.5, 3.5, 8, 17] px rounds half to even -> [2, 4, 8, 17]; the divisor is the frame's W and H.
    assert first.as_tuple() == pytest.approx((2 / 256, 4 / 128, 2 / 256 + 8 / 256, 4 / 128 + 17 / 128))
    assert layout.tracks[0].keyframes[1] is None


def test_verdicts_go_through_the_stage_one_predicates():
    assert verdicts.score_layout is predicates.score_layout


# --------------------------------------------------------------------------------------------
# Injected detections, one passing and one failing case per family


def _entry(check_type, **wanted):
    for item in get_benchmark("lvd"):
        check = item.check
        if isinstance(check, check_type) and all(getattr(check, k) == v for k, v in wanted.items()):
            return item
    raise LookupError(wanted)


def _box(cx, cy, size=40):
    return [cx * W - size / 2, cy * H - size / 2, cx * W + size / 2, cy * H + size / 2]


def _judge(item, frames, config=README):
    detections = make_detections(item.check.queries, EVAL_FRAMES, W, H, frames, num_frames=16)
    success, _, _ = judge_detections(item.check, detections, item.prompt, config)
    return success


def test_numeracy():
    item = _entry(NumeracyCheck, count=2, name="cat")
    two = [[(_box(0.25, 0.5), 0.9, 0), (_box(0.75, 0.5), 0.8, 0),
            (_box(0.26, 0.5), 0.85, 0),   # duplicate of the first: removed by NMS
            (_box(0.5, 0.1), 0.05, 0)]]   # below the threshold
    assert _judge(item, two * 6)
    three = [[(_box(0.2, 0.5), 0.9, 0), (_box(0.5, 0.5), 0.8, 0), (_box(0.8, 0.5), 0.7, 0)]]
    assert not _judge(item, three * 4 + two * 2)


def test_attribution_and_class_aware_nms():
    item = _entry(AttributionCheck)
    both = [[(_box(0.3, 0.5), 0.9, 0), (_box(0.7, 0.5), 0.8, 1)]]
    assert _judge(item, both * 6)
    first_only = [[(_box(0.3, 0.5), 0.9, 0)]]
    assert not _judge(item, both * 2 + first_only * 4)
    # Overlapping boxes of the two queries: class-aware NMS keeps both, plain NMS drops the second.
    overlapping = [[(_box(0.5, 0.5, 60), 0.9, 0), (_box(0.52, 0.5, 60), 0.8, 1)]]
    assert _judge(item, overlapping * 6)
    plain = EvalConfig(detection_score_threshold=0.1, nms_threshold=0.1, class_aware_nms=False)
    assert not _judge(item, overlapping * 6, plain)


def test_visibility():
    appear = _entry(VisibilityCheck, appears=True)
    seen = [[(_box(0.5, 0.5), 0.9, 0)]]
    assert _judge(appear, [[], [], [], seen[0], seen[0], seen[0]])  # frame 3 is ignored
    assert not _judge(appear, [seen[0], [], [], [], seen[0], seen[0]])
    disappear = _entry(VisibilityCheck, appears=False)
    assert _judge(disappear, [seen[0], seen[0], [], [], [], []])
    assert not _judge(disappear, seen * 6)


def test_dynamic_spatial_one_object():
    item = _entry(DynamicSpatialCheck, direction="left_to_right")
    assert len(item.check.names) == 1
    path = [[(_box(0.15 + 0.14 * k, 0.5), 0.9, 0)] for k in range(6)]
    assert _judge(item, path)
    assert not _judge(item, path[::-1])


def test_dynamic_spatial_two_objects():
    item = next(i for i in get_benchmark("lvd")
                if isinstance(i.check, DynamicSpatialCheck) and len(i.check.names) == 2
                and i.check.direction == "left_to_right")
    passes = [[(_box(0.2 + 0.12 * k, 0.3), 0.9, 0), (_box(0.5, 0.7), 0.8, 1)] for k in range(6)]
    assert _judge(item, passes)
    stays_left = [[(_box(0.2, 0.3), 0.9, 0), (_box(0.5, 0.7), 0.8, 1)] for _ in range(6)]
    assert not _judge(item, stays_left)


def test_sequential():
    item = _entry(SequentialCheck, locations=("lower left", "lower right", "upper right"))
    lower_left, lower_right, upper_right, upper_left = (0.25, 0.75), (0.75, 0.75), (0.75, 0.25), (0.25, 0.25)
    path = [lower_left, lower_left, lower_right, lower_right, upper_right, upper_right]
    assert _judge(item, [[(_box(*c), 0.9, 0)] for c in path])
    wrong = [lower_left, lower_left, upper_left, upper_left, upper_right, upper_right]
    assert not _judge(item, [[(_box(*c), 0.9, 0)] for c in wrong])


def test_one_box_per_class_keeps_the_best_box_only():
    item = _entry(VisibilityCheck, appears=True)
    # Two separated boxes per frame: one box per class keeps one track (id 0), so visibility
    # only looks at the best box; numeracy-style counting would see two.
    frames = [[], [], [], [], [(_box(0.2, 0.5), 0.9, 0), (_box(0.8, 0.5), 0.5, 0)],
              [(_box(0.2, 0.5), 0.9, 0), (_box(0.8, 0.5), 0.5, 0)]]
    detections = make_detections(item.check.queries, EVAL_FRAMES, W, H, frames)
    success, layout, kept = judge_detections(item.check, detections, item.prompt, README)
    assert success and [t.id for t in layout.tracks] == [0]
    assert [len(k.scores) for k in kept] == [0, 0, 0, 0, 1, 1]


def test_queries_must_match_the_check():
    item = _entry(NumeracyCheck, count=1, name="dog")
    detections = make_detections(("a photo of a cat",), EVAL_FRAMES, W, H, [[]] * 6)
    with pytest.raises(ValueError, match="queries"):
        judge_detections(item.check, detections, item.prompt, README)


@pytest.mark.parametrize("num_frames", [6, 7, 16, 24, 49, 81, 121, 300])
def test_frame_selection_for_any_length_from_six(num_frames):
    """Every video length >= 6 (Wan's 81 frames included) gets six distinct frames, first and last included."""
    indices = select_frame_indices(num_frames, 6)
    assert len(set(indices)) == 6 and indices[0] == 0 and indices[-1] == num_frames - 1
    assert list(indices) == sorted(indices)
    if num_frames == 81:
        assert indices == (0, 16, 32, 48, 64, 80)
