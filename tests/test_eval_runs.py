"""Which videos of a run get evaluated (issue 12 item 3): the prompt type from the run's config.json,
upsampled copies that are not repeats, runs saved without joblib, and a non-zero exit with one summary
line when nothing was evaluated."""
from __future__ import annotations

import json

import joblib
import pytest

from eval_run_fixtures import draw_video, load_script, write_prompt_folder, write_run
from prompt import get_prompt_entries
from utils.eval.config import RunSelection
from utils.eval.runs import SKIP_NO_VIDEO, SKIP_REPEATS, collect_eval_items, list_prompt_videos


@pytest.fixture(scope="module")
def cli():
    return load_script("eval_owl_vit")


def _evaluated(run):
    saved = json.loads((run / "eval.json").read_text())
    return [v for v in saved["videos"] if not v["skipped"]], saved


def _upsampled_run(tmp_path):
    """Entry 0 with its generated video, a Zeroscope-XL copy, an SDXL copy of that, and the annotated GIF."""
    run = write_run(tmp_path / "run0", [0])
    folder = run / "0"
    joblib.dump(draw_video(height=72, width=128, seed=1), folder / "video_0_zsxl.joblib")
    joblib.dump(draw_video(height=72, width=128, seed=2), folder / "video_0_zsxl_sdxl_s0.1.joblib")
    (folder / "video_0_annotated.gif").write_bytes(b"GIF89a")
    return run


def test_listing_tells_repeats_from_upsampled_copies(tmp_path):
    run = _upsampled_run(tmp_path)
    joblib.dump(draw_video(seed=3), run / "0" / "video_1.joblib")
    videos = list_prompt_videos(run / "0")
    assert [(v.repeat, v.variant) for v in videos] == [("0", ""), ("0", "zsxl"), ("0", "zsxl_sdxl_s0.1"), ("1", "")]
    (item,) = collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1))
    assert item.skip.kind == SKIP_REPEATS and "2 videos" in item.skip.message
    assert "upsampled copies (zsxl, zsxl_sdxl_s0.1) are not counted" in item.skip.message


def test_upsampled_videos_are_not_repeats_and_can_be_selected(tmp_path, cli, capsys):
    run = _upsampled_run(tmp_path)
    args = ["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "1", "--save-eval"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "not repeats" in out and "--video-variant zsxl" in out
    (video,), _ = _evaluated(run)
    assert video["video"].endswith("/0/video_0.joblib") and (video["height"], video["width"]) == (64, 64)

    assert cli.main(args + ["--video-variant", "zsxl"]) == 0
    (video,), saved = _evaluated(run)
    assert video["video"].endswith("/0/video_0_zsxl.joblib") and (video["height"], video["width"]) == (72, 128)
    assert saved["config"]["video_variant"] == "zsxl"


def test_a_missing_variant_says_what_the_folder_holds(tmp_path):
    run = _upsampled_run(tmp_path)
    (item,) = collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1), variant="sdxl")
    assert item.skip.kind == SKIP_NO_VIDEO
    assert "no video_<k>_sdxl.joblib or .mp4" in item.skip.message
    assert "it holds video_<k>, video_<k>_zsxl, video_<k>_zsxl_sdxl_s0.1" in item.skip.message


def test_a_run_saved_as_gif_and_mp4_is_evaluated_from_the_mp4(tmp_path, cli):
    run = write_run(tmp_path / "run0", [0, 100], formats=("gif", "mp4"))
    assert not list(run.rglob("*.joblib"))
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "101", "--save-eval"]) == 0
    evaluated, _ = _evaluated(run)
    assert [v["video"].rsplit("/", 1)[1] for v in evaluated] == ["video_0.mp4", "video_0.mp4"]
    assert [v["frame_indices"] for v in evaluated] == [[0, 3, 6, 9, 12, 15]] * 2


def test_a_gif_only_run_says_what_is_missing_and_fails(tmp_path, cli, capsys):
    run = write_run(tmp_path / "run0", [0], formats=("gif",))
    args = ["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "1"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"nothing was evaluated in {run}: evaluated 0 videos; skipped 1: 1 no video file" in line
    assert "found only video_0.gif" in line and "add gif to --video-formats" in line
    assert cli.main(args + ["--video-formats", "joblib", "mp4", "gif"]) == 0


def test_the_prompt_type_comes_from_the_run_config(tmp_path, cli, capsys):
    run = write_run(tmp_path / "run0", [0, 1], prompt_type="lvd_visibility")
    assert cli.main(["--run_base_path", str(run), "--detector", "tiny", "--num_prompts", "2", "--save-eval"]) == 0
    assert f"prompt type lvd_visibility ({run / 'config.json'})" in capsys.readouterr().out
    evaluated, saved = _evaluated(run)
    assert len(evaluated) == 2 and list(saved["tasks"]) == ["visibility"]
    assert saved["config"]["prompt_type"] == "lvd_visibility"


def test_runs_of_different_prompt_types_each_use_their_own(tmp_path, cli, capsys):
    runs = [write_run(tmp_path / "a", [0], prompt_type="lvd_visibility"),
            write_run(tmp_path / "b", [0], prompt_type="lvd_sequential")]
    args = ["--runs", *map(str, runs), "--detector", "tiny", "--num_prompts", "1", "--save-eval"]
    assert cli.main(args) == 1  # evaluated, but not averaged: the prompt types differ
    err = capsys.readouterr().err
    assert f"prompt_type ({runs[0]}: lvd_visibility, {runs[1]}: lvd_sequential)" in err and "not averaged" in err
    assert [list(json.loads((r / "eval.json").read_text())["tasks"]) for r in runs] == [["visibility"], ["sequential"]]
    assert cli.main(args + ["--allow-mixed"]) == 0


def test_an_empty_run_directory_fails_with_one_line(tmp_path, cli, capsys):
    (tmp_path / "run0").mkdir()
    assert cli.main(["--run_base_path", str(tmp_path / "run0"), "--detector", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "nothing was evaluated" in err and "500 no prompt folder" in err and "Traceback" not in err


def test_an_upsampled_folder_written_by_upsample_py_is_one_video(tmp_path):
    """What generation/upsampling.upsampled_video_stem names the outputs: never a repeat."""
    from generation.upsampling import SDXL, ZEROSCOPE_XL, upsampled_video_stem

    run = write_run(tmp_path / "run0", [0])
    video = run / "0" / "video_0.joblib"
    for upsampler, strength in ((ZEROSCOPE_XL, 0.35), (SDXL, 0.5)):
        stem = upsampled_video_stem(video, upsampler, strength)
        write_prompt_folder(run, 0, draw_video(seed=5), None, video_name=stem.name + ".joblib")
    (item,) = collect_eval_items(run, "lvd", get_prompt_entries("lvd"), RunSelection(num_prompts=1))
    assert item.skip is None and item.video_path == video and item.other_variants == ("sdxl_s0.5", "zsxl")
