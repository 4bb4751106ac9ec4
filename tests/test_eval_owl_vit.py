"""End to end: scripts/eval_owl_vit.py with tiny random detectors on tiny synthetic runs, the
detection cache, injected detections, bad input, the HTML report and run averaging."""
from __future__ import annotations

import json

import joblib
import numpy as np
import pytest

from eval_run_fixtures import draw_video, inject_detections, load_script, write_prompt_folder, write_run
from prompt import get_benchmark, get_prompt_entries
from utils.eval.config import CACHE_DIR_NAME, CacheSettings, EvalConfig, RunSelection
from utils.eval.detector import build_tiny_detector
from utils.eval.evaluation import evaluate_items
from utils.eval.results import summarize_results
from utils.eval.runs import collect_eval_items

# One entry per task family (benchmark indices of the `lvd` list).
FAMILY_INDICES = [0, 100, 200, 300, 400]
README_FLAGS = ["--detection_score_threshold", "0.1", "--nms_threshold", "0.1", "--class-aware-nms"]


@pytest.fixture(scope="module")
def cli():
    return load_script("eval_owl_vit")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_detector("owlvit")


def test_end_to_end_tiny_owlvit_then_cached_rerun(tmp_path, cli, capsys):
    run = write_run(tmp_path / "run0", FAMILY_INDICES)
    args = ["--run_base_path", str(run), "--detector", "tiny", *README_FLAGS, "--save-eval",
            "--report", str(tmp_path / "report")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "meaningless" in out
    assert "Overall: success:" in out and "Summary: " in out
    saved = json.loads((run / "eval.json").read_text())
    assert list(saved["tasks"]) == ["numeracy", "attribution", "visibility", "dynamic_spatial", "sequential"]
    assert all(v["total"] == 1 for v in saved["tasks"].values()) and saved["overall"]["total"] == 5
    assert saved["skipped"]["total"] == 495  # the other prompt folders do not exist
    assert saved["sample_counts_overall"] == 5 and len(saved["successes"]["numeracy"]) == 1
    assert saved["adherence"]["overall"]["videos"] == 5
    assert saved["config"]["detector"]["random_weights"] is True
    evaluated = [v for v in saved["videos"] if not v["skipped"]]
    assert [v["frame_indices"] for v in evaluated] == [[0, 3, 6, 9, 12, 15]] * 5
    assert not any(v["from_cache"] for v in evaluated)
    assert saved["timing"]["detected_videos"] == 5
    page = (tmp_path / "report" / "index.html").read_text()
    assert "random weights" in page and "base64" not in page  # images are files next to the page
    assert page.count('src="media/') == 5 * 6 + 5  # 6 frames and a playable video per evaluated video
    assert len(list((tmp_path / "report" / "media").rglob("frame_*.jpg"))) == 5 * 6

    # Other thresholds: every detection comes from the cache, the detector does not run.
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--detection_score_threshold", "0.5",
                     "--save-eval"]) == 0
    rerun = json.loads((run / "eval.json").read_text())
    assert rerun["timing"]["detected_videos"] == 0 and rerun["timing"]["cached_videos"] == 5
    assert all(v["from_cache"] for v in rerun["videos"] if not v["skipped"])
    assert len(list((run / "0" / CACHE_DIR_NAME).glob("*.npz"))) == 2  # benchmark and adherence queries


def test_end_to_end_tiny_owlv2_non_square(tmp_path, cli, capsys):
    run = write_run(tmp_path / "run0", [0, 300], num_frames=24, height=48, width=96)
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny-owlv2", "--num_prompts", "301",
                     "--save-eval", "--no-detection-cache"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    evaluated = [v for v in saved["videos"] if not v["skipped"]]
    assert [v["frame_indices"] for v in evaluated] == [[0, 5, 9, 14, 18, 23]] * 2
    assert (evaluated[0]["height"], evaluated[0]["width"]) == (48, 96)
    assert not (run / "0" / CACHE_DIR_NAME).exists()


def test_injected_detections_give_the_expected_verdicts(tmp_path, cli, tiny, capsys):
    """Detections written straight into the cache (no model) go through the whole CLI."""
    run = write_run(tmp_path / "run0", [300, 305])   # "... a car moving from the left to the right" and back
    checks = {i: get_benchmark("lvd")[i].check for i in (300, 305)}
    assert checks[300].direction == "left_to_right" and checks[305].direction == "right_to_left"
    left_to_right = [[([4 + 8 * k, 20, 20 + 8 * k, 36], 0.9, 0)] for k in range(6)]
    inject_detections(run, 300, tiny.identity, left_to_right)   # passes
    inject_detections(run, 305, tiny.identity, left_to_right)   # moves the wrong way: fails
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", *README_FLAGS, "--no-adherence",
                     "--skip_first_prompts", "300", "--num_prompts", "10", "--save-eval"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["tasks"] == {"dynamic_spatial": {"correct": 1, "total": 2}}
    assert saved["timing"]["detected_videos"] == 0
    verdicts = {v["index"]: v["success"] for v in saved["videos"] if not v["skipped"]}
    assert verdicts == {300: True, 305: False}
    assert "Eval success (dynamic_spatial): True" in capsys.readouterr().out


