"""EvalSummary, the eval.json schema (issue 9 item 4): every version of the file loads; averaging refuses
evaluations made with different settings (issue 12 item 5)."""
from __future__ import annotations

import copy
import json

import pytest

from eval_run_fixtures import load_script
from utils.eval.averaging import MixedSettingsError, average_summaries, find_setting_differences
from utils.eval.results import EvalSummary, EvalSummaryFormatError, load_eval_summary
from utils.eval.tables import format_skip_line, format_summary_table

# eval.json as written before the typed summary (commit 45deaf5), "videos" left out.
OLD_EVAL = {
    "tasks": {"numeracy": {"correct": 0, "total": 1}, "attribution": {"correct": 1, "total": 1}},
    "overall": {"correct": 1, "total": 2}, "skipped": {"total": 99, "tasks": {"numeracy": 99}},
    "adherence": {"tasks": {"numeracy": {"videos": 1, "miou": 0.0, "coverage": 1.0, "centroid_distance": 0.659,
                                         "ap50": 0.0},
                            "attribution": {"videos": 1, "miou": 0.0, "coverage": 1.0, "centroid_distance": 0.67,
                                            "ap50": 0.0}},
                  "overall": {"videos": 2, "miou": 0.0, "coverage": 1.0, "centroid_distance": 0.664, "ap50": 0.0}},
    "success_counts": {"numeracy": 0, "attribution": 1}, "sample_counts": {"numeracy": 1, "attribution": 1},
    "successes": {"numeracy": [False], "attribution": [True]}, "success_counts_overall": 1,
    "sample_counts_overall": 2,
    "config": {"prompt_type": "lvd", "num_eval_frames": 6, "detection_score_threshold": 0.05, "nms_threshold": 0.5,
               "class_aware_nms": False, "adherence": True, "adherence_all_frames": False,
               "detector": {"kind": "owlvit", "identity": "tiny-owlvit(seed=0,size=64)", "random_weights": True}},
    "run_base_path": "/tmp/oldeval/run0",
    "timing": {"videos": 101, "skipped": 99, "detected_videos": 2, "cached_videos": 0, "detected_frames": 12,
               "detector_seconds": 2.67, "total_seconds": 3.29}}
# The reference script's eval.json (spec 10.2): the counts only.
REFERENCE_EVAL = {"success_counts": {"numeracy": 40, "attribution": 90}, "sample_counts": {"numeracy": 100, "attribution": 100},
                  "successes": {"numeracy": [True] * 40 + [False] * 60, "attribution": [True] * 90 + [False] * 10},
                  "success_counts_overall": 130, "sample_counts_overall": 200}


@pytest.fixture(scope="module")
def averaging():
    return load_script("average_runs")


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_an_old_eval_json_loads_and_keeps_its_fields():
    summary = EvalSummary.from_dict(OLD_EVAL)
    assert summary.tasks["attribution"].rate == 1.0 and summary.overall.total == 2
    assert summary.config.detection_score_threshold == 0.05 and summary.config.video_variant == ""
    assert summary.detector.random_weights and summary.timing.detected_frames == 12
    assert summary.evaluated_videos == 2 and summary.skipped.total == 99
    again = summary.to_dict()
    for key, value in OLD_EVAL.items():  # every field of the old file, with the same value
        if key == "skipped":
            assert {k: again[key][k] for k in value} == value
        elif key == "config":
            assert {k: again[key][k] for k in value} == value
        else:
            assert again[key] == value, key
    assert EvalSummary.from_dict(again).to_dict() == again


def test_the_reference_eval_json_loads():
    summary = EvalSummary.from_dict(REFERENCE_EVAL)
    assert summary.tasks["numeracy"].correct == 40 and summary.overall.total == 200
    assert summary.config is None and summary.settings is None
    assert "numeracy" in format_summary_table(summary)


def test_a_file_that_is_not_a_summary_is_named(tmp_path):
    with pytest.raises(EvalSummaryFormatError, match=r"bad\.json: not an evaluation summary"):
        load_eval_summary(_write(tmp_path / "bad.json", {"prompt": "a cat"}))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EvalSummaryFormatError, match="not valid JSON"):
        load_eval_summary(tmp_path / "broken.json")


