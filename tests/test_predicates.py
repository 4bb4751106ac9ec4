"""Benchmark predicates (utils/predicates.py) on hand-written box tracks, spec 9.3-9.4 and 10.1."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prompt import get_benchmark
from utils.layout import build_layout_from_frames, parse_layout
from utils.predicates import (LEFT_TO_RIGHT, RIGHT_TO_LEFT, AttributionCheck, DynamicSpatialCheck, NumeracyCheck,
                              SequentialCheck, TaskTally, VisibilityCheck, build_eval_condition, compute_valid,
                              find_track, score_check, score_layout)

CACHE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lvd-caches"
F = 6  # both stages judge six frames

# Boxes by region of the unit canvas (xyxy); each has a strict centre on one side of 0.5.
LEFT = (0.1, 0.4, 0.3, 0.6)          # cx 0.2
RIGHT = (0.7, 0.4, 0.9, 0.6)         # cx 0.8
MIDDLE = (0.4, 0.4, 0.6, 0.6)        # cx 0.5, cy 0.5
LOWER_LEFT = (0.1, 0.7, 0.3, 0.9)
LOWER_RIGHT = (0.7, 0.7, 0.9, 0.9)
UPPER_LEFT = (0.1, 0.1, 0.3, 0.3)
UPPER_RIGHT = (0.7, 0.1, 0.9, 0.3)
ABSENT = None


def tracks(*per_track) -> np.ndarray:
    """(tracks, F, 4) from per-track lists of F boxes (None = absent = zeros)."""
    boxes = np.zeros((len(per_track), F, 4))
    for t, frames in enumerate(per_track):
        assert len(frames) == F
        for f, box in enumerate(frames):
            if box is not None:
                boxes[t, f] = box
    return boxes


def present_at(frames_present, box=MIDDLE):
    return [box if f in frames_present else ABSENT for f in range(F)]


# --------------------------------------------------------------------------------------------
# Helpers


def test_valid_tests_x_max_and_y_max_only():
    boxes = np.array([[[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.0, 0.5], [0.1, 0.1, 0.5, 0.0],
                       [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [-0.2, -0.2, -0.1, -0.1]]])
    # Zero-size but non-zero corner counts as valid; so does a box left of the canvas.
    assert compute_valid(boxes).tolist() == [[True, False, False, True, False, True]]


def test_find_semantics():
    assert find_track(["a red car", "car"], ["car"]) == 0       # ends with the name
    assert find_track(["cartoon dog", "car"], ["car"]) == 1     # "car " not in "cartoon dog"
    assert find_track(["car seat", "car"], ["car"]) == 0        # contains "car "
    assert find_track(["bobcat"], ["cat"]) == 0                 # endswith, no word boundary (faithful)
    assert find_track(["cats", "cat toy"], ["cat"]) == 1
    assert find_track(["cats"], ["cat"]) is None
    assert find_track(["dog", "cat"], ["bird", "cat"]) == 1     # any of the names, first track wins
    assert find_track([], ["cat"]) is None


# --------------------------------------------------------------------------------------------
# Numeracy


def test_numeracy_majority_over_all_tracks():
    # Per-frame counts 2, 2, 2, 1, 1, 3: majority 2. Names are ignored.
    boxes = tracks(present_at({0, 1, 2, 3, 4, 5}), present_at({0, 1, 2, 5}), present_at({5}))
    phrases = ["dog", "tree", "cloud"]
    assert score_check(NumeracyCheck("dog", 2, ()), phrases, boxes)
    assert not score_check(NumeracyCheck("dog", 1, ()), phrases, boxes)
    assert not score_check(NumeracyCheck("dog", 3, ()), phrases, boxes)


def test_numeracy_ties_go_to_the_smallest_count():
    boxes = tracks(present_at(set(range(6))), present_at({3, 4, 5}))  # counts 1,1,1,2,2,2
    assert score_check(NumeracyCheck("cat", 1, ()), ["cat", "cat"], boxes)
    assert not score_check(NumeracyCheck("cat", 2, ()), ["cat", "cat"], boxes)
    boxes = tracks(present_at({0, 1}), present_at({0, 1}), present_at({2, 3}))  # counts 2,2,1,1,0,0
    assert score_check(NumeracyCheck("cat", 0, ()), ["cat"] * 3, boxes)


def test_numeracy_without_tracks():
    assert not score_check(NumeracyCheck("dog", 1, ()), [], np.zeros((0, F, 4)))
    assert score_check(NumeracyCheck("dog", 0, ()), [], np.zeros((0, F, 4)))
    assert not score_check(NumeracyCheck("dog", 1, ()), [], [])


# --------------------------------------------------------------------------------------------
# Attribution


def test_attribution_needs_both_objects_half_the_time():
    check = AttributionCheck(("red car", "blue dog"), ())
    both = tracks(present_at(set(range(6))), present_at({0, 1, 2}))  # 6/6 and exactly 3/6
    assert score_check(check, ["a red car", "blue dog"], both)
    too_short = tracks(present_at(set(range(6))), present_at({0, 1}))  # 2/6 < 0.5
    assert not score_check(check, ["red car", "blue dog"], too_short)
    assert not score_check(check, ["red car", "green dog"], both)      # second not found
    assert not score_check(check, ["red cars", "blue dog"], both)      # "red car " / endswith fail
    swapped = tracks(present_at({0, 1, 2}), present_at(set(range(6))))
    assert score_check(check, ["blue dog", "red car"], swapped)        # order of tracks is irrelevant


# --------------------------------------------------------------------------------------------
# Visibility: windows {0, 1} and {4, 5}; frames 2 and 3 are ignored


@pytest.mark.parametrize("frames, appears_ok, disappears_ok", [
    ({4, 5}, True, False),
    ({2, 3, 4, 5}, True, False),      # frames 2, 3 ignored
    ({5}, True, False),
    ({0, 1}, False, True),
    ({0, 1, 2, 3}, False, True),
    ({1}, False, True),
    ({1, 4}, False, False),           # in both halves
    ({2, 3}, False, False),           # only in the ignored middle
    (set(), False, False),
])
def test_visibility_windows(frames, appears_ok, disappears_ok):
    boxes = tracks(present_at(frames))
    assert score_check(VisibilityCheck("cat", True, ()), ["lively cat"], boxes) is appears_ok
    assert score_check(VisibilityCheck("cat", False, ()), ["lively cat"], boxes) is disappears_ok


def test_visibility_needs_the_object():
    boxes = tracks(present_at({4, 5}))
    assert not score_check(VisibilityCheck("cat", True, ()), ["dog"], boxes)


# --------------------------------------------------------------------------------------------
# Dynamic spatial


def test_one_object_left_to_right_and_back():
    moving_right = tracks([LEFT, LEFT, MIDDLE, MIDDLE, RIGHT, RIGHT])
    moving_left = tracks([RIGHT, RIGHT, MIDDLE, MIDDLE, LEFT, LEFT])
    l2r = DynamicSpatialCheck(("car",), LEFT_TO_RIGHT, ())
    r2l = DynamicSpatialCheck(("car",), RIGHT_TO_LEFT, ())
    assert score_check(l2r, ["car"], moving_right) and not score_check(l2r, ["car"], moving_left)
    assert score_check(r2l, ["car"], moving_left) and not score_check(r2l, ["car"], moving_right)
    standing = tracks([MIDDLE] * 6)
    assert not score_check(l2r, ["car"], standing) and not score_check(r2l, ["car"], standing)  # strict
    late = tracks([ABSENT, LEFT, MIDDLE, MIDDLE, RIGHT, RIGHT])
    assert not score_check(l2r, ["car"], late)  # must be valid at the first and the last frame


def test_two_objects_pass_each_other():
    l2r = DynamicSpatialCheck(("dog", "car"), LEFT_TO_RIGHT, ())
    r2l = DynamicSpatialCheck(("dog", "car"), RIGHT_TO_LEFT, ())
    dog_l2r = [LEFT, LEFT, MIDDLE, MIDDLE, RIGHT, RIGHT]
    dog_r2l = list(reversed(dog_l2r))
    car = [MIDDLE] * 6
    assert score_check(l2r, ["dog", "car"], tracks(dog_l2r, car))
    assert not score_check(r2l, ["dog", "car"], tracks(dog_l2r, car))
    assert score_check(r2l, ["car", "dog"], tracks(car, dog_r2l))
    assert not score_check(l2r, ["dog", "car"], tracks(dog_r2l, car))
    # Starts left of the car but never passes it.
    assert not score_check(l2r, ["dog", "car"], tracks([LEFT] * 6, car))
    assert not score_check(l2r, ["dog", "cat"], tracks(dog_l2r, car))  # reference object missing
    car_late = [ABSENT] + [MIDDLE] * 5
    assert not score_check(l2r, ["dog", "car"], tracks(dog_l2r, car_late))


def test_unknown_direction_raises():
    with pytest.raises(ValueError, match="unknown direction"):
        score_check(DynamicSpatialCheck(("car",), "up", ()), ["car"], tracks([LEFT] * 6))


# --------------------------------------------------------------------------------------------
# Sequential: frames 0, 3 and 5


def test_sequential_path():
    check = SequentialCheck("ball", ("lower left", "lower right", "upper right"), ())
    good = [LOWER_LEFT, ABSENT, ABSENT, LOWER_RIGHT, ABSENT, UPPER_RIGHT]  # frames 1, 2, 4 irrelevant
    assert score_check(check, ["ball"], tracks(good))
    wrong_middle = [LOWER_LEFT, LOWER_RIGHT, LOWER_RIGHT, UPPER_LEFT, LOWER_RIGHT, UPPER_RIGHT]
    assert not score_check(check, ["ball"], tracks(wrong_middle))
    missing_middle = [LOWER_LEFT, LOWER_RIGHT, LOWER_RIGHT, ABSENT, UPPER_RIGHT, UPPER_RIGHT]
    assert not score_check(check, ["ball"], tracks(missing_middle))
    assert not score_check(check, ["dog"], tracks(good))


@pytest.mark.parametrize("location, box, ok", [
    ("lower left", (0.1, 0.6, 0.3, 0.8), True),
    ("lower left", (0.1, 0.4, 0.3, 0.6), False),   # cy == 0.5 is neither lower nor upper
    ("upper left", (0.1, 0.2, 0.3, 0.4), True),
    ("upper right", (0.4, 0.2, 0.6, 0.4), False),  # cx == 0.5 is neither left nor right
    ("upper right", (0.45, 0.2, 0.6, 0.4), True),
    ("lower right", (0.6, 0.55, 0.8, 0.75), True),
])
def test_sequential_location_tests_are_strict(location, box, ok):
    check = SequentialCheck("ball", (location, location, location), ())
    assert score_check(check, ["ball"], tracks([box] * 6)) is ok


# --------------------------------------------------------------------------------------------
# Conditions and layouts


def test_score_check_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one track per phrase"):
        score_check(NumeracyCheck("car", 1, ()), ["car", "dog"], tracks([LEFT] * 6))


def test_score_layout_strips_phrases_and_resamples_to_six():
    def frame(x):
        return [{"id": 0, "name": "walking dog 1", "box": [x, 200, 60, 60]}]

    layout = build_layout_from_frames([frame(20), frame(100), frame(180), frame(260), frame(340), frame(420)],
                                      prompt="A dog walks to the right")
    condition = build_eval_condition(layout)
    assert condition.phrases == ("walking dog",) and condition.boxes_xyxy.shape == (1, 6, 4)
    assert score_layout(DynamicSpatialCheck(("dog",), LEFT_TO_RIGHT, ()), layout)
    assert not score_layout(DynamicSpatialCheck(("dog",), RIGHT_TO_LEFT, ()), layout)
    empty = build_layout_from_frames([[]] * 6, prompt="Nothing")
    assert not score_layout(NumeracyCheck("dog", 1, ()), empty)
    assert not score_layout(VisibilityCheck("dog", True, ()), empty)


# --------------------------------------------------------------------------------------------
# Tally


def test_task_tally_json_and_table():
    tally = TaskTally.empty()
    for success in (True, True, False):
        tally.add("numeracy", success)
    tally.add("sequential", False)
    assert tally.to_dict() == {"tasks": {"numeracy": {"correct": 2, "total": 3},
                                         "sequential": {"correct": 0, "total": 1}},
                               "overall": {"correct": 2, "total": 4}}
    json.dumps(tally.to_dict())  # JSON-ready
    lines = tally.format_table().splitlines()
    assert lines[0].split() == ["task", "correct", "total", "rate", "%"]
    assert lines[1].split() == ["numeracy", "2", "3", "66.67"]
    assert lines[2].split() == ["sequential", "0", "1", "0.00"]
    assert lines[3].split() == ["overall", "2", "4", "50.00"]  # micro average


# --------------------------------------------------------------------------------------------
# Stage-1 scores on the published caches (spec 10.1; README rows)


@pytest.mark.parametrize("cache_name, expected", [
    ("cache_lvd_v0.1_gpt-4-1106-preview.json",
     {"numeracy": 100, "attribution": 100, "visibility": 100, "dynamic_spatial": 100, "sequential": 88}),
    ("cache_lvd_v0.1_gpt-3.5-turbo.json",
     {"numeracy": 100, "attribution": 100, "visibility": 100, "dynamic_spatial": 73, "sequential": 15}),
])
def test_stage_one_scores_on_published_caches(cache_name, expected):
    path = CACHE_DIR / cache_name
    if not path.is_file():
        pytest.skip(f"published cache not available at {path}")
    cache = json.loads(path.read_text(encoding="utf-8"))
    # Every stored reply parses, repeats included.
    for prompt, replies in cache.items():
        for reply in replies:
            parse_layout(reply, prompt)
    occurrence = Counter()
    tally = TaskTally.empty()
    for item in get_benchmark("lvd"):
        reply = cache[item.prompt][occurrence[item.prompt]]  # k-th occurrence -> k-th reply
        occurrence[item.prompt] += 1
        tally.add(item.task, score_layout(item.check, parse_layout(reply, item.prompt)))
    result = tally.to_dict()
    assert {task: v["correct"] for task, v in result["tasks"].items()} == expected
    assert all(v["total"] == 100 for v in result["tasks"].values())
    assert result["overall"] == {"correct": sum(expected.values()), "total": 500}