def test_bad_inputs_are_skipped_with_a_reason(tmp_path, tiny):
    run = write_run(tmp_path / "run0", [0])
    benchmark = get_benchmark("lvd")
    write_prompt_folder(run, 1, None, benchmark[1].prompt)                               # no video
    (write_prompt_folder(run, 2, None, benchmark[2].prompt) / "video_0.joblib").write_bytes(b"not joblib")
    write_prompt_folder(run, 3, draw_video(num_frames=4), benchmark[3].prompt)             # too short
    folder = write_prompt_folder(run, 4, draw_video(), benchmark[4].prompt)                # two repeats
    joblib.dump(draw_video(seed=9), folder / "video_1.joblib")
    write_prompt_folder(run, 5, draw_video().astype(np.float32), benchmark[5].prompt)      # not uint8
    write_prompt_folder(run, 6, draw_video(), benchmark[200].prompt)                       # another prompt
    items = collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=8))
    results, stats = evaluate_items(items, tiny, EvalConfig())
    reasons = {r.item.index: r.skipped for r in results}
    assert reasons[0] is None
    assert "no video_<k>.joblib or .mp4" in reasons[1]
    assert "could not read" in reasons[2]
    assert "4 frames" in reasons[3] and "at least 6" in reasons[3]
    assert "2 videos" in reasons[4] and "--all-repeats" in reasons[4]
    assert "uint8" in reasons[5]
    assert "was generated for" in reasons[6]
    assert "no folder" in reasons[7]
    assert not any(r.error for r in results)  # expected problems, not crashes
    summary = summarize_results(results, EvalConfig()).to_dict()
    assert summary["tasks"]["numeracy"]["total"] == 1
    assert {k: summary["skipped"][k] for k in ("total", "tasks")} == {"total": 7, "tasks": {"numeracy": 7}}
    both = collect_eval_items(run, "lvd", get_prompt_entries("lvd"),
                              RunSelection(skip_first_prompts=4, num_prompts=1, all_repeats=True))
    assert [i.video_path.name for i in both] == ["video_0.joblib", "video_1.joblib"]


def test_a_run_of_another_prompt_type_is_skipped(tmp_path, cli, capsys):
    run = write_run(tmp_path / "run0", [0, 1], prompt_type="lvd_visibility")
    args = ["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "2", "--save-eval"]
    assert cli.main(args + ["--prompt-type", "lvd"]) == 1  # nothing evaluated: not a success
    captured = capsys.readouterr()
    assert captured.out.count("'lvd_visibility', not 'lvd' (pass --prompt-type lvd_visibility") == 2
    assert f"error: nothing was evaluated in {run}: evaluated 0 videos; skipped 2: 2 run of another prompt type" \
        in captured.err
    saved = json.loads((run / "eval.json").read_text())
    assert saved["overall"] == {"correct": 0, "total": 0} and saved["skipped"]["total"] == 2


def test_a_reference_run_without_layouts_is_judged_without_adherence(tmp_path, tiny):
    run = write_run(tmp_path / "run0", [0], with_layout=False)
    (run / "config.json").unlink()
    results, _ = evaluate_items(collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1)),
                                tiny, EvalConfig())
    assert results[0].skipped is None and results[0].success is not None and results[0].adherence is None


def test_adherence_on_all_frames(tmp_path, tiny):
    run = write_run(tmp_path / "run0", [0])
    config = EvalConfig(adherence_all_frames=True)
    results, _ = evaluate_items(collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1)),
                                tiny, config, cache=CacheSettings(directory=str(tmp_path / "cache")))
    assert results[0].adherence_frame_indices == tuple(range(16)) and results[0].frame_indices == (0, 3, 6, 9, 12, 15)
    assert len(results[0].frame_boxes) == 6
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2


