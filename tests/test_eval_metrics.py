"""Layout-adherence metrics on hand-made boxes, and the summary / averaging of evaluations."""
from __future__ import annotations

import numpy as np
import pytest

from utils.eval.averaging import average_summaries
from utils.eval.evaluation import build_adherence_queries
from utils.eval.results import EvalSummary
from utils.eval.tables import format_summary_table
from utils.eval.metrics import (APRecords, collect_ap_records, compute_average_precision, compute_iou_matrix,
                                score_adherence, summarize_adherence)


def _frame(boxes=(), scores=(), labels=()):
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64),
            np.asarray(labels, dtype=np.int64))


def test_iou_matrix():
    a = np.array([[0, 0, 1, 1], [0, 0, 0, 0]])
    b = np.array([[0, 0, 0.5, 1], [2, 2, 3, 3]])
    np.testing.assert_allclose(compute_iou_matrix(a, b), [[0.5, 0.0], [0.0, 0.0]])


def test_adherence_of_one_object():
    # Layout: frame 0 top-left quarter, frame 1 bottom-right quarter, frame 2 absent.
    layout = np.array([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 0, 0]]])
    detections = [_frame([[0, 0, 0.5, 0.25]], [0.9], [0]),   # IoU 0.5, centres 0.125 apart
                  _frame(),                                   # missed
                  _frame([[0.1, 0.1, 0.3, 0.3]], [0.3], [0])]  # the layout has no box here: a false positive
    result = score_adherence(layout, [7], ["cat"], [0], ["a photo of a cat"], detections)
    (obj,) = result.objects
    assert (obj.track_id, obj.expected_frames, obj.matched_frames) == (7, 2, 1)
    assert obj.coverage == pytest.approx(0.5)
    assert obj.miou == pytest.approx(0.25)            # (0.5 + 0) / 2: a miss counts 0
    assert obj.centroid_distance == pytest.approx(0.125)
    # AP50: two ground-truth boxes; 0.9 is a hit, 0.3 a false positive -> recall 0.5 at precision 1.
    assert result.ap50 == pytest.approx(0.5)
    assert result.matched_boxes_xyxy[0, 0].tolist() == [0, 0, 0.5, 0.25]


def test_adherence_matches_same_query_tracks_one_to_one():
    # Two cats (numeracy): detections listed in the opposite order still match their own track.
    layout = np.array([[[0, 0, 0.4, 0.4]], [[0.6, 0.6, 1, 1]]])
    detections = [_frame([[0.6, 0.6, 1, 1], [0, 0, 0.4, 0.4]], [0.9, 0.8], [0, 0])]
    result = score_adherence(layout, [0, 1], ["cat", "cat"], [0, 0], ["a photo of a cat"], detections)
    assert [o.miou for o in result.objects] == [1.0, 1.0]
    assert result.ap50 == pytest.approx(1.0)


def test_adherence_ignores_other_queries_and_clips_to_the_frame():
    layout = np.array([[[-0.5, 0, 0.5, 1]]])                  # clipped to [0, 0, 0.5, 1]
    detections = [_frame([[0, 0, 0.5, 1], [0, 0, 0.5, 1]], [0.9, 0.95], [0, 1])]
    result = score_adherence(layout, [0], ["cat"], [0], ["a photo of a cat", "a photo of a dog"], detections)
    assert result.objects[0].miou == pytest.approx(1.0)
    assert result.ap50 == pytest.approx(1.0)  # the dog box is not a candidate for the cat


def test_adherence_of_an_object_never_detected():
    layout = np.array([[[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]])
    result = score_adherence(layout, [0], ["dog"], [0], ["a photo of a dog"], [_frame(), _frame()])
    obj = result.objects[0]
    assert (obj.miou, obj.coverage, obj.centroid_distance) == (0.0, 0.0, None)
    assert result.ap50 == 0.0


def test_average_precision_by_hand():
    # 3 ground truths; scores 0.9 hit, 0.8 miss, 0.7 hit: precision envelope 1 up to recall 1/3,
    # then 2/3 up to recall 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3.
    records = APRecords(3, [0.8, 0.9, 0.7], [False, True, True])
    assert compute_average_precision(records) == pytest.approx(1 / 3 + 2 / 9)
    assert compute_average_precision(APRecords(0, [0.5], [False])) is None
    assert compute_average_precision(APRecords(2, [], [])) == 0.0


def test_ap_greedy_matching_counts_duplicates_as_false_positives():
    layout = np.array([[[0, 0, 0.5, 0.5]]])
    detections = [_frame([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]], [0.9, 0.8], [0, 0])]
    records = collect_ap_records(layout, [0], detections)
    assert (records.num_ground_truth, records.true_positive) == (1, [True, False])


