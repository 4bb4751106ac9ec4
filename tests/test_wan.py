"""Wan 2.1 T2V as a backbone (models/wan.py, models/wan_attention.py, generation/backbones/wan.py) on a tiny
random-weight Wan built from shrunken real configs: equality with diffusers' `WanPipeline`, recording, guidance,
early stop and checkpointing, UniPC's corrector, latent-frame layouts, step sizes, loading.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from generation.backbones import WanBackbone, backbone_for
from generation.backbones.wan import compute_flow_step_sizes
from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig
from generation.guidance import guidance_step
from generation.lvd import build_layout_guidance, make_layout_energy_fn
from generation.sampling import generate_video
from models.attention import AttentionRecorder
from models.hub import MissingWeightsError
from models.loading import load_video_model
from models.registry import (WAN_14B_GUIDED_LAYERS, WAN_1_3B_GUIDED_LAYERS, WAN_NEGATIVE_PROMPT, RunModelError,
                             get_run_model, validate_num_frames, validate_size)
from models.wan import (WAN_1_3B_TRANSFORMER_CONFIG, WAN_SCHEDULER_CONFIG, WAN_VAE_CONFIG, build_random_wan_model,
                        build_tiny_wan_model, build_wan_scheduler, clean_prompt, compute_wan_token_positions,
                        decode_wan_latents, save_tiny_wan_model)
from models.wan_attention import recording_wan_attention
from utils.layout import Box, LayoutValidationError, ObjectTrack, SceneLayout, resample_boxes

REPO = Path(__file__).resolve().parents[1]
SHARED_CONFIGS = REPO.parent / "shared" / "model-configs" / "Wan-AI__Wan2.1-T2V-1.3B-Diffusers"
SPEC = get_run_model("lvd_wan_tiny")
# 9 frames -> 3 latent frames; 64x96 -> latents 8x12 -> maps 4x6.
SAMPLING = SamplingConfig(height=64, width=96, num_frames=9, num_inference_steps=6, guidance_scale=5.0,
                          negative_prompt=WAN_NEGATIVE_PROMPT)
PROMPT = "A red car and a  blue cat &amp; a dog"   # prompt_clean collapses the spaces, unescapes the entity
SEED = 3
ACTIVE = GuidanceConfig(guided_layers=SPEC.guided_layers, loss_threshold=-1.0, max_iter=2, max_index_step=2)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by per-operator overhead; one thread avoids oversubscribing shared CPUs
    # (conftest restores the thread count after each test).
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return build_tiny_wan_model(seed=0)


@pytest.fixture(scope="module")
def layout():
    car = ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.7) for i in range(6)))
    cat = ObjectTrack(1, "blue cat", (Box(0.6, 0.1, 0.9, 0.4),) * 3 + (None,) * 3)
    return SceneLayout("A red car and a blue cat", "street", (car, cat))


@pytest.fixture(scope="module")
def condition(model, layout):
    return backbone_for(model).build_condition(layout, SAMPLING.num_frames)


@pytest.fixture(scope="module")
def baseline(model, condition):
    return generate_video(model, condition.prompt, SAMPLING, SEED)


def make_pipeline(model) -> WanPipeline:
    pipe = WanPipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                       transformer=model.transformer, scheduler=model.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(model, prompt: str, output_type: str):
    return make_pipeline(model)(prompt, negative_prompt=WAN_NEGATIVE_PROMPT, height=SAMPLING.height,
                                width=SAMPLING.width, num_frames=SAMPLING.num_frames,
                                num_inference_steps=SAMPLING.num_inference_steps,
                                guidance_scale=SAMPLING.guidance_scale,
                                generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type).frames


# --------------------------------------------------------------------------------------------
# Baseline equality with WanPipeline


def test_text_encoding_equals_the_pipeline(model):
    prompts = [PROMPT, "a dog"]
    ours = model.encode(prompts)
    pipe_embeds, _ = make_pipeline(model).encode_prompt(prompts, do_classifier_free_guidance=False,
                                                        max_sequence_length=512, device=torch.device("cpu"))
    assert ours.shape == (2, 512, 32)
    assert torch.equal(ours, pipe_embeds)
    length = len(model.tokenizer(clean_prompt(PROMPT)).input_ids)     # the prompt's own tokens, </s> included
    assert ours[0, :length].abs().sum(-1).gt(0).all() and torch.equal(ours[0, length:], torch.zeros(512 - length, 32))


def test_unguided_run_equals_wan_pipeline_bit_for_bit(model):
    result = generate_video(model, PROMPT, SAMPLING, SEED)
    latents = run_pipeline(model, PROMPT, "latent")
    assert result.latents.shape == latents.shape == (1, 16, 3, 8, 12)   # (1, 16, (F-1)/4+1, H/8, W/8)
    assert result.latents.dtype == torch.float32
    assert torch.equal(result.latents, latents)
    video = run_pipeline(model, PROMPT, "np")                            # (1, F, H, W, 3) float in [0, 1]
    decoded = decode_wan_latents(model.vae, result.latents)
    assert video.shape == (1, *decoded.shape) == (1, 9, 64, 96, 3)
    assert np.array_equal(decoded, video[0])
    assert result.frames.dtype == np.uint8 and np.array_equal(result.frames, (video[0] * 255).astype(np.uint8))


def test_two_batch_one_passes_for_cfg_and_one_without(model):
    calls = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        generate_video(model, PROMPT, dataclasses.replace(SAMPLING, num_inference_steps=2), SEED)
        generate_video(model, PROMPT, dataclasses.replace(SAMPLING, num_inference_steps=2, guidance_scale=1.0), SEED)
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 1] + [1, 1]


# --------------------------------------------------------------------------------------------
# Recording


def attn2_inputs(model, block: int, latents, timestep, cond):
    """(hidden_states, encoder_hidden_states) that block ``block``'s cross-attention sees."""
    seen = {}
    attn = model.transformer.blocks[block].attn2
    handle = attn.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            model.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond, return_dict=False)
    finally:
        handle.remove()
    return seen["args"][0], seen["args"][1]


