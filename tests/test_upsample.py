"""Upsampling (generation/upsampling.py, models/upsamplers.py, scripts/upsample.py) on tiny random models.

Spec: LVD-REFERENCE.md 11 (flags, Zeroscope XL video-to-video, SDXL refiner per frame, names, resume),
15.10-15.11. diffusers' deprecated ``VideoToVideoSDPipeline`` serves as the reference for our loop.
"""
from __future__ import annotations

import importlib.util
import sys
import time
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generation.backbones.unet3d import decode_latents
from generation.upsampling import (UPSAMPLE_NEGATIVE_PROMPT, RefineConfig, compute_img2img_timesteps,
                                   compute_target_size, refine_frames_sdxl, refine_video_zeroscope_xl,
                                   resize_frames, sdxl_refine_config, upsampled_video_stem,
                                   zeroscope_xl_refine_config)
from models.hub import MissingWeightsError
from models.schedulers import build_dpm_scheduler
from models.upsamplers import (SDXL_REFINER_ID, ZEROSCOPE_XL_ID, build_tiny_sdxl_refiner, build_tiny_zeroscope_xl,
                               enable_model_cpu_offload, load_sdxl_refiner, load_zeroscope_xl,
                               save_tiny_sdxl_refiner, save_tiny_zeroscope_xl)
from utils.video_io import load_video, write_gif, write_joblib

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A bear walks from the left to the right"
# Small and quick: 10 steps keep every strength used here (0.1 chained) at one step or more.
FAST = ["--num_inference_steps", "10", "--width", "128", "--height", "64"]