def test_averaging_refuses_different_settings_and_names_them():
    other = copy.deepcopy(OLD_EVAL)
    other["config"].update(detection_score_threshold=0.1, class_aware_nms=True)
    summaries = [EvalSummary.from_dict(OLD_EVAL), EvalSummary.from_dict(other)]
    assert find_setting_differences(summaries) == {"detection_score_threshold": (0.05, 0.1),
                                                   "class_aware_nms": (False, True)}
    with pytest.raises(MixedSettingsError, match=r"detection_score_threshold \(a: 0.05, b: 0.1\); "
                                                 r"class_aware_nms \(a: False, b: True\)"):
        average_summaries(summaries, ["a", "b"])
    combined = average_summaries(summaries, ["a", "b"], allow_mixed=True)
    assert combined.config is None and set(combined.mixed_settings) == {"detection_score_threshold", "class_aware_nms"}
    assert combined.to_dict()["mixed_settings"]["class_aware_nms"] == [False, True]
    same = average_summaries([EvalSummary.from_dict(OLD_EVAL)] * 2, ["a", "b"])
    assert same.config == summaries[0].config and not same.mixed_settings


def test_average_runs_refuses_mixed_settings(tmp_path, averaging, capsys):
    other = copy.deepcopy(OLD_EVAL)
    other["config"]["nms_threshold"] = 0.1
    a, b = _write(tmp_path / "a.json", OLD_EVAL), _write(tmp_path / "b.json", other)
    assert averaging.main([str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert f"nms_threshold ({a}: 0.5, {b}: 0.1)" in err and "--allow-mixed" in err
    out = tmp_path / "avg.json"
    assert averaging.main([str(a), str(b), "--allow-mixed", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["mixed_settings"] == {"nms_threshold": [0.5, 0.1]}


def test_average_runs_reads_old_and_reference_files(tmp_path, averaging, capsys):
    run = tmp_path / "run0"
    run.mkdir()
    _write(run / "eval.json", OLD_EVAL)
    reference = [_write(tmp_path / f"ref{k}.json", REFERENCE_EVAL) for k in range(2)]
    assert averaging.main([str(r) for r in reference]) == 0
    captured = capsys.readouterr()
    assert "Summary: 0.40/0.90/0.65" in captured.out and "not recorded" in captured.err
    assert averaging.main([str(run), str(run)]) == 0
    # Ours and the reference's: the reference's settings are unknown, so they cannot be shown to match.
    assert averaging.main([str(run), str(reference[0])]) == 1
    assert "not recorded" in capsys.readouterr().err


def test_average_runs_bad_inputs_are_one_line(tmp_path, averaging, capsys):
    bad = _write(tmp_path / "bad.json", [1, 2])
    assert averaging.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(bad) in err
    assert averaging.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    blocker = _write(tmp_path / "file", {})
    good = _write(tmp_path / "good.json", OLD_EVAL)
    assert averaging.main([str(good), "--json-out", str(blocker / "avg.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --json-out {blocker}: {blocker} is a file, not a folder"


def test_skip_line():
    summary = EvalSummary.from_dict({**OLD_EVAL, "skipped": {"total": 3, "tasks": {"numeracy": 3},
                                                             "kinds": {"no prompt folder": 2, "several repeats": 1}}})
    assert format_skip_line(summary) == "evaluated 2 videos; skipped 3: 2 no prompt folder, 1 several repeats"


def test_the_schema_of_eval_json():
    data = EvalSummary.from_dict(OLD_EVAL).to_dict()
    assert list(data) == ["tasks", "overall", "evaluated_videos", "skipped", "adherence", "success_counts",
                          "sample_counts", "successes", "success_counts_overall", "sample_counts_overall", "config",
                          "run_base_path", "timing"]
    assert list(data["skipped"]) == ["total", "tasks", "kinds"]
    assert list(data["adherence"]["overall"]) == ["videos", "miou", "coverage", "centroid_distance", "ap50"]
    assert list(data["config"]) == ["prompt_type", "num_eval_frames", "detection_score_threshold", "nms_threshold",
                                    "class_aware_nms", "adherence", "adherence_all_frames", "video_variant", "detector"]
    averaged = average_summaries([EvalSummary.from_dict(OLD_EVAL)] * 2, ["a", "b"]).to_dict()
    assert list(averaged)[-2:] == ["rates_mean", "runs"] and averaged["runs"] == ["a", "b"]