def test_recording_leaves_the_output_unchanged_and_records_the_softmax(model):
    backbone = backbone_for(model)
    latents = backbone.prepare_latents(SEED, SAMPLING.num_frames, SAMPLING.height, SAMPLING.width, "cpu")
    cond = model.encode([PROMPT])
    timestep = torch.tensor([900])
    with torch.no_grad():
        stock = model.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond,
                                  return_dict=False)[0]
    previous = dict(model.transformer.attn_processors)
    recorder = AttentionRecorder(SPEC.guided_layers, token_indices=None, stop_when_complete=False)
    with recording_wan_attention(model.transformer, recorder) as state, torch.no_grad():
        state.grid = (3, 4, 6)
        recorder.start()
        recorded = model.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond,
                                     return_dict=False)[0]
        recorder.stop()
        off = model.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond,
                                return_dict=False)[0]
    assert (recorded - stock).abs().max() <= 1e-6 and torch.equal(off, stock)
    assert dict(model.transformer.attn_processors) == previous          # restored, same objects
    assert list(recorder.maps) == list(SPEC.guided_layers)
    for name, maps in recorder.maps.items():
        assert maps.shape == (3, 2, 4 * 6, 512) and maps.dtype == torch.float32   # (frames, heads, h*w, tokens)
        assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)
        # Independently: the stock module's q / k, RMS-normed, scaled dot products, softmax over all 512 keys.
        block = int(name.split(".")[1])
        hidden, text = attn2_inputs(model, block, latents, timestep, cond)
        attn = model.transformer.blocks[block].attn2
        query = attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1))
        key = attn.norm_k(attn.to_k(text)).unflatten(2, (2, -1))
        probs = (torch.einsum("bnhd,bthd->bhnt", query, key) / math.sqrt(12)).softmax(-1)   # (1, heads, F*h*w, 512)
        expected = probs[0].unflatten(1, (3, 24)).transpose(0, 1)                         # (F, heads, h*w, 512)
        assert (maps - expected).abs().max() <= 1e-6


def test_fused_projections_are_handled():
    fused = build_tiny_wan_model(seed=0)
    fused.transformer.fuse_qkv_projections()
    backbone = backbone_for(fused)
    latents = backbone.prepare_latents(SEED, 9, 64, 96, "cpu")
    cond = fused.encode([PROMPT])
    with torch.no_grad():
        stock = fused.transformer(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=cond,
                                  return_dict=False)[0]
    recorder = AttentionRecorder(SPEC.guided_layers, token_indices=torch.tensor([1, 2]), stop_when_complete=False)
    with recording_wan_attention(fused.transformer, recorder) as state, torch.no_grad():
        state.grid = (3, 4, 6)
        recorder.start()
        recorded = fused.transformer(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=cond,
                                     return_dict=False)[0]
    assert (recorded - stock).abs().max() <= 1e-6
    assert all(m.shape == (3, 2, 24, 2) for m in recorder.maps.values())