def test_summarize_adherence_pools_ap_and_averages_per_video():
    videos = [{"miou": 0.2, "coverage": 1.0, "centroid_distance": None,
               "ap_records": APRecords(1, [0.9], [True]).to_dict()},
              {"miou": 0.6, "coverage": 0.5, "centroid_distance": 0.1,
               "ap_records": APRecords(1, [0.8], [False]).to_dict()}]
    summary = summarize_adherence(videos)
    assert summary["miou"] == pytest.approx(0.4) and summary["coverage"] == pytest.approx(0.75)
    assert summary["centroid_distance"] == pytest.approx(0.1)
    assert summary["ap50"] == pytest.approx(0.5) and summary["videos"] == 2


def test_adherence_queries_from_layout_phrases():
    queries, labels = build_adherence_queries(["cat 1", "cat 2", "orange cat", "an apple"])
    assert queries == ("a photo of a cat", "a photo of an orange cat", "a photo of an apple")
    assert labels == [0, 0, 1, 2]


def _summary(numeracy, attribution, skipped=0):
    tasks = {"numeracy": {"correct": numeracy, "total": 100}, "attribution": {"correct": attribution, "total": 100}}
    return EvalSummary.from_dict({
        "tasks": tasks, "overall": {"correct": numeracy + attribution, "total": 200},
        "skipped": {"total": skipped, "tasks": {"numeracy": skipped} if skipped else {}},
        "adherence": {"tasks": {"numeracy": {"videos": 100, "miou": 0.4, "coverage": 0.8,
                                             "centroid_distance": 0.1, "ap50": 0.3}},
                      "overall": {"videos": 100, "miou": 0.4, "coverage": 0.8, "centroid_distance": 0.1,
                                  "ap50": 0.3}}})


def test_average_of_two_runs_is_the_readme_number():
    combined = average_summaries([_summary(40, 90), _summary(51, 80, skipped=2)], ["run0", "run1"]).to_dict()
    assert combined["tasks"]["numeracy"] == {"correct": 91, "total": 200}
    assert combined["overall"] == {"correct": 261, "total": 400}
    assert combined["rates_mean"]["tasks"]["numeracy"] == pytest.approx(0.455)
    assert combined["rates_mean"]["overall"] == pytest.approx(0.6525)
    assert combined["skipped"]["total"] == 2 and combined["runs"] == ["run0", "run1"]
    assert combined["adherence"]["tasks"]["numeracy"]["videos"] == 200
    table = format_summary_table(EvalSummary.from_dict(combined))
    assert "run-mean %" in table and "45.50" in table and "65.25" in table


def test_a_matched_detection_that_does_not_overlap_does_not_cover_the_frame():
    # One cat, one cat detection per frame: frame 0 overlaps (IoU 0.5), frame 1 is elsewhere (IoU 0).
    layout = np.array([[[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]])
    detections = [_frame([[0, 0, 0.5, 0.25]], [0.9], [0]), _frame([[0.6, 0.6, 0.9, 0.9]], [0.9], [0])]
    (obj,) = score_adherence(layout, [0], ["cat"], [0], ["a photo of a cat"], detections).objects
    assert (obj.matched_frames, obj.covered_frames) == (2, 1)
    assert obj.coverage == pytest.approx(0.5) and obj.miou == pytest.approx(0.25)
    assert obj.centroid_distance == pytest.approx((0.125 + np.hypot(0.5, 0.5)) / 2)  # over matched frames
    far = [_frame([[0.6, 0.6, 0.9, 0.9]], [0.9], [0])] * 2  # never overlaps: coverage 0 next to mIoU 0
    (obj,) = score_adherence(layout, [0], ["cat"], [0], ["a photo of a cat"], far).objects
    assert (obj.coverage, obj.miou) == (0.0, 0.0)
    (obj,) = score_adherence(layout, [0], ["cat"], [0], ["a photo of a cat"], detections,
                             coverage_min_iou=0.6).objects  # a stated threshold
    assert obj.coverage == 0.0