def test_runs_are_averaged(tmp_path, cli, capsys):
    runs = [write_run(tmp_path / f"run{k}", [0, 100]) for k in range(2)]
    average = tmp_path / "average.json"
    assert cli.main(["--runs", *map(str, runs), "--detector", "tiny", "--num_prompts", "101", "--save-eval",
                     "--average-json", str(average)]) == 0
    combined = json.loads(average.read_text())
    assert combined["overall"]["total"] == 4 and combined["runs"] == [str(r) for r in runs]
    assert set(combined["rates_mean"]["tasks"]) == {"numeracy", "attribution"}
    assert "Average over 2 runs" in capsys.readouterr().out
    averaged = load_script("average_runs")
    assert averaged.main([str(r) for r in runs]) == 0
    assert "run-mean %" in capsys.readouterr().out


def test_missing_detector_weights_exit_cleanly(tmp_path, cli, capsys):
    assert cli.main(["--run_base_path", str(tmp_path), "--detector-path", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_demo_prompts_get_adherence_only(tmp_path, tiny):
    from prompt import get_prompts

    run = tmp_path / "run0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"prompt_type": "demo"}))
    write_prompt_folder(run, 0, draw_video(num_frames=8, height=128, width=128), get_prompts("demo")[0])
    results, _ = evaluate_items(collect_eval_items(run, "demo", get_prompt_entries("demo")), tiny, EvalConfig())
    (result,) = results
    assert result.skipped is None and result.success is None and result.item.task == "demo"
    assert result.frame_indices == (0, 1, 3, 4, 6, 7) and result.adherence is not None
    summary = summarize_results(results, EvalConfig())
    assert summary.tasks == {} and summary.adherence.tasks["demo"].videos == 1


def test_a_detector_failure_costs_only_its_video(tmp_path, cli, monkeypatch, capsys):
    import utils.eval.evaluation as evaluation

    run = write_run(tmp_path / "run0", [0, 1])
    write_prompt_folder(run, 1, draw_video(height=48, width=64), get_benchmark("lvd")[1].prompt)
    real = evaluation.run_detector

    def flaky(detector, requests):  # fails on any batch holding the 48-pixel-high video
        if any(r.frames.shape[1] == 48 for r in requests):
            raise RuntimeError("simulated CUDA out of memory")
        return real(detector, requests)

    monkeypatch.setattr(evaluation, "run_detector", flaky)
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "2", "--save-eval"]) == 1
    saved = json.loads((run / "eval.json").read_text())
    assert saved["tasks"]["numeracy"]["total"] == 1 and saved["skipped"]["total"] == 1
    assert "simulated CUDA out of memory" in saved["videos"][1]["skipped"]
    failures = [json.loads(line) for line in (run / "eval_failures.jsonl").read_text().splitlines()]
    assert [f["index"] for f in failures] == [1] and "RuntimeError" in failures[0]["error"]
    assert failures[0]["stage"] == "detection" and "Traceback" in failures[0]["traceback"]  # utils.failures
    assert "1 unexpected failure(s)" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        cli.main(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "2", "--fail-fast",
                  "--no-detection-cache"])


def test_frames_too_small_to_judge_are_skipped_with_a_reason(tmp_path, tiny):
    # Issue 17, item 26: 1x1-pixel frames were scored without a word.
    run = write_run(tmp_path / "run0", [])
    write_prompt_folder(run, 0, draw_video(height=1, width=1), get_benchmark("lvd")[0].prompt)
    items = collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1))
    results, _ = evaluate_items(items, tiny, EvalConfig())
    assert "1x1 pixels are too small" in results[0].skipped and not results[0].error


def test_prompts_a_partial_run_never_generated_are_one_line(tmp_path, cli, capsys):
    # Issue 17, item 9: 6 of 500 generated printed 494 "SKIPPED ... no folder" blocks. The run's config.json
    # records the window generate.py was asked for ([0, 3) here); prompt 2 is in it but has no folder.
    run = write_run(tmp_path / "run0", [0, 1])
    config = json.loads((run / "config.json").read_text())
    config["invocations"] = [{"window": [0, 3], "args": {"regenerate": 1}}]
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--no-adherence"]) == 0
    out = capsys.readouterr().out
    assert out.count("SKIPPED") == 1 and "SKIPPED (numeracy): no folder" in out  # prompt 2: asked for, missing
    assert "evaluated 2 videos; skipped 498: 497 never generated, 1 no prompt folder" in out


def test_demo_prompts_without_a_benchmark_check_are_not_scored_rather_than_zero(tmp_path, cli, capsys):
    # Issue 17, item 10: "success: 0/0, rate: 0.00" and "Summary: 0.00" read as 0 %.
    run = tmp_path / "run0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"prompt_type": "demo"}))
    write_prompt_folder(run, 0, draw_video(), "A bear walks from the left to the right")
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "Overall: not scored" in out and "Summary: not scored" in out
    assert "0/0" not in out and "rate: 0.00" not in out