@pytest.mark.parametrize("name, message", [("blocks.3.attn1", "self-attention"), ("blocks.99.attn2", "not a cross"),
                                           ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "not a cross")])
def test_only_block_cross_attention_can_be_guided(model, name, message):
    with pytest.raises(ValueError, match=message):
        backbone_for(model).check_guided_layers([name])


def test_text_keys_and_values_are_computed_once_per_prompt(model, condition):
    guidance = make_guidance(model, condition, ACTIVE)
    calls = []
    handle = model.transformer.blocks[2].attn2.to_k.register_forward_hook(lambda *args: calls.append(1))
    try:
        energy_fn = make_energy_fn(guidance, torch.tensor(999))
        latents = guidance.backbone.prepare_latents(SEED, 9, 64, 96, "cpu")
        with guidance:
            for _ in range(3):
                guidance_step(latents, energy_fn, 1.0, ACTIVE.loss_scale)
    finally:
        handle.remove()
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# Guidance


def make_guidance(model, condition, config, execution=ExecutionConfig()):
    backbone = backbone_for(model)
    cond = backbone.encode_text([condition.prompt], None).cond
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(SAMPLING.num_inference_steps)
    return build_layout_guidance(backbone, [condition.prompt], [condition], cond, config, execution, scheduler,
                                 scheduler.timesteps, SAMPLING.num_frames, SAMPLING.height, SAMPLING.width)


def make_energy_fn(guidance, timestep):
    energy_fn = make_layout_energy_fn(guidance.backbone, guidance.recorder, guidance.cond, timestep, guidance.videos,
                                      guidance.config.energy_weights(), guidance.num_map_frames,
                                      guidance.execution.low_memory)
    return lambda latents: energy_fn(latents, [0])[0]


@pytest.mark.parametrize("config", [
    None,
    dataclasses.replace(ACTIVE, max_index_step=0),
    dataclasses.replace(ACTIVE, max_iter=0),
    GuidanceConfig(guided_layers=SPEC.guided_layers, loss_scale=50.0),   # sentinel 10000 / 50 is not above 200
], ids=["no-config", "max-index-step-0", "max-iter-0", "sentinel"])
def test_zero_guidance_equals_the_baseline_bit_for_bit(model, condition, baseline, config):
    result = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=config)
    assert torch.equal(result.latents, baseline.latents)
    assert np.array_equal(result.frames, baseline.frames)
    assert result.guidance_log == []


def test_one_guided_iteration_lowers_the_energy(model, condition):
    guidance = make_guidance(model, condition, ACTIVE)
    energy_fn = make_energy_fn(guidance, torch.tensor(999))
    latents = guidance.backbone.prepare_latents(SEED, 9, 64, 96, "cpu")
    step_size = guidance.step_sizes[0]
    with guidance:
        # Random weights spread attention nearly evenly over the 512 keys: a large scale makes the step visible.
        guided, before = guidance_step(latents, energy_fn, step_size, 1000.0)
        _, after = guidance_step(guided, energy_fn, step_size, 1000.0)
    assert not torch.equal(guided, latents)
    assert torch.isfinite(before) and after < before, (before.item(), after.item())


def test_guided_run_logs_every_iteration_and_moves_the_latents(model, condition, baseline):
    result = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=ACTIVE)
    assert [(r.step, r.iteration) for r in result.guidance_log] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(math.isfinite(r.energy) and r.energy > 0 for r in result.guidance_log)
    assert not torch.equal(result.latents, baseline.latents)


def test_a_batch_equals_its_videos_one_by_one(model, condition, layout):
    from generation.sampling import VideoRequest, generate_videos

    dog = ObjectTrack(0, "dog", (Box(0.5, 0.5, 0.9, 0.9),) * 6)
    other = backbone_for(model).build_condition(SceneLayout("A blue cat next to a dog", "park", (dog,)), 9)
    config = dataclasses.replace(ACTIVE, loss_scale=1000.0)
    batch = generate_videos(model, [VideoRequest("a", 1, condition), VideoRequest("b", 2, other)], SAMPLING,
                            guidance=config)
    for result, (seed, video_condition) in zip(batch, ((1, condition), (2, other))):
        alone = generate_video(model, "x", SAMPLING, seed, condition=video_condition, guidance=config)
        assert torch.allclose(result.latents, alone.latents, atol=1e-5, rtol=0)
        assert [r.energy for r in result.guidance_log] == pytest.approx([r.energy for r in alone.guidance_log])


