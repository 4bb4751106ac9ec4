"""The Wan run-models from the command line and the Wan scripts, on the tiny random-weight Wan: generate.py end to
end (gif, joblib, mp4, layout.json, config.json, the guidance log), Wan flags, missing weights, the calibration tool,
the meta-device cost count and the GPU benchmark command's CPU dry run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

import generate

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--prompt-type", "demo", "--model", "handwritten", "--template_version", "v0.1"]
FAST = ["--num_inference_steps", "6"]
RUN_NAME = "imgs_demo_templatev0.1_handwritten_{}"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)   # tiny models: per-operator overhead; conftest restores the thread count


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lvd_wan_tiny_writes_videos_layout_config_and_guidance_log(tmp_path):
    code = generate.main(["--run-model", "lvd_wan_tiny", *DEMO, "--output-dir", str(tmp_path), *FAST])
    assert code == 0
    run_dir = tmp_path / RUN_NAME.format("lvd_wan_tiny") / "run0"
    prompt_dir = run_dir / "0"
    for name in ("video_0.gif", "video_0.joblib", "video_0.mp4", "video_0_annotated.gif", "video_0.json",
                 "layout.json"):
        assert (prompt_dir / name).is_file(), name
    frames = joblib.load(prompt_dir / "video_0.joblib")
    assert frames.dtype == np.uint8 and frames.shape == (17, 64, 96, 3)     # 17 frames, 64x96
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(prompt_dir / "video_0.mp4"))
    meta = next(reader)
    assert meta["fps"] == 16 and meta["size"] == (96, 64)
    reader.close()
    video = json.loads((prompt_dir / "video_0.json").read_text())
    assert video["guided_iterations"] >= 1 and video["guidance_log"][0]["step"] == 0
    assert video["prompt"] == "A bear walks from the left to the right, forest background"
    layout = json.loads((prompt_dir / "layout.json").read_text())
    assert layout["phrases"] == ["bear"] and layout["token_positions"] == [[1]]    # umT5: no BOS
    assert layout["num_frames"] == 17 and len(layout["boxes_xyxy"][0]) == 17       # boxes per video frame
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_model"]["name"] == "lvd_wan_tiny" and config["run_model"]["family"] == "wan"
    assert config["guidance"]["guided_layers"] == ["blocks.2.attn2", "blocks.3.attn2", "blocks.4.attn2"]
    assert config["solver"]["corrector_off_steps"] == 10                           # = max_index_step
    assert config["sampling"]["guidance_scale"] == 5.0 and config["sampling"]["num_frames"] == 17


def test_wan_flags_reach_the_run(tmp_path):
    code = generate.main(["--run-model", "lvd_wan_tiny", *DEMO, "--output-dir", str(tmp_path), *FAST,
                          "--guided-blocks", "1", "3", "--max_index_step", "2", "--low-memory",
                          "--offload-text-encoder", "--height", "32", "--width", "48", "--num_frames", "9",
                          "--save-formats", "joblib"])
    assert code == 0
    run_dir = tmp_path / RUN_NAME.format("lvd_wan_tiny") / "run0"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["guidance"]["guided_layers"] == ["blocks.1.attn2", "blocks.3.attn2"]
    assert config["solver"] == {**config["solver"], "corrector_off_steps": 2, "offload_text_encoder": True}
    assert config["execution"]["low_memory"] is True
    assert joblib.load(run_dir / "0" / "video_0.joblib").shape == (9, 32, 48, 3)


def test_the_baseline_is_stock_unless_given_the_same_solver_setting(tmp_path):
    for extra, steps in (([], 0), (["--corrector-off-steps", "10"], 10)):
        out = tmp_path / str(steps)
        assert generate.main(["--run-model", "wan_tiny", *DEMO, "--output-dir", str(out), *FAST, *extra]) == 0
        config = json.loads((out / RUN_NAME.format("wan_tiny") / "run0" / "config.json").read_text())
        assert config["solver"]["corrector_off_steps"] == steps and config["guidance"] is None


@pytest.mark.parametrize("extra, message", [
    (["--run-model", "lvd_wan_tiny", "--guided-blocks", "99"], "blocks.99.attn2"),
    (["--run-model", "wan_tiny", "--guided-blocks", "3"], "no attention guidance"),
    (["--run-model", "lvd_tiny", "--offload-text-encoder"], "Wan run-models only"),
    (["--run-model", "lvd_wan_tiny", "--num_frames", "16"], "1 \\+ 4k"),
    (["--run-model", "lvd_wan_tiny", "--height", "40"], "multiple of 16"),
])
def test_wrong_wan_settings_fail_with_a_clear_message(tmp_path, capsys, extra, message):
    import re

    assert generate.main([*extra, *DEMO, "--output-dir", str(tmp_path), *FAST]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_wan_weights_stop_within_seconds_naming_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    code = generate.main(["--run-model", "lvd_wan2.1-1.3b", *DEMO, "--output-dir", str(tmp_path / "out")])
    assert code == 2 and time.perf_counter() - started < 10
    error = capsys.readouterr().err
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in error and "--model-path" in error
    assert not (tmp_path / "out" / RUN_NAME.format("lvd_wan2.1-1.3b")).exists()   # no run folder for nothing


def test_probe_attention_ranks_every_block_and_suggests_flags(tmp_path):
    out = tmp_path / "probe.json"
    probe = load_script("probe_attention")
    assert probe.main(["--run-model", "lvd_wan_tiny", *DEMO[:2], "--model", "handwritten", "--num_inference_steps",
                       "4", "--probe-steps", "0", "2", "--num-suggested", "3", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(row["layer"] for row in report["layers"]) == sorted(f"blocks.{i}.attn2" for i in range(6))
    assert len(report["heads"]) == 12 and all(0 <= row["iou"] <= 1 for row in report["heads"])
    assert len(report["suggested_guided_blocks"]) == 3
    assert report["suggested_guided_blocks"] == sorted(report["suggested_guided_blocks"])
    assert report["suggested_loss_scale"] > 0 and report["first_step"][0]["energy"] > 0


def test_box_agreement_scores_a_perfect_and_a_wrong_map():
    compute = load_script("probe_attention").compute_box_agreement
    masks = torch.zeros(2, 16)
    masks[0, :4] = 1                                     # frame 1: the box is empty
    perfect = torch.full((2, 1, 16), 0.01)
    perfect[0, 0, :4] = 0.9
    iou, inside, present = compute(perfect, masks)
    assert present.tolist() == [True, False] and iou[0, 0] == 1.0 and inside[0, 0] > 0.9
    wrong = torch.full((2, 1, 16), 0.01)
    wrong[0, 0, 8:12] = 0.9
    assert compute(wrong, masks)[0][0, 0] == 0.0


def test_meta_device_counts_show_what_the_stop_and_checkpointing_buy():
    from generation.backbones.wan import WanBackbone
    from models.wan import build_random_wan_model

    count = load_script("count_wan_cost")
    # Full width, 8 blocks (the counts' cost is per operator); guided blocks 2-4, as the 1.3B's 8-18 of 30.
    backbone = WanBackbone(build_random_wan_model("meta", "bf16", size="1.3b", with_vae=False,
                                                  transformer_overrides={"num_layers": 8}))
    layers = ("blocks.2.attn2", "blocks.3.attn2", "blocks.4.attn2")
    size = (64, 96, 17)
    variants = {name: variant for variant in count.VARIANTS for name in [variant[0]]}
    cfg = count.count_case(backbone, size, layers)
    full = count.count_case(backbone, size, layers, variants["full pass"])
    stop = count.count_case(backbone, size, layers, variants["stop at the last guided layer (default)"])
    low = count.count_case(backbone, size, layers, variants["stop after the last guided block + checkpointing (--low-memory)"])
    assert cfg["tflops"] > 0 and cfg["saved_gib"] == 0
    assert stop["tflops"] < full["tflops"] and stop["saved_gib"] < full["saved_gib"]
    assert low["saved_gib"] < stop["saved_gib"] / 5 and low["tflops"] > stop["tflops"]


def test_bench_wan_times_the_parts_and_derives_the_videos(tmp_path):
    bench = load_script("bench_wan")
    out = tmp_path / "bench.json"
    assert bench.main(["--num_inference_steps", "4", "--repeats", "1", "--warmup", "0", "--height", "32",
                       "--width", "48", "--num_frames", "9", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["parts"]) == {"encode", "cfg_step", "guided_iteration", "guided_iteration_low_memory",
                                    "decode"}
    derived = report["derived"]
    assert derived["baseline"]["x_baseline"] == 1.0
    assert derived["benchmark"]["guided_iterations"] == 50 and derived["benchmark"]["x_baseline"] > 1
    assert report["corrector_off_steps"] == 10


def test_gpu_bench_dry_run_of_one_wan_row(tmp_path):
    gpu_bench = load_script("gpu_bench")
    assert gpu_bench.main(["--tiny", "--rows", "wan-320x576x33", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    row = report["rows"]["wan-320x576x33"]
    assert "error" not in row and row["result"]["report"]["derived"]["weak --low-memory"]["guided_iterations"] == 10
    assert "## wan-320x576x33" in (tmp_path / "gpu_bench.md").read_text()


@pytest.mark.slow
def test_the_gpu_bench_command_runs_end_to_end_on_the_cpu(tmp_path):
    """The exact command of docs/BENCHMARKS.md in its --tiny form: every row, JSON and markdown."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "scripts/gpu_bench.sh", "--tiny", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert list(report["rows"]) == ["zeroscope", "modelscope256", "wan-480x832x81", "wan-320x576x33"]
    assert all("error" not in row and "skipped" not in row for row in report["rows"].values())
    for name in ("zeroscope", "modelscope256"):
        assert set(report["rows"][name]["result"]) == {"default", "low_memory"}
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert markdown.count("## ") == 4 and "x baseline" in markdown


@pytest.mark.slow
def test_the_acceptance_command_of_the_readme(tmp_path):
    """``python generate.py --run-model lvd_wan_tiny --prompt-type demo --model handwritten --template_version v0.1``
    with its defaults (50 steps), in a fresh process."""
    result = subprocess.run([sys.executable, "generate.py", "--run-model", "lvd_wan_tiny", *DEMO, "--output-dir",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    prompt_dir = tmp_path / RUN_NAME.format("lvd_wan_tiny") / "run0" / "0"
    assert {p.name for p in prompt_dir.iterdir()} >= {"video_0.gif", "video_0.joblib", "video_0.mp4", "layout.json",
                                                      "video_0.json"}


def test_probe_attention_without_weights_is_one_line_naming_the_model(tmp_path, capsys):
    # Issue 17 acceptance 2: the README's probe command ended in a traceback without the weights.
    probe = load_script("probe_attention")
    assert probe.main(["--run-model", "lvd_wan2.1-1.3b", "--model-path", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: weights for Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