def load_script():
    spec = importlib.util.spec_from_file_location("upsample_script", REPO_ROOT / "scripts" / "upsample.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def zsxl():
    return build_tiny_zeroscope_xl(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl_refiner(seed=0)


def random_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def write_input_video(folder: Path, name: str = "video_0", num_frames: int = 8) -> Path:
    """An 8-frame 64x64 video as generate.py writes it (.gif + .joblib); returns the .gif path."""
    frames = random_frames(num_frames, 64, 64)
    write_gif(frames, folder / f"{name}.gif")
    write_joblib(frames, folder / f"{name}.joblib")
    return folder / f"{name}.gif"


# ---------------------------------------------------------------------------------------------
# Zeroscope XL loop


def test_loop_reproduces_the_video_to_video_pipeline(zsxl):
    from diffusers import VideoToVideoSDPipeline

    frames = random_frames(3, 64, 128)
    config = zeroscope_xl_refine_config(strength=0.5, num_inference_steps=10, seed=3)
    result = refine_video_zeroscope_xl(zsxl, frames, PROMPT, config)

    pipe = VideoToVideoSDPipeline(vae=zsxl.vae, text_encoder=zsxl.text_encoder, tokenizer=zsxl.tokenizer,
                                  unet=zsxl.unet, scheduler=zsxl.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    # torch.manual_seed(seed), a CPU generator, as the reference passes it.
    latents = pipe(prompt=PROMPT, video=[Image.fromarray(frame) for frame in frames], strength=0.5,
                   num_inference_steps=10, guidance_scale=15.0, negative_prompt=UPSAMPLE_NEGATIVE_PROMPT,
                   generator=torch.manual_seed(3), output_type="latent").frames          # (1, 4, F, h, w)
    assert result.latents.shape == latents.shape == (1, 4, 3, 8, 16)
    assert torch.allclose(result.latents, latents, atol=1e-5, rtol=0)
    with torch.no_grad():
        video = pipe.video_processor.postprocess_video(pipe.decode_latents(latents), "np")  # (1, F, H, W, 3)
    decoded = decode_latents(zsxl.vae, result.latents).numpy()
    assert video.shape == (1, *decoded.shape) == (1, 3, 64, 128, 3)
    assert np.abs(decoded - video[0]).max() <= 1e-5
    assert result.frames.dtype == np.uint8 and np.array_equal(result.frames, (decoded * 255).astype(np.uint8))


def test_xl_scheduler_uses_its_own_leading_spacing_and_strength_cut(zsxl):
    scheduler = zsxl.make_scheduler()
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.algorithm_type == "dpmsolver++"
    kept = compute_img2img_timesteps(scheduler, 50, 0.35)
    # DPM-Solver's "leading": every (1000 // 51)-th step from 0, the last 50 reversed, plus steps_offset 1.
    expected = (np.arange(0, 51) * (1000 // 51))[::-1][:-1] + 1
    assert scheduler.timesteps.tolist() == expected.tolist() and expected[0] == 951
    assert kept.tolist() == expected[33:].tolist() and len(kept) == 17   # int(50 * 0.35) = 17 steps
    assert scheduler.begin_index == 33
    linspace = build_dpm_scheduler()                          # the base models' config (spec 5.1)
    linspace.set_timesteps(50)
    assert linspace.timesteps[0] == 999


def test_cpu_offload_hooks_leave_the_result_unchanged(zsxl):
    frames = random_frames(2, 64, 64, seed=1)
    config = zeroscope_xl_refine_config(num_inference_steps=10)
    plain = refine_video_zeroscope_xl(zsxl, frames, PROMPT, config)
    offloaded_model = enable_model_cpu_offload(build_tiny_zeroscope_xl(seed=0), torch.device("cpu"))
    assert hasattr(offloaded_model.unet, "_hf_hook") and hasattr(offloaded_model.vae, "_hf_hook")
    offloaded = refine_video_zeroscope_xl(offloaded_model, frames, PROMPT, config)
    assert np.array_equal(plain.frames, offloaded.frames)


# ---------------------------------------------------------------------------------------------
# SDXL refiner


def test_sdxl_reseeds_every_frame_like_the_reference(sdxl):
    a, b = random_frames(2, 64, 64, seed=2)
    config = sdxl_refine_config(num_inference_steps=10, seed=5)
    assert config.guidance_scale == 5.0 and config.negative_prompt is None and config.strength == 0.35
    refined = refine_frames_sdxl(sdxl, np.stack([a, b, a]), PROMPT, config)
    assert refined.shape == (3, 64, 64, 3) and refined.dtype == np.uint8
    assert np.array_equal(refined[0], refined[2])           # same frame, same noise: same output
    # Frame b alone through the pipeline with the reference's torch.manual_seed(seed).
    expected = sdxl(prompt=PROMPT, image=Image.fromarray(b), strength=0.35, num_inference_steps=10,
                    guidance_scale=5.0, generator=torch.manual_seed(5), output_type="pil").images[0]
    assert np.array_equal(refined[1], np.asarray(expected))
    assert not np.array_equal(refined[1], b)


# ---------------------------------------------------------------------------------------------
# Configs, sizes, names


def test_output_names_follow_spec_11():
    video = Path("run0/3/video_0.joblib")
    assert upsampled_video_stem(video, "zsxl", 0.35) == Path("run0/3/video_0_zsxl")
    assert upsampled_video_stem(video, "zsxl", 0.5) == Path("run0/3/video_0_zsxl_s0.5")
    assert upsampled_video_stem(video, "sdxl", 0.35) == Path("run0/3/video_0_sdxl")
    assert upsampled_video_stem(video, "sdxl", 1) == Path("run0/3/video_0_sdxl_s1.0")
    chained = upsampled_video_stem(Path("run0/3/video_0_zsxl.joblib"), "sdxl", 0.1)
    assert chained == Path("run0/3/video_0_zsxl_sdxl_s0.1")
    with pytest.raises(ValueError, match="unknown upsampler"):
        upsampled_video_stem(video, "esrgan", 0.35)


def test_target_size_and_lanczos_resize():
    assert compute_target_size(horizontal=True) == (576, 1024)
    assert compute_target_size(horizontal=False) == (1024, 1024)
    assert compute_target_size(True, height=64, width=128) == (64, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        compute_target_size(True, width=100)
    frames = random_frames(2, 64, 64)
    resized = resize_frames(frames, 64, 128)
    assert resized.shape == (2, 64, 128, 3) and resized.dtype == np.uint8
    expected = np.asarray(Image.fromarray(frames[1]).resize((128, 64), Image.LANCZOS))
    assert np.array_equal(resized[1], expected)
    assert resize_frames(frames, 64, 64) is frames


def test_refine_config_checks():
    assert zeroscope_xl_refine_config() == RefineConfig(0.35, 50, 15.0, UPSAMPLE_NEGATIVE_PROMPT, 1)
    with pytest.raises(ValueError, match="no denoising step"):
        RefineConfig(strength=0.1, num_inference_steps=9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RefineConfig(strength=1.5)


# ---------------------------------------------------------------------------------------------
# Loading


def test_missing_weights_fail_fast_naming_the_model(monkeypatch, tmp_path, script, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match=ZEROSCOPE_XL_ID):
        load_zeroscope_xl(device="cpu")
    with pytest.raises(MissingWeightsError, match=SDXL_REFINER_ID):
        load_sdxl_refiner(device="cpu")
    with pytest.raises(MissingWeightsError, match="missing"):
        load_zeroscope_xl(tmp_path, device="cpu")   # a folder without the model files
    video = write_input_video(tmp_path)
    assert script.main(["--videos", str(video), "--prompts", PROMPT, "--use_zssdxl", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert ZEROSCOPE_XL_ID in error and "--zsxl-model-path DIR" in error
    assert time.perf_counter() - start < 10
    assert not list(tmp_path.glob("video_0_*"))


def test_saved_tiny_models_load_through_the_real_loaders(tmp_path, zsxl, sdxl):
    loaded = load_zeroscope_xl(save_tiny_zeroscope_xl(tmp_path / "zsxl"), device="cpu")
    assert loaded.scheduler.config.timestep_spacing == "leading"
    assert torch.equal(loaded.unet.conv_in.weight, zsxl.unet.conv_in.weight)
    refiner = load_sdxl_refiner(save_tiny_sdxl_refiner(tmp_path / "sdxl"), device="cpu")
    assert refiner.config.requires_aesthetics_score and refiner.text_encoder is None
    assert torch.equal(refiner.unet.conv_in.weight, sdxl.unet.conv_in.weight)
    assert refiner.tokenizer_2("a cat", padding="max_length").input_ids[-1] == 0   # pads with "!"


# ---------------------------------------------------------------------------------------------
# The CLI


def test_cli_zeroscope_xl_writes_three_formats_and_resumes(tmp_path, script, capsys):
    video = write_input_video(tmp_path)
    argv = ["--videos", str(video), "--prompts", PROMPT, "--tiny", "--use_zsxl", "--output-mp4", *FAST]
    assert script.main(argv) == 0
    stem = tmp_path / "video_0_zsxl"
    frames = load_video(stem.with_suffix(".joblib"))
    assert frames.shape == (8, 64, 128, 3) and frames.dtype == np.uint8
    assert load_video(stem.with_suffix(".gif")).shape[1:] == (64, 128, 3)
    assert load_video(stem.with_suffix(".mp4")).shape == (8, 64, 128, 3)
    assert "the upsampled videos are noise" in capsys.readouterr().out
    mtime = stem.with_suffix(".joblib").stat().st_mtime_ns
    assert script.main(argv) == 0                          # resume: the joblib exists
    assert stem.with_suffix(".joblib").stat().st_mtime_ns == mtime
    assert "already done: 1" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_sdxl_and_chained_outputs(tmp_path, script):
    video = write_input_video(tmp_path)
    argv = ["--videos", str(video), "--prompts", PROMPT, "--tiny", "--use_sdxl", "--use_zssdxl", "--horizontal",
            *FAST]
    assert script.main(argv) == 0
    for name in ("video_0_sdxl", "video_0_zsxl", "video_0_zsxl_sdxl_s0.1"):
        frames = load_video(tmp_path / f"{name}.joblib")
        assert frames.shape == (8, 64, 128, 3), name
        assert (tmp_path / f"{name}.gif").is_file() and (tmp_path / f"{name}.json").is_file()
        assert not (tmp_path / f"{name}.mp4").exists()
    zsxl = load_video(tmp_path / "video_0_zsxl.joblib")
    chained = load_video(tmp_path / "video_0_zsxl_sdxl_s0.1.joblib")
    assert not np.array_equal(zsxl, chained)


def test_cli_prompts_broadcast_or_must_match(tmp_path, script, capsys):
    first, second = write_input_video(tmp_path, "video_0"), write_input_video(tmp_path, "video_1")
    args = script.build_parser().parse_args(["--videos", str(first), str(second), "--prompts", PROMPT,
                                             "--use_zssdxl", "--strength", "0.5"])
    jobs = script.plan_jobs(args)
    assert [job.prompt for job in jobs] == [PROMPT] * 4
    assert [job.input_path.name for job in jobs] == ["video_0.joblib", "video_1.joblib",
                                                     "video_0_zsxl_s0.5.joblib", "video_1_zsxl_s0.5.joblib"]
    assert [job.output_stem.name for job in jobs][2:] == ["video_0_zsxl_s0.5_sdxl_s0.1", "video_1_zsxl_s0.5_sdxl_s0.1"]
    assert [job.config.strength for job in jobs] == [0.5, 0.5, 0.1, 0.1]
    twice = script.build_parser().parse_args(["--videos", str(first), str(first.with_suffix(".joblib")),
                                              "--prompts", PROMPT, "--use_zsxl"])
    assert len(script.plan_jobs(twice)) == 1                 # the same video listed twice runs once
    assert script.main(["--videos", str(first), str(second), "--prompts", "a", "b", "c", "--use_zsxl",
                        "--tiny"]) == 2
    assert "got 3 prompts for 2 videos" in capsys.readouterr().err
    assert script.main(["--videos", str(first), "--prompts", "a", "--tiny"]) == 2   # no upsampler chosen


def test_cli_reports_a_missing_video_and_goes_on(tmp_path, script, capsys):
    video = write_input_video(tmp_path, num_frames=2)
    argv = ["--videos", str(tmp_path / "missing.joblib"), str(video), "--prompts", PROMPT, "--tiny", "--use_zsxl",
            *FAST]
    assert script.main(argv) == 1
    captured = capsys.readouterr()
    assert "missing.joblib" in captured.err and "failed: 1" in captured.out
    failures = [json.loads(line) for line in (tmp_path / "upsample_failures.jsonl").read_text().splitlines()]
    assert [Path(f["input"]).name for f in failures] == ["missing.joblib"] and "not found" in failures[0]["error"]
    assert load_video(tmp_path / "video_0_zsxl.joblib").shape == (2, 64, 128, 3)
