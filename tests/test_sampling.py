"""The sampling loop (generation/sampling.py) on the tiny random-weight model.

Spec: LVD-REFERENCE.md 4.5 (step sizes), 5 (scheduler, CFG, negative prompt, latents, decode),
14.8-14.9, 15.9 (a layout with no objects). diffusers' deprecated ``TextToVideoSDPipeline`` serves
as the reference loop: same model, scheduler config and CPU generator.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import TextToVideoSDPipeline

from generation.config import NEGATIVE_PROMPT, GuidanceConfig, SamplingConfig
from generation.guidance import compute_step_sizes
from generation.backbones.unet3d import decode_latents, frames_to_uint8, prepare_latents
from generation.sampling import generate_video
from models.schedulers import build_dpm_scheduler
from utils.layout import Box, LayoutCondition, ObjectTrack, SceneLayout, build_condition

SAMPLING = SamplingConfig(height=64, width=64, num_frames=4, num_inference_steps=8)
PROMPT = "A red car and a blue cat"
SEED = 3


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def make_condition(tokenizer, num_frames: int) -> LayoutCondition:
    car = ObjectTrack(0, "red car", tuple(Box(0.1 + 0.08 * i, 0.3, 0.5 + 0.08 * i, 0.7) for i in range(6)))
    layout = SceneLayout(PROMPT, "street", (car,))
    return build_condition(layout, num_frames, tokenizer)


def run_pipeline(model, output_type: str):
    pipe = TextToVideoSDPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                 unet=model.unet, scheduler=model.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, num_frames=SAMPLING.num_frames, height=SAMPLING.height,
                width=SAMPLING.width, num_inference_steps=SAMPLING.num_inference_steps,
                guidance_scale=SAMPLING.guidance_scale, generator=torch.Generator("cpu").manual_seed(SEED),
                output_type=output_type).frames


def test_unguided_run_reproduces_the_text_to_video_pipeline(model):
    result = generate_video(model, PROMPT, SAMPLING, SEED)
    latents = run_pipeline(model, "latent")                 # (1, 4, F, h, w)
    assert result.latents.shape == latents.shape == (1, 4, 4, 8, 8)
    assert torch.allclose(result.latents, latents, atol=1e-5, rtol=0)
    video = run_pipeline(model, "np")                       # (1, F, H, W, 3) float in [0, 1]
    decoded = decode_latents(model.vae, result.latents)     # (F, H, W, 3)
    assert video.shape == (1, *decoded.shape) == (1, 4, 64, 64, 3)
    assert np.abs(decoded.numpy() - video[0]).max() <= 1e-5
    assert result.frames.dtype == np.uint8 and result.frames.shape == (4, 64, 64, 3)
    assert np.array_equal(result.frames, (decoded.numpy() * 255).astype(np.uint8))
    assert result.prompt == PROMPT and result.seed == SEED and result.guidance_log == []


def test_runs_are_deterministic_per_seed(model):
    first = generate_video(model, PROMPT, SAMPLING, SEED)
    again = generate_video(model, PROMPT, SAMPLING, SEED)
    other = generate_video(model, PROMPT, SAMPLING, SEED + 1)
    assert torch.equal(first.latents, again.latents) and np.array_equal(first.frames, again.frames)
    assert not torch.equal(first.latents, other.latents)


def test_initial_noise_is_cpu_float32_normal_from_the_seed():
    latents = prepare_latents(7, num_frames=3, height=64, width=48, channels=4, device="cpu", dtype=torch.float32)
    expected = torch.randn((1, 4, 3, 8, 6), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(latents, expected)
    half = prepare_latents(7, 3, 64, 48, 4, "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected.to(torch.bfloat16))


def test_frames_are_truncated_not_rounded():
    frames = torch.tensor([0.0, 0.5, 0.999, 1.0, 0.0039])
    assert frames_to_uint8(frames).tolist() == [0, 127, 254, 255, 0]


def test_condition_prompt_is_what_the_model_sees(model):
    condition = make_condition(model.tokenizer, SAMPLING.num_frames)
    assert condition.prompt == "A red car and a blue cat, street background"
    with_condition = generate_video(model, PROMPT, SAMPLING, SEED, condition=condition)
    bare = generate_video(model, condition.prompt, SAMPLING, SEED)
    assert with_condition.prompt == condition.prompt
    assert torch.equal(with_condition.latents, bare.latents)


def test_step_callback_sees_every_step(model):
    seen = []
    generate_video(model, PROMPT, SamplingConfig(height=64, width=64, num_frames=2, num_inference_steps=3), 0,
                   step_callback=lambda step, total: seen.append((step, total)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_guidance_step_sizes_at_40_steps():
    scheduler = build_dpm_scheduler()
    scheduler.set_timesteps(40)
    assert scheduler.timesteps[:4].tolist() == [999, 974, 949, 924] and scheduler.timesteps[-1] == 25
    sizes = compute_step_sizes(scheduler.alphas_cumprod, scheduler.timesteps)
    assert sizes.dtype == torch.float32 and sizes.shape == (40,)
    expected = [0.998, 0.997, 0.996, 0.995, 0.993, 0.991, 0.988, 0.985, 0.981, 0.977]   # spec 4.5
    assert sizes[:10].tolist() == pytest.approx(expected, abs=6e-4)
    assert torch.all(sizes[1:] < sizes[:-1])
    # sqrt(1 - alpha_bar_t), alpha_bar from the scaled-linear betas in float32.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert torch.allclose(sizes, torch.sqrt(1 - alphas_cumprod[scheduler.timesteps.long()]), atol=1e-6)


def test_layout_without_objects_gives_an_unguided_video_and_a_warning(model, caplog):
    empty = LayoutCondition(prompt="A quiet street, street background", boxes_xyxy=np.zeros((0, 4, 4)),
                            phrases=(), token_positions=(), token_map=None)
    guidance = GuidanceConfig(loss_threshold=0.0)
    with caplog.at_level(logging.WARNING, logger="generation.sampling"):
        result = generate_video(model, "A quiet street", SAMPLING, SEED, condition=empty, guidance=guidance)
    assert any("no objects" in record.getMessage() for record in caplog.records)
    assert result.frames.shape == (4, 64, 64, 3) and result.guidance_log == []
    baseline = generate_video(model, empty.prompt, SAMPLING, SEED)
    assert torch.equal(result.latents, baseline.latents)


def test_guidance_rejects_a_condition_it_cannot_use(model):
    condition = make_condition(model.tokenizer, SAMPLING.num_frames)
    guidance = GuidanceConfig(loss_threshold=0.0)
    no_tokens = LayoutCondition(condition.prompt, condition.boxes_xyxy, condition.phrases, None, None)
    with pytest.raises(ValueError, match="token positions"):
        generate_video(model, PROMPT, SAMPLING, SEED, condition=no_tokens, guidance=guidance)
    wrong_frames = make_condition(model.tokenizer, SAMPLING.num_frames + 2)
    with pytest.raises(ValueError, match="boxes for 6 frames but 4 frames are generated"):
        generate_video(model, PROMPT, SAMPLING, SEED, condition=wrong_frames, guidance=guidance)
    past_the_end = LayoutCondition(condition.prompt, condition.boxes_xyxy, condition.phrases, ((76, 77),), None)
    with pytest.raises(ValueError, match=r"'red car' has token positions \[76, 77\], past the 77-token"):
        generate_video(model, PROMPT, SAMPLING, SEED, condition=past_the_end, guidance=guidance)


def test_guidance_without_a_condition_warns_and_runs_unguided(model, caplog):
    with caplog.at_level(logging.WARNING, logger="generation.sampling"):
        result = generate_video(model, PROMPT, SAMPLING, SEED, guidance=GuidanceConfig(loss_threshold=0.0))
    assert any("no layout condition" in record.getMessage() for record in caplog.records)
    assert result.guidance_log == []