def energy_and_gradient(model, condition, execution):
    guidance = make_guidance(model, condition, ACTIVE, execution)
    energy_fn = make_energy_fn(guidance, torch.tensor(950))
    latents = guidance.backbone.prepare_latents(SEED, 9, 64, 96, "cpu").requires_grad_(True)
    blocks_run = []
    saved_bytes = []
    handles = [block.register_forward_pre_hook(lambda module, args, i=i: blocks_run.append(i))
               for i, block in enumerate(model.transformer.blocks)]

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    try:
        with guidance, torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                energy = energy_fn(latents)
            (gradient,) = torch.autograd.grad(energy, latents)
    finally:
        for handle in handles:
            handle.remove()
    return energy.detach(), gradient, blocks_run, sum(saved_bytes)


def test_early_stop_and_checkpointing_give_the_energy_and_gradient_of_the_full_pass(model, condition):
    full = energy_and_gradient(model, condition, ExecutionConfig(stop_after_last_guided_layer=False,
                                                                 record_object_tokens_only=False))
    stopped = energy_and_gradient(model, condition, ExecutionConfig())
    checkpointed = energy_and_gradient(model, condition, ExecutionConfig(low_memory=True))
    assert full[2][:6] == [0, 1, 2, 3, 4, 5]
    assert stopped[2] == [0, 1, 2, 3, 4]           # the pass ends in block 4, the last guided one
    assert checkpointed[2] == [0, 1, 2, 3, 4] + [4, 3, 2, 1, 0]   # forward, then recomputed backwards
    for energy, gradient, _, _ in (stopped, checkpointed):
        assert torch.equal(energy, full[0])
        assert torch.allclose(gradient, full[1], rtol=0, atol=1e-7), (gradient - full[1]).abs().max()
    assert full[1].abs().max() > 0
    assert checkpointed[3] < stopped[3] / 2 < full[3]    # bytes saved for the backward pass


# --------------------------------------------------------------------------------------------
# Token positions (umT5: sentencepiece unigram, no BOS, </s> appended)


@pytest.mark.parametrize("prompt, phrases, expected", [
    ("A red car and a blue cat, street background", ["red car", "blue cat"], ((1, 2), (5, 6))),
    ("A realistic lively video of a scene with two moving cars, street background", ["moving car"], ((10,),)),
    ("a giraffe next to a hedgehog", ["giraffe", "hedgehog"], ((1, 2), (6, 7))),   # multi-piece words
    ("a dog and a dog", ["dog"], ((1,),)),                                       # repeated: the first one
    ("A bear walks from the left to the right, forest background| brown bear", ["brown bear"], ((13, 14),)),
])
def test_token_positions_on_worked_examples(model, prompt, phrases, expected):
    positions, token_map = compute_wan_token_positions(prompt, phrases, model.tokenizer)
    assert positions == expected
    assert token_map[-1] == "</s>" and not token_map[0].startswith("<")      # no BOS
    for phrase, span in zip(phrases, positions):
        pieces = "".join(token_map[i] for i in span).replace("\u2581", " ").strip()
        assert pieces.split(" ")[-1].startswith(phrase.split(" ")[-1][:3])


def test_token_positions_index_the_cleaned_prompt(model, layout):
    messy = dataclasses.replace(layout, prompt="A  red car &amp; a blue   cat")
    condition = backbone_for(model).build_condition(messy, SAMPLING.num_frames)
    text = clean_prompt(condition.prompt)
    assert text == "A red car & a blue cat, street background"
    ids = model.tokenizer(text).input_ids
    for phrase, span in zip(condition.phrases, condition.token_positions):
        assert model.tokenizer.decode([ids[i] for i in span]).strip() == phrase
    assert condition.token_map == tuple(model.tokenizer.convert_ids_to_tokens(ids))


def test_a_phrase_not_found_names_the_prompt_and_the_phrase(model):
    with pytest.raises(LayoutValidationError, match=r"'zebra'.*A red car"):
        compute_wan_token_positions("A red car", ["zebra"], model.tokenizer)


# --------------------------------------------------------------------------------------------
# Layouts in latent time, map grid, step sizes


