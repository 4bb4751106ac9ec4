"""Command-line manners of the eval scripts (issue 12 items 9, 15, 18, 6): numeric flags checked at parse
time, unusable output paths in one line, a corrupt detection cache recomputed, a closed pipe and Ctrl-C,
and the missing-weights hint naming --detector-path."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from eval_run_fixtures import REPO, load_script, write_run
from utils.eval.config import CACHE_DIR_NAME


@pytest.fixture(scope="module")
def cli():
    return load_script("eval_owl_vit")


@pytest.mark.parametrize("flag, value, expected", [
    ("--detection_score_threshold", "1.5", "must be a finite number in [0, 1], found 1.5"),
    ("--detection_score_threshold", "nan", "must be a finite number in [0, 1], found nan"),
    ("--nms_threshold", "-0.1", "must be a finite number in [0, 1], found -0.1"),
    ("--num_eval_frames", "0", "must be an integer >= 1, found 0"),
    ("--num_prompts", "0", "must be an integer >= 1, found 0"),
    ("--skip_first_prompts", "-1", "must be an integer >= 0, found -1"),
    ("--run_start_ind", "-3", "must be an integer >= 0, found -3"),
    ("--batch-size", "0", "must be an integer >= 1, found 0"),
    ("--video-batch", "two", "must be an integer, found 'two'"),
    ("--report-max-videos", "-1", "must be an integer >= 0, found -1"),
])
def test_numeric_flags_are_checked_at_parse_time(tmp_path, cli, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--run_base_path", str(tmp_path), "--detector", "tiny", flag, value])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--report", "--average-json", "--save-eval-path", "--failures-file"])
def test_an_unusable_output_path_is_one_line_before_any_work(tmp_path, cli, capsys, flag):
    run = write_run(tmp_path / "run0", [0])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "out" if flag == "--report" else blocker / "out.json"
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "1", "--save-eval",
                     flag, str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {flag} {target.parent if flag != '--report' else target}: " \
                                   f"{blocker} is a file, not a folder"
    assert "Detector:" not in captured.out and not (run / "eval.json").exists()


def test_a_corrupt_detection_cache_is_named_and_recomputed(tmp_path, cli, caplog, capsys):
    run = write_run(tmp_path / "run0", [0])
    args = ["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "1", "--save-eval"]
    assert cli.main(args) == 0
    cache_files = sorted((run / "0" / CACHE_DIR_NAME).glob("*.npz"))
    assert len(cache_files) == 2
    for path in cache_files:  # cut short, as by a full disk: still starts like a zip file
        path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        assert cli.main(args) == 0
    captured = capsys.readouterr()
    saved = json.loads((run / "eval.json").read_text())
    (video,) = [v for v in saved["videos"] if not v["skipped"]]
    assert video["success"] is not None and not video["from_cache"]
    assert saved["timing"]["detected_videos"] == 1
    warnings = [r.getMessage() for r in caplog.records if "detection cache" in r.getMessage()]
    assert len(warnings) == 2 and all("unreadable (BadZipFile" in w and "recomputing it" in w for w in warnings)
    assert {w.split()[2] for w in warnings} == {str(p) for p in cache_files}
    assert "Traceback" not in captured.err and "reading the video failed" not in captured.out
    assert not (run / "eval_failures.jsonl").exists()
    assert cli.main(args) == 0  # rewritten: read back from the cache now
    assert json.loads((run / "eval.json").read_text())["timing"]["cached_videos"] == 1


def _closed_pipe_run(args, timeout=240):
    """Run a script with stdout on a pipe whose reader is already gone (like ``| head`` after it exits)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, *args], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    finally:
        os.close(write_end)


@pytest.mark.slow
def test_average_runs_exits_quietly_on_a_closed_pipe(tmp_path):
    from test_eval_summary import OLD_EVAL

    path = tmp_path / "eval.json"
    path.write_text(json.dumps(OLD_EVAL))
    result = _closed_pipe_run(["scripts/average_runs.py", str(path), str(path)])
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.slow
def test_eval_owl_vit_exits_quietly_on_a_closed_pipe(tmp_path):
    run = write_run(tmp_path / "run0", [0])
    result = _closed_pipe_run(["scripts/eval_owl_vit.py", "--run_base_path", str(run), "--detector", "tiny",
                               "--num_prompts", "1", "--no-detection-cache"])
    assert result.returncode == 0
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_is_one_line(tmp_path, cli, monkeypatch, capsys):
    run = write_run(tmp_path / "run0", [0])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate_run", interrupted)
    assert cli.run(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted; detections computed so far are cached: rerun the same command to continue"
    assert not any("Traceback" in line for line in err)


def test_missing_detector_weights_name_the_detector_flag(tmp_path, cli, capsys):
    assert cli.main(["--run_base_path", str(tmp_path), "--detector-path", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--detector-path DIR" in err and "--model-path" not in err
    from models.hub import MissingWeightsError, resolve_model_folder

    with pytest.raises(MissingWeightsError, match="--model-path DIR"):  # the default for the other loaders
        resolve_model_folder("org/model", model_path=tmp_path / "none")
