"""Why a verdict is what it is (issue 12 item 4): one line per video that names what the check asks for
and what was detected, for each task family; the verdict itself stays the predicate's."""
from __future__ import annotations

import numpy as np
import pytest

from eval_run_fixtures import make_detections
from prompt import get_benchmark
from utils.eval.config import EvalConfig
from utils.eval.explain import describe_location, explain_verdict
from utils.eval.verdicts import judge_detections
from utils.predicates import AttributionCheck, DynamicSpatialCheck, NumeracyCheck, SequentialCheck, VisibilityCheck

README = EvalConfig(detection_score_threshold=0.1, nms_threshold=0.1, class_aware_nms=True)
W = H = 256
FRAMES = (0, 3, 6, 9, 12, 15)


def _entry(check_type, **wanted):
    return next(item for item in get_benchmark("lvd") if isinstance(item.check, check_type)
                and all(getattr(item.check, k) == v for k, v in wanted.items()))


def _box(cx, cy, size=40):
    return [cx * W - size / 2, cy * H - size / 2, cx * W + size / 2, cy * H + size / 2]


def _explain(item, frames):
    detections = make_detections(item.check.queries, FRAMES, W, H, frames, num_frames=16)
    success, layout, _ = judge_detections(item.check, detections, item.prompt, README)
    return success, explain_verdict(item.check, layout, FRAMES)


def test_numeracy():
    item = _entry(NumeracyCheck, count=2, name="cat")
    one, two = [(_box(0.25, 0.5), 0.9, 0)], [(_box(0.25, 0.5), 0.9, 0), (_box(0.75, 0.5), 0.8, 0)]
    success, text = _explain(item, [one, one, two, one, [], one])
    assert not success
    assert text == "expected 2 cat; boxes per frame: 0:1 3:1 6:2 9:1 12:0 15:1 -> majority 1"
    assert _explain(item, [[]] * 6) == (False, "expected 2 cat; boxes per frame: 0:0 3:0 6:0 9:0 12:0 15:0 "
                                               "-> majority 0")


def test_attribution():
    item = _entry(AttributionCheck)
    first, second = item.check.names
    frames = [[(_box(0.3, 0.5), 0.9, 0)]] * 2 + [[]] * 4
    success, text = _explain(item, frames)
    assert not success
    assert text == (f"each object in at least half of the 6 frames: {first} in 2 of 6 (frames 0, 3); "
                    f"{second} not detected")


def test_visibility():
    item = _entry(VisibilityCheck, appears=True)
    seen = [(_box(0.5, 0.5), 0.9, 0)]
    success, text = _explain(item, [seen, [], [], [], seen, seen])
    assert not success
    assert text == (f"expected the {item.check.name} absent in frames 0, 3 and present in one of 12, 15; "
                    "detected in frames 0, 12, 15")
    assert _explain(item, [[]] * 6)[1].endswith("never detected")


def test_dynamic_spatial():
    one = _entry(DynamicSpatialCheck, direction="left_to_right")
    path = [[(_box(0.15 + 0.14 * k, 0.5), 0.9, 0)] for k in range(6)]
    success, text = _explain(one, path[::-1])
    assert not success and text == (f"expected the {one.check.names[0]} in frames 0 and 15, moving left to right; "
                                    "centre x 0.85 -> 0.15")
    assert _explain(one, path[:5] + [[]])[1].endswith(f"{one.check.names[0]} not detected in frame 15")
    two = next(i for i in get_benchmark("lvd") if isinstance(i.check, DynamicSpatialCheck)
               and len(i.check.names) == 2 and i.check.direction == "left_to_right")
    moving, reference = two.check.names
    stays = [[(_box(0.2, 0.3), 0.9, 0), (_box(0.5, 0.7), 0.8, 1)]] * 6
    success, text = _explain(two, stays)
    assert not success and text == (f"expected the {moving} left of the {reference} in frame 0 and right of it in "
                                    f"frame 15; frame 0: {moving} x 0.20, {reference} x 0.50; "
                                    f"frame 15: {moving} x 0.20, {reference} x 0.50")


def test_sequential():
    item = _entry(SequentialCheck, locations=("lower left", "lower right", "upper right"))
    path = [(0.25, 0.75), (0.25, 0.75), (0.25, 0.25), (0.25, 0.25), (0.75, 0.25), (0.75, 0.25)]
    frames = [[(_box(*c), 0.9, 0)] for c in path[:5]] + [[]]
    success, text = _explain(item, frames)
    assert not success
    assert text == (f"expected the {item.check.name} at lower left (frame 0) -> lower right (frame 9) -> upper right "
                    "(frame 15); found frame 0 lower left (0.25, 0.75), frame 9 upper left (0.25, 0.25), "
                    "frame 15 not detected")


@pytest.mark.parametrize("center, words", [((0.25, 0.75), "lower left"), ((0.5, 0.5), "middle centre"),
                                           ((0.9, 0.1), "upper right")])
def test_locations(center, words):
    cx, cy = center
    assert describe_location(np.array([cx - 0.1, cy - 0.1, cx + 0.1, cy + 0.1])).startswith(words)