def test_boxes_are_resampled_to_the_latent_frames_and_masks_use_the_patch_grid(model, layout, condition):
    backbone = backbone_for(model)
    assert [backbone.guided_num_frames(f) for f in (1, 5, 9, 17, 33, 81)] == [1, 2, 3, 5, 9, 21]
    assert backbone.attention_map_sizes(480, 832) == ((30, 52),)
    assert backbone.attention_map_sizes(320, 576) == ((20, 36),)
    guidance = make_guidance(model, condition, ACTIVE)
    masks = guidance.videos[0].targets.masks_for(4 * 6)
    assert masks.masks.shape == (4, 3, 24)                          # (tokens, latent frames, h*w)
    assert np.array_equal(condition.boxes_at(3), resample_boxes(layout, 3))
    # 81 frames -> 21 latent frames: the six keyframes resampled to 21 with the layout's rule (the cat, present
    # in keyframes 0-2 only, is present in latent frames whose bin floor(q * 6) is 0, 1 or 2).
    boxes = condition.boxes_at(21)
    assert boxes.shape == (2, 21, 4)
    present = (boxes[1, :, 2] != 0).tolist()
    assert present == [bool(np.floor(q * 6) <= 2) for q in np.linspace(0, 1 - 1e-5, 21)]


def test_step_size_is_lvds_update_in_variance_preserving_coordinates():
    sigmas = torch.tensor([0.999, 0.9, 0.5, 0.1])
    c = torch.sqrt((1 - sigmas) ** 2 + sigmas ** 2)
    assert torch.allclose(compute_flow_step_sizes(sigmas), sigmas * c)
    # z = x / c is variance preserving: alpha = (1 - sigma) / c, sqrt(1 - alpha_bar) = sigma / c. An LVD step
    # z <- z - (sigma / c) dE/dz with dE/dz = c dE/dx, mapped back by x = c z, is x <- x - sigma c dE/dx.
    alpha, beta = (1 - sigmas) / c, sigmas / c
    assert torch.allclose(alpha ** 2 + beta ** 2, torch.ones(4))
    grad_x = torch.tensor([0.3, -1.0, 2.0, 0.5])
    x = torch.tensor([1.0, 2.0, -1.0, 0.0])
    z_new = x / c - beta * (c * grad_x)
    assert torch.allclose(c * z_new, x - compute_flow_step_sizes(sigmas) * grad_x)


def test_guidance_step_sizes_follow_the_schedulers_sigmas(model):
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(50)
    sizes = backbone_for(model).guidance_step_sizes(scheduler, scheduler.timesteps)
    sigma = scheduler.sigmas[:50]
    assert sizes.shape == (50,) and torch.allclose(sizes, sigma * torch.sqrt((1 - sigma) ** 2 + sigma ** 2))
    assert 0.99 < float(sizes[0]) <= 1.0 and float(sizes[-1]) < float(sizes[0])


# --------------------------------------------------------------------------------------------
# UniPC's corrector and guided edits


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corrector_erases_edits_unless_it_is_off_on_the_guided_steps(model, condition):
    measure = load_script("measure_edit_survival").measure_edit_survival
    config = dataclasses.replace(ACTIVE, max_iter=1, max_index_step=3, loss_scale=5000.0)
    sampling = dataclasses.replace(SAMPLING, num_inference_steps=20)   # the share kept shrinks with the step
    stock = measure(model.with_corrector_off_steps(0), sampling, condition, config, ExecutionConfig(), SEED)
    fixed = measure(model.with_corrector_off_steps(3), sampling, condition, config, ExecutionConfig(), SEED)
    assert [row["step"] for row in stock] == [0, 1, 2]
    assert all(row["edit_norm"] > 0 for row in stock + fixed)
    assert stock[0]["survival"] == pytest.approx(1.0, abs=0.05)          # step 0 has no corrector
    assert all(row["survival"] < 0.1 for row in stock[1:])               # corrector: most of the edit is gone
    assert all(row["survival"] == pytest.approx(1.0, abs=0.05) for row in fixed)


def test_corrector_setting_is_a_scheduler_config_and_zero_is_stock(model):
    assert build_wan_scheduler(corrector_off_steps=10).config.disable_corrector == list(range(9))
    assert build_wan_scheduler(corrector_off_steps=0).config.disable_corrector == []
    assert model.with_corrector_off_steps(10).corrector_off_steps == 10
    assert model.with_corrector_off_steps(10).make_scheduler().disable_corrector == list(range(9))
    assert model.corrector_off_steps == 0
    with pytest.raises(ValueError):
        build_wan_scheduler(corrector_off_steps=-1)


# --------------------------------------------------------------------------------------------
# Run-models, loading, configs


