"""generate.py end to end on the tiny model: outputs, resume, shards, failures, multi-process, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pytest

import generate
from prompt import get_prompts
from utils.cache import cache_path, serialize_cache

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num_inference_steps", "3", "--num_frames", "4", "--max_index_step", "2"]


def _reply(name: str, step_px: int) -> str:
    frames = "\n".join(f"Frame {k + 1}: [{{'id': 0, 'name': '{name}', 'box': [{20 + step_px * k}, 200, 100, 90]}}]"
                       for k in range(6))
    return f"Reasoning: composed for tests.\n\n{frames}\nBackground keyword: street"


@pytest.fixture()
def lvd_cache(tmp_path) -> Path:
    """A cache for the first 8 LVD prompts, each occurrence with its own motion (detects wrong occurrences)."""
    entries: dict[str, list[str]] = {}
    for prompt in get_prompts("lvd")[:8]:
        replies = entries.setdefault(prompt, [])
        replies.append(_reply("moving car" if "car" in prompt else "lively cat", 20 + 10 * len(replies)))
    cache_dir = tmp_path / "cache"
    path = cache_path("lvd", "v0.1", "test-llm", cache_dir=cache_dir)
    path.parent.mkdir(parents=True)
    path.write_text(serialize_cache(entries))
    return cache_dir


def _run(tmp_path, *extra, cache_dir=None, out="out") -> int:
    args = ["--run-model", "lvd_tiny", "--template_version", "v0.1", "--output-dir", str(tmp_path / out), *FAST]
    if cache_dir is not None:
        args += ["--prompt-type", "lvd", "--model", "test-llm", "--cache-dir", str(cache_dir)]
    return generate.main(args + list(extra))


def _run_dir(tmp_path, out="out", run="run0", name="imgs_lvd_templatev0.1_test-llm_lvd_tiny") -> Path:
    return tmp_path / out / name / run


def test_demo_writes_video_files_and_config(tmp_path):
    code = generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--output-dir", str(tmp_path), *FAST])
    assert code == 0
    run_dir = tmp_path / "imgs_demo_templatev0.1_handwritten_lvd_tiny" / "run0"
    prompt_dir = run_dir / "0"
    for name in ("video_0.gif", "video_0.joblib", "video_0_annotated.gif", "video_0.json", "layout.json"):
        assert (prompt_dir / name).is_file(), name
    frames = joblib.load(prompt_dir / "video_0.joblib")
    assert frames.shape == (4, 128, 128, 3) and frames.dtype == np.uint8
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sampling"]["num_inference_steps"] == 3 and config["guidance"]["max_index_step"] == 2
    meta = json.loads((prompt_dir / "video_0.json").read_text())
    assert meta["seed"] == 0 and meta["guided_iterations"] == len(meta["guidance_log"]) >= 1
    layout = json.loads((prompt_dir / "layout.json").read_text())
    assert layout["diffusion_prompt"].endswith(", forest background") and layout["phrases"] == ["bear"]


def test_resume_redoes_only_unfinished_videos(tmp_path, lvd_cache):
    assert _run(tmp_path, "--num_prompts", "2", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    run_dir = _run_dir(tmp_path)
    first = {p: (run_dir / p / "video_0.joblib").stat().st_mtime_ns for p in ("0", "1")}
    (run_dir / "1" / "video_0.joblib").unlink()
    # A half-written file from an interrupted run is a hidden temp file: it never counts as finished.
    (run_dir / "1" / ".video_0.abc.tmp.joblib").write_bytes(b"partial")
    assert _run(tmp_path, "--num_prompts", "2", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    assert (run_dir / "0" / "video_0.joblib").stat().st_mtime_ns == first["0"]  # untouched
    assert (run_dir / "1" / "video_0.joblib").is_file()
    assert not list((run_dir / "1").glob(".*.tmp*"))  # the interrupted write's leftover is cleaned up


def test_resume_without_joblib_counts_finished_videos(tmp_path, lvd_cache, capsys):
    formats = ["--save-formats", "mp4", "--num_prompts", "2", "--force_run_ind", "0"]
    assert _run(tmp_path, *formats, cache_dir=lvd_cache) == 0
    assert (_run_dir(tmp_path) / "1" / "video_0.mp4").is_file()
    assert not (_run_dir(tmp_path) / "1" / "video_0.joblib").exists()
    capsys.readouterr()
    assert _run(tmp_path, *formats, cache_dir=lvd_cache) == 0
    assert "videos: 0, already done: 2" in capsys.readouterr().out


@pytest.mark.slow  # an equivalence test over several runs: CI's slow pass (the default suite stays < 3 min)
def test_config_keeps_one_record_per_shard(tmp_path, lvd_cache):
    assert _run(tmp_path, "--num_prompts", "2", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    assert _run(tmp_path, "--skip_first_prompts", "2", "--num_prompts", "1", "--force_run_ind", "0",
                cache_dir=lvd_cache) == 0
    config = json.loads((_run_dir(tmp_path) / "config.json").read_text())
    assert config["prompt_type"] == "lvd" and config["sampling"]["num_frames"] == 4
    records = config["invocations"]
    assert [r["window"] for r in records] == [[0, 2], [2, 3]]
    cache_file = next(lvd_cache.iterdir())
    for record in records:
        assert record["rank"] == 0 and record["host"] and record["time"] and "git_commit" in record
        assert record["layout_cache"]["path"] == str(cache_file) and len(record["layout_cache"]["sha256"]) == 64
        assert record["changed_settings"] == []
    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", "--repeats", "2", "--fg_top_p", "0.5",
                "--allow-mixed-settings", cache_dir=lvd_cache) == 0
    config = json.loads((_run_dir(tmp_path) / "config.json").read_text())
    assert config["guidance"]["fg_top_p"] == 0.75  # the run's first settings stay at the top ...
    assert config["invocations"][-1]["changed_settings"] == ["guidance"]  # ... a change is recorded
    assert config["invocations"][-1]["settings"]["guidance"]["fg_top_p"] == 0.5


def test_a_failed_model_load_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for _ in range(2):
        assert generate.main(["--run-model", "lvd_zeroscope", "--prompt-type", "demo", "--model", "handwritten",
                              "--template_version", "v0.1", "--output-dir", str(tmp_path / "out")]) == 2
    assert "cerspense/zeroscope_v2_576w" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*/run*"))  # the next real run is run0


@pytest.mark.parametrize("flag, value", [
    ("--num_inference_steps", "0"), ("--skip_first_prompts", "-5"), ("--num_prompts", "-1"), ("--num_prompts", "0"),
    ("--fg_top_p", "2.0"), ("--loss_scale", "nan"), ("--loss_scale", "inf"), ("--max_iter", "-1"),
    ("--force_run_ind", "-1"), ("--repeats", "0"), ("--batch-size", "0"), ("--bg_top_p", "0"),
    ("--use_ratio_based_loss", "2"), ("--num_frames", "x"),
])
def test_nonsense_numbers_are_rejected_naming_the_flag(tmp_path, capsys, flag, value):
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--output-dir", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_an_unusable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--output-dir", str(blocker / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "is a file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"A prompt": "not a list"}', "\x00\xff\xfe"])
def test_a_broken_cache_file_is_one_line_naming_it(tmp_path, capsys, content):
    path = cache_path("demo", "v0.1", "broken", cache_dir=tmp_path / "cache")
    path.parent.mkdir()
    path.write_bytes(content.encode("latin-1"))
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "broken",
                          "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_a_missing_cache_file_is_one_line_naming_it_and_the_flag(tmp_path, capsys):
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "lvd", "--model", "gpt-4-1106-preview",
                          "--cache-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cache_lvd_v0.1_gpt-4-1106-preview.json" in err
    assert "--cache-dir" in err and "published" in err


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path, lvd_cache):
    command = (f"{sys.executable} generate.py --run-model lvd_tiny --prompt-type lvd --model test-llm "
               f"--cache-dir {lvd_cache} --dry-run | head -1")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("[0] ") and len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_hint(tmp_path, lvd_cache):
    import signal

    command = [sys.executable, "generate.py", "--run-model", "lvd_tiny", "--prompt-type", "lvd", "--model", "test-llm",
               "--cache-dir", str(lvd_cache), "--output-dir", str(tmp_path), "--num_frames", "4", "--force_run_ind", "3"]
    # A shell's background job ignores SIGINT and children inherit that: give the CLI the default handler back.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/run3/0/layout.json")):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--force_run_ind 3" in err


@pytest.mark.slow  # an equivalence test over several runs: CI's slow pass (the default suite stays < 3 min)
def test_shards_equal_a_full_run(tmp_path, lvd_cache):
    assert _run(tmp_path, "--num_prompts", "6", "--force_run_ind", "0", cache_dir=lvd_cache, out="full") == 0
    assert _run(tmp_path, "--num_prompts", "3", "--force_run_ind", "0", cache_dir=lvd_cache, out="shards") == 0
    assert _run(tmp_path, "--skip_first_prompts", "3", "--num_prompts", "3", "--force_run_ind", "0",
                cache_dir=lvd_cache, out="shards") == 0
    full, shards = _run_dir(tmp_path, "full"), _run_dir(tmp_path, "shards")
    assert sorted(p.name for p in full.iterdir() if p.is_dir()) == [str(i) for i in range(6)]
    for index in range(6):
        a = json.loads((full / str(index) / "layout.json").read_text())
        b = json.loads((shards / str(index) / "layout.json").read_text())
        assert a["occurrence"] == b["occurrence"] == [0, 1, 2, 3, 4, 0][index]
        assert a["layout"] == b["layout"]
        np.testing.assert_array_equal(joblib.load(full / str(index) / "video_0.joblib"),
                                      joblib.load(shards / str(index) / "video_0.joblib"))


def test_bad_layout_is_logged_and_the_batch_goes_on(tmp_path, lvd_cache):
    path = next(lvd_cache.iterdir())
    entries = json.loads(path.read_text())
    first_prompt = next(iter(entries))
    entries[first_prompt][1] = "Reasoning: broken\n\nFrame 1: [{'id': 0, 'name': 'car', 'box': [1, 2]}]"
    path.write_text(serialize_cache(entries))
    assert _run(tmp_path, "--num_prompts", "3", cache_dir=lvd_cache) == 1
    run_dir = _run_dir(tmp_path)
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [f["prompt_index"] for f in failures] == [1]
    assert "LayoutParseError" in failures[0]["error"] and "Traceback" in failures[0]["traceback"]
    assert (run_dir / "0" / "video_0.joblib").is_file() and (run_dir / "2" / "video_0.joblib").is_file()


def test_fail_fast_stops_at_the_first_failure(tmp_path, lvd_cache, capsys):
    path = next(lvd_cache.iterdir())
    entries = json.loads(path.read_text())
    entries[next(iter(entries))][0] = "not a layout"
    path.write_text(serialize_cache(entries))
    assert _run(tmp_path, "--num_prompts", "2", "--fail-fast", cache_dir=lvd_cache) == 1
    assert not (_run_dir(tmp_path) / "1" / "video_0.joblib").exists()
    failures = [json.loads(line) for line in (_run_dir(tmp_path) / "failures.jsonl").read_text().splitlines()]
    assert [f["prompt_index"] for f in failures] == [0] and "Traceback" in failures[0]["traceback"]
    out = capsys.readouterr().out
    assert "[0]" in out and "LayoutParseError" in out and "failures.jsonl" in out


def test_repeats_and_seed_offset_follow_the_seed_rule(tmp_path, lvd_cache):
    assert _run(tmp_path, "--skip_first_prompts", "5", "--num_prompts", "1", "--repeats", "2", "--seed_offset", "500",
                cache_dir=lvd_cache) == 0
    prompt_dir = _run_dir(tmp_path) / "5"
    seeds = [json.loads((prompt_dir / f"video_{r}.json").read_text())["seed"] for r in range(2)]
    assert seeds == [5 + 500, 5 + 6789 + 500]


def test_dry_run_parses_layouts_without_a_model(tmp_path, lvd_cache, capsys):
    assert _run(tmp_path, "--num_prompts", "2", "--dry-run", cache_dir=lvd_cache) == 0
    out = capsys.readouterr().out
    assert "[0] A realistic lively video of a scene with one moving car, street background" in out
    assert not (tmp_path / "out").exists()


def test_baseline_rejects_guidance_overrides(tmp_path, capsys):
    code = generate.main(["--run-model", "baseline_tiny", "--template_version", "v0.1", "--loss_scale", "3",
                          "--output-dir", str(tmp_path)])
    assert code == 2 and "--loss_scale" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_weights_fail_fast_with_the_model_id(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "generate.py", "--run-model", "lvd_zeroscope", "--prompt-type", "demo",
                             "--model", "handwritten", "--template_version", "v0.1", "--output-dir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert "cerspense/zeroscope_v2_576w" in result.stderr and "--model-path" in result.stderr
    assert elapsed < 30  # the import of torch/diffusers dominates; the check itself is immediate


@pytest.mark.slow
def test_accelerate_two_processes_cover_every_prompt_once(tmp_path, lvd_cache):
    out = tmp_path / "multi"
    # accelerate's --cpu launcher starts a single process unless MPI is configured; its multi-process
    # launcher (torchrun underneath) starts two, which join a CPU (gloo) group when there is no GPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "generate.py",
               "--run-model", "lvd_tiny", "--prompt-type", "lvd", "--model", "test-llm", "--template_version", "v0.1",
               "--cache-dir", str(lvd_cache), "--output-dir", str(out), "--num_prompts", "6", *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "imgs_lvd_templatev0.1_test-llm_lvd_tiny" / "run0"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [str(i) for i in range(6)]
    assert not (out / "imgs_lvd_templatev0.1_test-llm_lvd_tiny" / "run1").exists()
    seeds = [json.loads((run_dir / str(i) / "video_0.json").read_text())["seed"] for i in range(6)]
    assert seeds == list(range(6))  # the single-process seeds: prompt index + offset
    # Both processes worked, three prompts each (interleaved shares).
    assert "(rank 0): videos: 3," in result.stdout and "(rank 1): videos: 3," in result.stdout, result.stdout


@pytest.mark.slow  # an equivalence test over several runs: CI's slow pass (the default suite stays < 3 min)
def test_batch_size_gives_the_batch_one_videos(tmp_path, lvd_cache):
    assert _run(tmp_path, "--num_prompts", "3", "--force_run_ind", "0", cache_dir=lvd_cache, out="one") == 0
    assert _run(tmp_path, "--num_prompts", "3", "--force_run_ind", "0", "--batch-size", "2", cache_dir=lvd_cache,
                out="two") == 0
    for index in range(3):
        one = joblib.load(_run_dir(tmp_path, "one") / str(index) / "video_0.joblib").astype(int)
        two = joblib.load(_run_dir(tmp_path, "two") / str(index) / "video_0.joblib").astype(int)
        # uint8 frames after float32 batched kernels: at most an off-by-one at a few pixels
        assert np.abs(one - two).max() <= 1 and (one != two).mean() < 0.01


def test_free_text_prompts_have_a_prompt_type_of_their_own(tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# two prompts\nA red car drives along a road\n\nA dog runs to the left.\n")
    for flags in (["--prompts", "A red car drives along a road", "A dog runs to the left"],
                  ["--prompts-file", str(prompts_file)]):
        assert generate.main(["--run-model", "baseline_tiny", *flags, "--output-dir", str(tmp_path / "out"),
                              "--dry-run"]) == 0
        assert capsys.readouterr().out.splitlines() == ["[0] A red car drives along a road",
                                                         "[1] A dog runs to the left"]
    assert generate.main(["--run-model", "baseline_tiny", "--prompts", "A red car", "--output-dir",
                          str(tmp_path / "out"), "--num_inference_steps", "2", "--num_frames", "4"]) == 0
    assert (tmp_path / "out" / "imgs_custom_templatev0.1_baseline_tiny" / "run0" / "0" / "video_0.joblib").is_file()
    # LVD on free text reads cache_custom_<version>_<model>.json; its absence is one line naming it.
    assert generate.main(["--run-model", "lvd_tiny", "--prompts", "A red car", "--model", "my-llm",
                          "--cache-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "cache_custom_v0.1_my-llm.json" in capsys.readouterr().err


@pytest.mark.slow  # an equivalence test over several runs: CI's slow pass (the default suite stays < 3 min)
def test_a_layout_file_generates_the_same_video_as_its_cache_reply(tmp_path, lvd_cache):
    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    layout_file = _run_dir(tmp_path) / "0" / "layout.json"
    assert generate.main(["--run-model", "lvd_tiny", "--layout-file", str(layout_file), "--output-dir",
                          str(tmp_path / "from_file"), *FAST]) == 0
    from_file = tmp_path / "from_file" / "imgs_custom_templatev0.1_lvd_tiny" / "run0" / "0"
    np.testing.assert_array_equal(joblib.load(from_file / "video_0.joblib"),
                                  joblib.load(_run_dir(tmp_path) / "0" / "video_0.joblib"))
    config = json.loads((from_file.parent / "config.json").read_text())
    assert config["prompt_type"] == "custom" and config["invocations"][0]["layout_files"][0]["path"] == str(layout_file)


def test_a_bad_layout_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "layout.json"
    bad.write_text('{"layout": {"prompt": "A cat", "objects": "nope"}}')
    assert generate.main(["--run-model", "lvd_tiny", "--layout-file", str(bad), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert generate.main(["--run-model", "lvd_tiny", "--layout-file", str(bad), "--model", "x",
                          "--output-dir", str(tmp_path)]) == 2
    assert "drop --model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Layouts whose phrases do not fit in CLIP's 77 tokens (issue 17, items 12 and 19)

TOYS = [f"a very big {animal} toy" for animal in ("cat dog horse cow sheep goat pig duck goose chicken fox wolf bear "
                                                  "deer rabbit mouse rat owl eagle hawk").split()]


def _toys_layout():
    from utils.layout import build_layout_from_frames

    frames = [[{"id": i, "name": name, "box": [20 * i, 10, 50, 50]} for i, name in enumerate(TOYS)] for _ in range(6)]
    return build_layout_from_frames(frames, prompt="A zoo scene with many animals", background="grassy field")


def test_dry_run_rejects_phrases_past_the_token_limit_from_a_cache_and_a_file(tmp_path, capsys):
    from utils.layout import format_layout_text, layout_to_json

    layout = _toys_layout()
    cache_dir = tmp_path / "cache"
    path = cache_path("custom", "v0.1", "test-llm", cache_dir=cache_dir)
    path.parent.mkdir(parents=True)
    path.write_text(serialize_cache({layout.prompt: [format_layout_text(layout)]}))
    assert generate.main(["--run-model", "lvd_tiny", "--prompts", layout.prompt, "--model", "test-llm",
                          "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 1
    assert "object 11 ('a very big wolf toy')" in capsys.readouterr().out
    layout_file = tmp_path / "toys.json"
    layout_file.write_text(layout_to_json(layout))
    assert generate.main(["--run-model", "lvd_tiny", "--layout-file", str(layout_file), "--output-dir",
                          str(tmp_path / "out"), "--dry-run"]) == 1
    assert "object 11 ('a very big wolf toy')" in capsys.readouterr().out


def test_a_run_rejects_phrases_past_the_token_limit_without_a_video(tmp_path, capsys):
    from utils.layout import layout_to_json

    layout_file = tmp_path / "toys.json"
    layout_file.write_text(layout_to_json(_toys_layout()))
    assert generate.main(["--run-model", "lvd_tiny", "--layout-file", str(layout_file), "--output-dir",
                          str(tmp_path / "out"), *FAST]) == 1
    run_dir = tmp_path / "out" / "imgs_custom_templatev0.1_lvd_tiny" / "run0"
    assert not list(run_dir.glob("*/video_0.joblib"))
    assert "object 11 ('a very big wolf toy')" in (run_dir / "failures.jsonl").read_text()


# --------------------------------------------------------------------------------------------
# Nonsense accepted, mixed runs (issue 17, item 26)

@pytest.mark.parametrize("extra", [["--num_frames", "1"], ["--num_frames", "10000", "--dry-run"]])
def test_frame_counts_no_video_model_takes_are_one_line(tmp_path, capsys, extra):
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--output-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "num_frames" in err
    assert not list(tmp_path.iterdir())


def test_resuming_a_run_with_other_sampling_settings_is_refused(tmp_path, lvd_cache, capsys):
    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    run_dir = _run_dir(tmp_path)
    before = (run_dir / "config.json").read_text()
    assert _run(tmp_path, "--num_prompts", "2", "--force_run_ind", "0", "--num_inference_steps", "2",
                cache_dir=lvd_cache) == 2
    err = capsys.readouterr().err
    assert "num_inference_steps 3 -> 2" in err and "--allow-mixed-settings" in err
    assert not (run_dir / "1").exists() and (run_dir / "config.json").read_text() == before


def test_a_run_recorded_before_the_cfg_fields_resumes_and_a_changed_variant_is_refused(tmp_path, lvd_cache, capsys):
    """Runs made before `SamplingConfig` had its CFG fields resume as the standard CFG they were made with."""
    import json

    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    run_dir = _run_dir(tmp_path)
    record = json.loads((run_dir / "config.json").read_text())
    for name in ("cfg_variant", "guidance_rescale"):
        del record["sampling"][name]
    (run_dir / "config.json").write_text(json.dumps(record))
    assert _run(tmp_path, "--num_prompts", "2", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    assert (run_dir / "1").is_dir()
    capsys.readouterr()
    assert _run(tmp_path, "--num_prompts", "3", "--force_run_ind", "0", "--cfg", "zero-star", cache_dir=lvd_cache) == 2
    assert "cfg_variant 'standard' -> 'zero-star'" in capsys.readouterr().err and not (run_dir / "2").exists()


def test_a_resume_removes_stale_run_root_temp_files_and_leaves_no_lock_file(tmp_path, lvd_cache):
    # Issue 17, items 14 and 24: kill -9 on the first config.json write left run0/.config.<random>.tmp.json.
    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    run_dir = _run_dir(tmp_path)
    assert not (run_dir / ".config.json.lock").exists()
    (run_dir / ".config.k1ll3d.tmp.json").write_text('{"half": ')
    assert _run(tmp_path, "--num_prompts", "1", "--force_run_ind", "0", cache_dir=lvd_cache) == 0
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_settings_that_make_guidance_impossible_warn_once(tmp_path, capsys):
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--loss_scale", "1e308", "--dry-run"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "guidance is off" in warnings[0] and "loss_scale" in warnings[0]


def test_a_missing_demo_cache_names_the_published_one_or_the_shipped_one(tmp_path, capsys):
    # Issue 17, item 5: the README's stage-2 examples read cache_demo_v0.1_gpt-4-1106-preview.json.
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "gpt-4-1106-preview",
                          "--template_version", "v0.1", "--cache-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cache_demo_v0.1_gpt-4-1106-preview.json is one of the authors' published caches" in err
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "my-llm",
                          "--template_version", "v0.1", "--cache-dir", str(tmp_path), "--dry-run"]) == 2
    assert "shipped demo cache is cache/cache_demo_v0.1_handwritten.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One command from text to video (issue 17, item 18)

def test_auto_query_plans_missing_layouts_saves_them_and_generates(tmp_path, capsys):
    from openai_server import FakeOpenAIServer

    cache_dir = tmp_path / "cache"
    with FakeOpenAIServer() as server:
        argv = ["--run-model", "lvd_tiny", "--prompts", "A cat walks to the right", "--model", "test-llm",
                "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path / "out"), "--auto-query",
                "--llm-base-url", server.base_url, "--llm-max-retries", "0", *FAST]
        assert generate.main(argv) == 0
        assert server.captions() == ["A cat walks to the right"]
        assert generate.main(argv + ["--force_run_ind", "0"]) == 0  # cached now: no second request
        assert server.request_count == 1
    entries = json.loads(cache_path("custom", "v0.1", "test-llm", cache_dir=cache_dir).read_text())
    assert list(entries) == ["A cat walks to the right"] and len(entries["A cat walks to the right"]) == 1
    run_dir = tmp_path / "out" / "imgs_custom_templatev0.1_test-llm_lvd_tiny" / "run0"
    assert (run_dir / "0" / "video_0.joblib").is_file()
    assert "1 new layout(s) saved" in capsys.readouterr().err


def test_auto_query_stops_in_one_line_when_the_endpoint_is_unusable(tmp_path, capsys):
    from openai_server import Fail, FakeOpenAIServer

    with FakeOpenAIServer() as server:
        server.default = Fail(404, "no such model")
        assert generate.main(["--run-model", "lvd_tiny", "--prompts", "A", "B", "C", "--model", "test-llm",
                              "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
                              "--auto-query", "--llm-base-url", server.base_url, *FAST]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 prompt(s) in a row failed" in errors[0] and "rerun the same command" in errors[0]
    assert not (tmp_path / "out").exists()


def test_threads_flag_sets_and_records_the_torch_thread_count(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--output-dir", str(tmp_path), *FAST]) == 0
    assert torch.get_num_threads() == 1  # tiny run-models: one thread
    config = json.loads((tmp_path / "imgs_demo_templatev0.1_handwritten_lvd_tiny" / "run0" / "config.json").read_text())
    assert config["invocations"][0]["torch_threads"] == 1
    assert generate.main(["--run-model", "lvd_tiny", "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--output-dir", str(tmp_path), "--threads", "2",
                          "--dry-run"]) == 0
    assert generate.main(["--run-model", "lvd_tiny", "--template_version", "v0.1", "--threads", "0"]) == 2