def test_an_offloaded_text_encoder_waits_on_the_cpu_and_encodes_the_same(model):
    offloaded = model.with_text_encoder_offload(True)
    try:
        moves = []
        handle = offloaded.text_encoder.register_forward_pre_hook(
            lambda module, args: moves.append(next(module.parameters()).device.type))
        text = backbone_for(offloaded).encode_text([PROMPT], WAN_NEGATIVE_PROMPT)
        handle.remove()
        assert moves == ["cpu", "cpu"]     # the model's device here is the CPU too: the path, not the transfer
        assert torch.equal(text.cond, model.encode([PROMPT]))
        assert offloaded.offload_text_encoder and not model.offload_text_encoder
    finally:
        model.with_text_encoder_offload(False)


def test_run_models_carry_wans_defaults():
    for name in ("wan2.1-1.3b", "lvd_wan2.1-1.3b", "wan2.1-14b", "lvd_wan2.1-14b"):
        spec = get_run_model(name)
        assert (spec.height, spec.width, spec.default_num_frames) == (480, 832, 81)
        assert (spec.num_inference_steps, spec.guidance_scale, spec.fps) == (50, 5.0, 16.0)
        assert spec.negative_prompt == WAN_NEGATIVE_PROMPT and spec.family == "wan"
    assert get_run_model("lvd_wan2.1-1.3b").guided_layers == WAN_1_3B_GUIDED_LAYERS
    assert WAN_1_3B_GUIDED_LAYERS == tuple(f"blocks.{i}.attn2" for i in (8, 10, 12, 14, 16, 18))
    assert WAN_14B_GUIDED_LAYERS == tuple(f"blocks.{i}.attn2" for i in (11, 13, 16, 19, 21, 24))
    assert get_run_model("wan2.1-1.3b").guided_layers == ()
    spec = get_run_model("lvd_wan2.1-1.3b")
    assert validate_size(spec, 320, 576) == (320, 576) and validate_num_frames(spec, 33) == 33
    with pytest.raises(RunModelError, match="multiple of 16"):
        validate_size(spec, 480, 840)
    with pytest.raises(RunModelError, match="1 \\+ 4k"):
        validate_num_frames(spec, 80)


def test_missing_weights_fail_fast_naming_the_model_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, model_id in (("lvd_wan2.1-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
                           ("wan2.1-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers")):
        started = time.perf_counter()
        with pytest.raises(MissingWeightsError, match=model_id):
            load_video_model(get_run_model(name), device="cpu", cache_dir=tmp_path)
        assert time.perf_counter() - started < 5


def test_a_saved_tiny_folder_loads_as_the_same_model(tmp_path, model):
    folder = save_tiny_wan_model(tmp_path / "wan-tiny", seed=0)
    loaded = load_video_model(SPEC, model_path=folder, device="cpu")
    assert isinstance(backbone_for(loaded), WanBackbone)
    for ours, theirs in ((model.transformer, loaded.transformer), (model.vae, loaded.vae),
                         (model.text_encoder, loaded.text_encoder)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert loaded.tokenizer(PROMPT).input_ids == model.tokenizer(PROMPT).input_ids
    assert loaded.scheduler.config.flow_shift == 3.0 and loaded.corrector_off_steps == 10   # LVD: guided steps
    assert load_video_model(get_run_model("wan_tiny"), model_path=folder, device="cpu").corrector_off_steps == 0


def test_full_size_architectures_build_on_the_meta_device():
    small = build_random_wan_model("meta", "bf16", size="1.3b", with_vae=False)
    large = build_random_wan_model("meta", "bf16", size="14b", with_vae=False)
    assert sum(p.numel() for p in small.transformer.parameters()) == 1_418_996_800
    assert len(large.transformer.blocks) == 40 and large.transformer.config.num_attention_heads == 40
    kept = {name for name, p in small.transformer.named_parameters() if p.dtype == torch.float32}
    assert kept and all(any(part in ("scale_shift_table", "time_embedder", "norm2") for part in name.split("."))
                        for name in kept)


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason="../shared/model-configs is not available")
def test_embedded_configs_equal_the_shared_hub_configs():
    def read(sub):
        data = json.loads((SHARED_CONFIGS / sub).read_text())
        return {k: v for k, v in data.items() if not k.startswith("_")}

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(WAN_1_3B_TRANSFORMER_CONFIG) == read("transformer/config.json")
    assert plain(WAN_VAE_CONFIG) == read("vae/config.json")
    assert plain(WAN_SCHEDULER_CONFIG) == read("scheduler/scheduler_config.json")
