"""The shapes world, the LVD-Shapes model folder and its training (shapes/, models/shapes.py).

- The world is a pure function of its seed; shapes are drawn exactly inside the layout's boxes (the
  boxes guidance targets), and every scene's layout is a valid layout of the project's format.
- The shipped UNet model loads by run-model name with no path, through the same code as every run-model,
  and `TextToVideoSDPipeline.from_pretrained(folder)` loads it and makes the same video as our loop.
- Training resumed from a checkpoint gives the same weights as training straight through (slow).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shapes.world import (BACKGROUNDS, COLOURS, TASKS, render_video, sample_scene, sample_video, scene_boxes)
from utils.layout import build_condition, layout_from_dict, layout_to_dict, validate_layout


def test_the_same_seed_draws_the_same_scene_and_video():
    scene, video = sample_video(11)
    again_scene, again_video = sample_video(11)
    other_scene, other_video = sample_video(12)
    assert scene == again_scene and np.array_equal(video, again_video)
    assert (scene != other_scene) and not np.array_equal(video, other_video)
    assert video.shape == (16, 64, 64, 3) and video.dtype == np.uint8


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_valid_layouts_that_round_trip(task):
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = sample_scene(rng, task)
        layout = scene.layout()
        validate_layout(layout)
        assert layout_from_dict(layout_to_dict(layout)) == layout
        assert scene.task == task and 1 <= len(scene.objects) <= 4
        # Every phrase can be located in the diffusion prompt (what guidance needs).
        from models.tokenizer import build_clip_tokenizer
        condition = build_condition(layout, 16, build_clip_tokenizer())
        assert len(condition.token_positions) == len(scene.objects)


def test_shapes_are_drawn_inside_their_boxes_and_only_there():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, "attribution", background="white") for _ in range(30)]
    scenes = [s for s in scenes if s.objects[0].colour != s.objects[1].colour][:10]  # tell objects apart by colour
    assert len(scenes) == 10
    for scene in scenes:
        video = render_video(scene)
        boxes = scene_boxes(scene)                                   # (objects, F, 4)
        for obj, track in zip(scene.objects, boxes):
            colour = np.asarray(COLOURS[obj.colour])
            for frame, box in zip(video, track):
                near = np.abs(frame.astype(int) - colour).sum(-1) < 30     # (H, W) pixels of this colour
                x0, y0, x1, y1 = (np.asarray(box) * 64)
                ys, xs = np.nonzero(near)
                assert len(xs) > 20, "the object is drawn"
                # Every pixel of the object's colour lies in its box (a pixel of slack for anti-aliasing).
                assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1


def test_visibility_scenes_hide_the_object_where_the_layout_says():
    rng = np.random.default_rng(0)
    for _ in range(6):
        scene = sample_scene(rng, "visibility", background="black")
        video = render_video(scene)
        present = scene_boxes(scene)[0].any(axis=-1)               # (F,)
        drawn = (np.abs(video.astype(int) - np.asarray(BACKGROUNDS["black"][0])).sum(-1) > 60).any(axis=(1, 2))
        assert np.array_equal(present, drawn)
        appears = " that appears " in scene.caption
        assert present[-1] == appears and present[0] != appears


def test_unknown_task_or_background_is_named():
    with pytest.raises(ValueError, match="unknown shapes task 'juggling'"):
        sample_scene(np.random.default_rng(0), "juggling")
    with pytest.raises(ValueError, match="unknown background 'plaid'"):
        sample_scene(np.random.default_rng(0), "numeracy", background="plaid")


# --------------------------------------------------------------------------------------------
# The shipped model

def _shipped_folder(run_model: str = "lvd_shapes"):
    from models.registry import get_run_model

    folder = get_run_model(run_model).bundled_folder
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"no shipped shapes weights in {folder}")  # only in a checkout without them
    return folder


@pytest.mark.parametrize("lvd_name, baseline_name", [("lvd_shapes", "baseline_shapes"),
                                                     ("lvd_wan_shapes", "wan_shapes")])
def test_shapes_run_models_load_the_shipped_weights_by_name(lvd_name, baseline_name):
    from models.attention import check_guided_layers
    from models.loading import load_video_model
    from models.registry import get_run_model
    from models.wan_attention import check_wan_guided_layers

    folder = _shipped_folder(lvd_name)
    lvd = load_video_model(get_run_model(lvd_name), device="cpu")
    baseline = load_video_model(get_run_model(baseline_name), device="cpu")
    assert lvd.source == baseline.source == str(folder)
    wan = lvd_name == "lvd_wan_shapes"
    denoiser, baseline_denoiser = (lvd.transformer, baseline.transformer) if wan else (lvd.unet, baseline.unet)
    assert denoiser.dtype == torch.float32
    # LVD's guided layers exist at the full-size family's module paths (ModelScope's six; Wan's blocks.<i>.attn2).
    (check_wan_guided_layers if wan else check_guided_layers)(denoiser, get_run_model(lvd_name).guided_layers)
    for a, b in zip(denoiser.parameters(), baseline_denoiser.parameters()):
        assert torch.equal(a, b)


def test_the_wan_shapes_tokenizer_keeps_every_caption_word_whole():
    from models.shapes import build_shapes_wan_components
    from models.wan_text import SPIECE_SPACE

    tokenizer = build_shapes_wan_components()["tokenizer"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        caption = sample_scene(rng).caption
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        expected = []
        for word in caption.split():  # "left," is the word and a comma
            expected += [SPIECE_SPACE + word.rstrip(",")] + ([","] if word.endswith(",") else [])
        assert pieces == expected + ["</s>"], caption


@pytest.mark.parametrize("run_model, family", [("lvd_shapes", "unet3d"), ("wan_shapes", "wan")])
def test_a_missing_shipped_folder_names_the_training_command(tmp_path, monkeypatch, run_model, family):
    from models import registry
    from models.hub import MissingWeightsError
    from models.loading import load_video_model

    monkeypatch.setattr(registry, "BUNDLED_WEIGHTS_DIR", tmp_path)
    with pytest.raises(MissingWeightsError, match=f"does not exist.*train_shapes.py --family {family}"):
        load_video_model(registry.get_run_model(run_model), device="cpu")
    (tmp_path / registry.get_run_model(run_model).bundled).mkdir()
    with pytest.raises(MissingWeightsError, match=f"incomplete.*train_shapes.py --family {family}"):
        load_video_model(registry.get_run_model(run_model), device="cpu")


@pytest.mark.slow
def test_the_diffusers_pipeline_loads_the_shipped_folder_and_makes_our_video():
    from diffusers import TextToVideoSDPipeline

    from generation.config import sampling_config_for
    from generation.sampling import generate_video
    from models.loading import load_video_model
    from models.registry import get_run_model

    folder = _shipped_folder()
    spec = get_run_model("baseline_shapes")
    model = load_video_model(spec, device="cpu")
    sampling = dataclasses.replace(sampling_config_for(spec), num_inference_steps=6)
    ours = generate_video(model, "a red circle moving from the left to the right", sampling, seed=4)
    pipe = TextToVideoSDPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.scheduler = model.make_scheduler()
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a red circle moving from the left to the right", negative_prompt="", num_frames=16, height=64,
                   width=64, num_inference_steps=6, guidance_scale=sampling.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(4), output_type="latent").frames
    assert torch.allclose(ours.latents, latents, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_wan_family_trains_loads_by_name_and_equals_wan_pipeline(tmp_path, monkeypatch):
    """`train_shapes.py --family wan` (1 + 1 steps) writes a folder that `lvd_wan_shapes` / `wan_shapes` load by name
    from the shipped location (Wan's guided blocks at their module paths) and that `WanPipeline.from_pretrained`
    loads and samples to our latents."""
    import importlib.util

    from diffusers import WanPipeline

    from generation.config import sampling_config_for
    from generation.sampling import generate_video
    from models import registry
    from models.loading import load_video_model
    from models.wan_attention import check_wan_guided_layers

    script = importlib.util.spec_from_file_location("train_shapes", Path(__file__).parents[1] / "scripts/train_shapes.py")
    train_shapes = importlib.util.module_from_spec(script)
    script.loader.exec_module(train_shapes)
    assert train_shapes.main(["--family", "wan", "--steps", "1", "--vae-steps", "1", "--batch-size", "1",
                              "--checkpoint-dir", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "wan")]) == 0
    monkeypatch.setattr(registry, "BUNDLED_WEIGHTS_DIR", tmp_path)
    lvd = load_video_model(registry.get_run_model("lvd_wan_shapes"), device="cpu")
    model = load_video_model(registry.get_run_model("wan_shapes"), device="cpu")
    assert lvd.source == model.source == str(tmp_path / "wan")
    assert registry.get_run_model("lvd_wan_shapes").guided_layers == tuple(f"blocks.{i}.attn2" for i in (0, 1, 2, 3))
    check_wan_guided_layers(lvd.transformer, registry.get_run_model("lvd_wan_shapes").guided_layers)
    sampling = dataclasses.replace(sampling_config_for(registry.get_run_model("wan_shapes")), num_inference_steps=4)
    prompt = "a red circle moving from the left to the right"
    ours = generate_video(model, prompt, sampling, seed=4)
    pipe = WanPipeline.from_pretrained(str(tmp_path / "wan"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt, negative_prompt="", num_frames=17, height=64, width=64, num_inference_steps=4,
                   guidance_scale=sampling.guidance_scale, generator=torch.Generator("cpu").manual_seed(4),
                   output_type="latent").frames
    assert ours.latents.shape == latents.shape == (1, 16, 5, 16, 16)
    assert torch.allclose(ours.latents, latents, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Training


def test_the_attention_term_on_a_worked_example():
    """Uniform attention over 16 cells: a box of 4 cells holds a quarter of it, so the term is -log(1/4); a frame
    without the box and a target without any box are left out."""
    import math

    from shapes.training import compute_attention_loss

    maps = {"layer": torch.full((2 * 3, 2, 16, 77), 1 / 77)}         # 2 videos x 3 frames, 2 heads, 4x4 map
    box = torch.zeros(3, 16)
    box[:2, :4] = 1                                                     # frames 0 and 1: 4 cells; frame 2: none
    targets = [(0, 5, {16: box}), (1, 7, {16: torch.zeros(3, 16)})]
    assert float(compute_attention_loss(maps, targets, 2)) == pytest.approx(-math.log(0.25 + 1e-6), rel=1e-6)
    assert float(compute_attention_loss(maps, [], 2)) == 0.0


def test_the_vae_loss_weights_the_pixels_of_objects():
    """On a drawn frame, an error on the object costs (1 + weight) times what the same error costs on the
    background; weight 0 is plain MSE; clips (B, 3, F, H, W) are weighted frame by frame."""
    from shapes.training import reconstruction_loss

    scene, video = sample_video(5, "dynamic_spatial", background="gray")
    target = torch.from_numpy(video[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    drawn = torch.from_numpy(render_video(dataclasses.replace(scene, objects=()), num_frames=1,
                                          rng=np.random.default_rng(0))).permute(0, 3, 1, 2).float() / 127.5 - 1
    on_object = (target - drawn).abs().amax(1, keepdim=True) > 0.25              # where the shape is drawn
    assert 0 < on_object.float().mean() < 0.2
    error = torch.zeros_like(target)
    error[:, 0] = 0.5
    object_cost = reconstruction_loss(target + error * on_object, target, 10.0)
    background_cost = reconstruction_loss(target + error * ~on_object, target, 10.0)
    count_object, count_background = on_object.sum(), (~on_object).sum()
    assert float(object_cost / count_object) == pytest.approx(11 * float(background_cost / count_background))
    assert float(reconstruction_loss(target + error, target, 0.0)) == pytest.approx(0.25 / 3)
    clip = target.permute(1, 0, 2, 3)[None].expand(2, 3, 4, 64, 64)
    assert float(reconstruction_loss(clip + 0.1, clip, 10.0)) == pytest.approx(
        float(reconstruction_loss(target + 0.1, target, 10.0)))


@pytest.mark.parametrize("family", ["unet3d", "wan"])
def test_a_video_through_the_vae_keeps_its_shape_and_type(family):
    from shapes.measure import reconstruct_video

    if family == "wan":
        from diffusers import AutoencoderKLWan
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                               attn_scales=[])
        num_frames = 5
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
        num_frames = 3
    frames = sample_video(1, num_frames=num_frames)[1]
    out = reconstruct_video(vae.eval(), frames)
    assert out.shape == frames.shape and out.dtype == np.uint8


@pytest.mark.slow
def test_a_wan_step_trains_the_text_side_of_the_guided_layers():
    """The Wan denoiser step records its guided layers with the text keys in the graph (a guided pass at sampling
    time caches them as constants): the attention term reaches the text encoder and each guided block's to_k."""
    from models.registry import SHAPES_WAN_TRAINED_LAYERS
    from models.shapes import build_shapes_wan_components
    from shapes.training import TrainConfig, _step_generator, wan_denoiser_step

    components = build_shapes_wan_components(0)
    config = TrainConfig(batch_size=1, caption_dropout=0.0)
    rng, generator = _step_generator(0, "denoiser", 0)
    total, flow, attention = wan_denoiser_step(components, rng, generator, config, 0, 0)
    assert flow > 0 and attention > 0
    total.backward()
    assert components["text_encoder"].shared.weight.grad.abs().sum() > 0
    for name in SHAPES_WAN_TRAINED_LAYERS:
        assert components["transformer"].get_submodule(name).to_k.weight.grad.abs().sum() > 0, name


def test_each_family_starts_from_its_recipe_and_flags_win():
    from shapes.training import TrainConfig, train_config

    assert train_config("unet3d") == TrainConfig()
    wan = train_config("wan", seed=3, batch_size=None)
    assert (wan.vae_lr, wan.lr, wan.seed, wan.batch_size) == (1e-3, 3e-4, 3, TrainConfig().batch_size)
    assert train_config("wan", vae_lr=2e-4).vae_lr == 2e-4
    with pytest.raises(ValueError, match="unknown family 'dit'; expected one of unet3d, wan"):
        train_config("dit")


def test_a_time_budget_anneals_the_learning_rate_by_the_clock():
    from shapes.training import TrainConfig, learning_rate

    config = TrainConfig(steps=100000, warmup_steps=10, denoiser_minutes=2.0)
    assert learning_rate(config, 5, 1.0, 0.0) == pytest.approx(0.6)              # warm-up still counts steps
    assert learning_rate(config, 500, 1.0, 60.0) == pytest.approx(0.55)          # half the budget: halfway down
    assert learning_rate(config, 900, 1.0, 120.0) == pytest.approx(0.1)          # spent: the floor
    assert learning_rate(TrainConfig(steps=110, warmup_steps=10), 60, 1.0, 60.0) == pytest.approx(0.55)  # by steps



@pytest.mark.slow
def test_training_resumed_from_a_checkpoint_equals_training_straight_through(tmp_path):
    from models.shapes import build_shapes_unet3d_components
    from shapes.training import TrainConfig, train_shapes_model

    config = TrainConfig(vae_steps=2, vae_batch_frames=2, steps=2, batch_size=1, checkpoint_every=1, warmup_steps=1)
    straight = build_shapes_unet3d_components(0)
    state = train_shapes_model(straight, config, tmp_path / "straight")
    assert state.stage == "done" and len(state.losses["denoiser"]) == 2

    resumed = build_shapes_unet3d_components(0)
    # Stop right after the VAE stage (a time budget of 0 s stops after the first step), then resume.
    first = train_shapes_model(resumed, config, tmp_path / "resumed", max_seconds=0.0)
    assert first.stage == "vae" and first.step == 1
    again = build_shapes_unet3d_components(0)   # a fresh process: weights come from the checkpoint
    final = train_shapes_model(again, config, tmp_path / "resumed")
    assert final.stage == "done"
    for name in ("unet", "vae", "text_encoder"):
        for (key, a), b in zip(straight[name].state_dict().items(), again[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs after resuming"
    assert final.losses["denoiser"] == state.losses["denoiser"]

    # --workers: the videos drawn by other processes make the same batches, so the same model.
    pooled = build_shapes_unet3d_components(0)
    assert train_shapes_model(pooled, config, tmp_path / "pooled", workers=2).losses == state.losses
    for name in ("unet", "vae", "text_encoder"):
        for (key, a), b in zip(straight[name].state_dict().items(), pooled[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs when other processes draw the videos"

    # --stop-after-step: a partly trained model on the full run's schedule (how the shipped one is remade).
    partial = build_shapes_unet3d_components(0)
    stopped = train_shapes_model(partial, config, tmp_path / "partial", stop_after_step=1)
    assert (stopped.stage, stopped.step) == ("denoiser", 1)
    assert stopped.losses["denoiser"] == state.losses["denoiser"][:1]
    assert train_shapes_model(partial, config, tmp_path / "partial", stop_after_step=1).step == 1  # rerun: no more steps



def test_min_snr_weighting_is_refused_for_the_flow_matching_family():
    from shapes.training import train_config

    assert train_config("unet3d", snr_gamma=5.0).snr_gamma == 5.0
    with pytest.raises(ValueError, match="min-SNR weighting is defined here for the UNet's epsilon objective only"):
        train_config("wan", snr_gamma=5.0)


def test_min_snr_weighs_the_fitted_loss_and_reports_the_plain_epsilon_loss():
    """The first training step whose batch has a timestep with SNR > 5: there min-SNR-5 lowers the fitted loss by
    more than rounding (every weight min(SNR, 5) / SNR is at most 1, below 1 there) and reports the plain one."""
    from models.shapes import build_shapes_unet3d_components
    from shapes.training import TrainConfig, _ddpm_scheduler, _step_generator, denoiser_step

    components = build_shapes_unet3d_components(0)

    def run(gamma: float, step: int):
        scheduler, drawn = _ddpm_scheduler(), []
        add_noise = scheduler.add_noise

        def recording_add_noise(latents, noise, timesteps):   # the step's timesteps, to know their SNR
            drawn.append(timesteps)
            return add_noise(latents, noise, timesteps)

        scheduler.add_noise = recording_add_noise
        config = TrainConfig(batch_size=2, attention_loss_weight=0.0, snr_gamma=gamma)
        rng, generator = _step_generator(0, "denoiser", step)
        total, epsilon, _ = denoiser_step(components, scheduler, rng, generator, config, 0, step)
        alphas = scheduler.alphas_cumprod[drawn[0]]
        return float(total.detach()), epsilon, float((alphas / (1 - alphas)).max())

    step = next(step for step in range(20) if run(0.0, step)[2] > 5)
    (plain_total, plain_eps, _), (weighted_total, weighted_eps, _) = run(0.0, step), run(5.0, step)
    assert weighted_eps == plain_eps and plain_total == pytest.approx(plain_eps, rel=1e-6)
    assert weighted_total < plain_total * (1 - 1e-3)


def test_the_held_out_loss_script_scores_the_shipped_unet_and_refuses_other_folders(tmp_path, capsys):
    from models.video_model import load_components_from_folder
    from shapes.training import HELD_OUT_TIMESTEPS, held_out_epsilon_loss
    from tests.eval_run_fixtures import load_script

    folder = _shipped_folder()
    script = load_script("shapes_loss")
    assert script.main([str(folder), "--videos", "4"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].strip("| ").split(" | ")
    direct = held_out_epsilon_loss(load_components_from_folder(folder, torch.float32), num_videos=4)
    assert [float(v) for v in row[1:-1]] == pytest.approx([direct[t] for t in HELD_OUT_TIMESTEPS], abs=1e-4)
    assert 0 < direct[950] < direct[50] < 1   # a trained model: near-clean latents are the hardest to denoise

    assert script.main([str(tmp_path), "--videos", "4"]) == 2
    assert "expected a folder written by `python scripts/train_shapes.py --family unet3d`" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_resumed_in_the_denoiser_stage_equals_one_straight_through(tmp_path):
    from models.shapes import build_shapes_unet3d_components
    from shapes.training import TrainConfig, train_shapes_model

    config = TrainConfig(vae_steps=1, vae_batch_frames=2, steps=3, batch_size=1, checkpoint_every=1, warmup_steps=1,
                         snr_gamma=5.0)
    straight = build_shapes_unet3d_components(0)
    assert train_shapes_model(straight, config, tmp_path / "straight").stage == "done"

    first = build_shapes_unet3d_components(0)
    assert train_shapes_model(first, config, tmp_path / "resumed", stop_after_step=1).step == 1
    again = build_shapes_unet3d_components(0)   # a fresh process: the weights come from the checkpoint
    assert train_shapes_model(again, config, tmp_path / "resumed").stage == "done"
    # The latent scale measured after the VAE stage lives in its config: a resumed run must get it back.
    assert again["vae"].config.scaling_factor == straight["vae"].config.scaling_factor != 1.0
    for name in ("unet", "text_encoder"):
        for (key, a), b in zip(straight[name].state_dict().items(), again[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs after resuming"


# --------------------------------------------------------------------------------------------
# The effect: LVD moves the shapes into their boxes


# Dynamic-spatial and sequential prompts of --prompt-type shapes: where the layout decides where things go.
EFFECT_PROMPT_INDICES = (60, 61, 62, 63, 80, 81, 82, 83)


@pytest.mark.slow
def test_lvd_follows_the_layout_better_than_the_baseline_on_shapes_prompts():
    """Both arms from the shipped weights, same seeds, the shapes preset; per video, LVD's mIoU to the planned
    box minus the baseline's must be positive by more than twice its standard error (a paired test). mIoU is
    measured on the largest salient blob (`shapes.measure.compute_salient_miou`): colour-blind, so it also reads
    a partly trained model; the detector-based figures are in docs/BENCHMARKS.md (scripts/bench_shapes.py)."""
    from generation.backbones import backbone_for
    from generation.config import sampling_config_for, shapes_preset
    from generation.sampling import VideoRequest, generate_videos
    from models.loading import load_video_model
    from models.registry import get_run_model
    from prompt import get_prompt_entries
    from shapes.measure import compute_salient_miou, paired_difference
    from shapes.planner import plan_scene

    _shipped_folder()
    spec = get_run_model("lvd_shapes")
    model = load_video_model(spec, device="cpu")
    sampling = sampling_config_for(spec)
    backbone = backbone_for(model)
    entries = get_prompt_entries("shapes")
    scenes = {index: plan_scene(entries[index][0]) for index in EFFECT_PROMPT_INDICES}
    assert all(len(scene.objects) == 1 for scene in scenes.values())
    lvd = generate_videos(model, [VideoRequest(entries[i][0], i, backbone.build_condition(scenes[i].layout(), 16))
                                  for i in EFFECT_PROMPT_INDICES], sampling, guidance=shapes_preset())
    baseline = generate_videos(model, [VideoRequest(entries[i][0], i) for i in EFFECT_PROMPT_INDICES], sampling)
    guided = [compute_salient_miou(scenes[i], video.frames) for video, i in zip(lvd, EFFECT_PROMPT_INDICES)]
    unguided = [compute_salient_miou(scenes[i], video.frames) for video, i in zip(baseline, EFFECT_PROMPT_INDICES)]
    mean, se = paired_difference(unguided, guided)
    assert mean > 2 * se, f"LVD - baseline mIoU per video: {np.round(np.subtract(guided, unguided), 3)}"


# --------------------------------------------------------------------------------------------
# The comparison animation (generate.py --compare-baseline)


def test_compare_baseline_writes_baseline_lvd_and_boxes_side_by_side(tiny_model, tmp_path):
    import dataclasses as dc

    from generation.backbones import backbone_for
    from generation.config import GuidanceConfig, sampling_config_for
    from generation.runs import OutputOptions, VideoJob, comparison_path, generate_and_save, is_video_done
    from generation.sampling import generate_video
    from models.registry import get_run_model
    from utils.layout import Box, ObjectTrack, SceneLayout
    from utils.video_io import load_video

    sampling = dc.replace(sampling_config_for(get_run_model("lvd_tiny")), num_inference_steps=3, num_frames=4)
    car = ObjectTrack(0, "red car", tuple(Box(0.1 + 0.1 * i, 0.3, 0.5 + 0.1 * i, 0.7) for i in range(6)))
    layout = SceneLayout("a red car driving", "street", (car,))
    condition = backbone_for(tiny_model).build_condition(layout, 4)
    options = OutputOptions(formats=("joblib",), compare_baseline=True)
    job = VideoJob(0, "a red car driving", 0, 5, condition, tmp_path)
    generate_and_save(tiny_model, [job], sampling, guidance=GuidanceConfig(max_index_step=1), options=options)
    assert is_video_done(tmp_path, 0, options) and comparison_path(tmp_path, 0).is_file()
    assert not is_video_done(tmp_path, 0, dc.replace(options, formats=("joblib", "gif")))
    compare = load_video(comparison_path(tmp_path, 0))          # (F, title + 256, 3 * 256, 3)
    assert compare.shape[0] == 4 and compare.shape[2] == 3 * 256
    baseline = generate_video(tiny_model, "a red car driving", sampling, 5).frames   # the prompt as is, same seed
    factor = 256 // baseline.shape[1]
    enlarged = baseline.repeat(factor, axis=1).repeat(factor, axis=2)
    title = compare.shape[1] - 256
    # GIF palettes quantise colours: compare loosely, but far closer than to the LVD panel's own frames.
    first_panel = compare[:, title:, :256].astype(int)
    assert np.abs(first_panel - enlarged).mean() < 12
    lvd = load_video(tmp_path / "video_0.joblib").repeat(factor, axis=1).repeat(factor, axis=2)
    assert np.abs(compare[:, title:, 256:512].astype(int) - lvd).mean() < 12


def test_the_studio_opens_on_the_shapes_model_its_cache_and_tuned_guidance(tmp_path):
    pytest.importorskip("gradio")
    import shutil

    from studio import backend, ui
    from studio_fixtures import studio_settings

    _shipped_folder()
    settings = studio_settings(tmp_path)
    shutil.copy("cache/cache_shapes_v0.1_rule-based.json", settings.cache_dir)
    studio = ui.Studio(settings)
    assert studio.default_run_model() == "lvd_shapes"
    assert studio.default_cache() == "cache_shapes_v0.1_rule-based.json"
    assert backend.default_preset("lvd_shapes") == backend.PRESET_SHAPES
    assert backend.default_preset("lvd_tiny") == backend.PRESET_PAPER
    values = backend.guidance_preset_values(backend.PRESET_SHAPES, "lvd_shapes")
    assert values["loss_threshold"] == 0.0 and values["loss_scale"] == 20.0
    values = backend.guidance_preset_values(backend.PRESET_SHAPES, "lvd_wan_shapes")
    assert values["loss_threshold"] == 0.0 and values["loss_scale"] == 300.0
    # The opening prompt has a layout in that cache.
    plan = backend.plan_from_cache(settings.cache_dir / "cache_shapes_v0.1_rule-based.json",
                                   backend.opening_prompt("lvd_shapes"))
    assert [track.phrase for track in plan.layout.tracks] == ["green square"]


@pytest.mark.slow
def test_training_continues_from_an_exported_folder(tmp_path):
    from models.shapes import build_shapes_unet3d_components, save_unet3d_pipeline_folder
    from shapes.training import TrainConfig, load_exported_model, train_shapes_model, write_model_card

    config = TrainConfig(vae_steps=1, vae_batch_frames=2, steps=3, batch_size=1, warmup_steps=1)
    components = build_shapes_unet3d_components(0)
    state = train_shapes_model(components, config, tmp_path / "ck", max_seconds=0.0)   # the VAE step
    state = train_shapes_model(components, config, tmp_path / "ck", max_seconds=0.0)   # one denoiser step
    assert (state.stage, state.step) == ("denoiser", 1)
    state.denoiser_seconds = 600.0   # as after a 10-minute budget: a continued run's schedule must go on from it
    save_unet3d_pipeline_folder(tmp_path / "out", components)
    write_model_card(tmp_path / "out", family="unet3d", config=config, state=state, num_parameters={},
                     device="cpu", threads=1)
    fresh = build_shapes_unet3d_components(0)
    restored = load_exported_model(tmp_path / "out", fresh)
    assert (restored.stage, restored.step) == ("denoiser", 1) and len(restored.losses["denoiser"]) == 1
    assert restored.denoiser_seconds == pytest.approx(600.0)
    assert torch.equal(fresh["unet"].conv_in.weight, components["unet"].conv_in.weight)
    assert fresh["vae"].config.scaling_factor == components["vae"].config.scaling_factor
    final = train_shapes_model(fresh, config, tmp_path / "ck2", init_from=tmp_path / "out")
    assert final.stage == "done" and final.step == 3 and len(final.losses["denoiser"]) == 3
    (tmp_path / "continued").mkdir()
    write_model_card(tmp_path / "continued", family="unet3d", config=config, state=final, num_parameters={},
                     device="cpu", threads=1)
    card = (tmp_path / "continued" / "README.md").read_text()
    assert "trained from nothing" not in card and f"--init-from {tmp_path / 'out'}" in card


def test_the_studio_opens_on_the_run_model_asked_for(tmp_path):
    pytest.importorskip("gradio")
    import dataclasses as dc

    from studio import ui
    from studio.backend import StudioError
    from studio_fixtures import studio_settings

    settings = dc.replace(studio_settings(tmp_path), opening_run_model="lvd_tiny")
    studio = ui.Studio(settings)
    assert studio.default_run_model() == "lvd_tiny" and studio.default_cache() == "cache_demo_v0.1_handwritten.json"
    with pytest.raises(StudioError, match="not available here"):
        ui.Studio(dc.replace(settings, opening_run_model="lvd_zeroscope")).default_run_model()


def test_training_on_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "train_shapes.py")
    train_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_shapes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "tpu"):
        code = train_shapes.main(["--device", device, "--checkpoint-dir", str(tmp_path / "c"), "--out",
                                  str(tmp_path / "o")])
        assert code == 2
        assert f"--device {device}: expected cpu, or cuda[:N] on a machine with CUDA" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()



def test_the_model_card_names_the_command_that_retrains_it():
    """The card's command, parsed by train_shapes.py, gives back the config that trained the model."""
    import importlib.util
    import shlex

    from shapes.training import train_config, training_command

    spec = importlib.util.spec_from_file_location("train_shapes", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "train_shapes.py")
    train_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_shapes)
    for family, overrides, threads in [("unet3d", {"steps": 100000, "denoiser_minutes": 90.0}, 2),
                                       ("wan", {"seed": 3, "vae_lr": 5e-4, "batch_size": 2}, 1)]:
        config = train_config(family, **overrides)
        command = training_command(family, config, threads)
        args = train_shapes.parse_args(shlex.split(command)[2:])
        again = train_config(args.family, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                             batch_size=args.batch_size, attention_loss_weight=args.attention_loss_weight,
                             lr=args.lr, vae_lr=args.vae_lr, denoiser_minutes=args.denoiser_minutes,
                             checkpoint_every=args.checkpoint_every)
        assert (again, args.threads) == (config, threads), command
    assert training_command("wan", train_config("wan"), 1) == "python scripts/train_shapes.py --family wan"

@pytest.mark.slow
def test_the_gpu_training_script_runs_on_the_cpu_and_packs_what_comes_back(tmp_path):
    """scripts/gpu_train_shapes.sh, the device tool's one command, as a CPU dry run (2 + 2 steps of both families
    at once, no benchmark): it trains, exports and packs each pipeline folder into two tars under the 16 MiB a file
    may bring back."""
    import os
    import subprocess
    import sys
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, GPU_TRAIN_DIR=str(tmp_path / "work"),
               GPU_BENCH_DIR=str(tmp_path / "no-wheels"))
    result = subprocess.run(["bash", "scripts/gpu_train_shapes.sh", str(tmp_path / "out"), "--device", "cpu",
                             "--workers", "1", "--steps", "2", "--vae-steps", "2", "--batch-size", "1"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {"unet3d": ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                           "text_encoder/model.safetensors", "training.json", "model_index.json"),
                "wan": ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                        "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "training.json")}
    for family, files in expected.items():
        names = set()
        for part in ("denoiser", "rest"):
            path = tmp_path / "out" / f"{family}_{part}.tar"
            assert path.stat().st_size < 16 * 2 ** 20
            with tarfile.open(path) as tar:
                names |= set(tar.getnames())
        assert {f"{family}/{name}" for name in files} <= names, family
        assert "wrote" in (tmp_path / "out" / f"train_{family}.log").read_text()


# The shapes benchmark's comparison of two runs (scripts/bench_shapes.py --compare)


def _bench_results(per_video_by_arm: dict) -> dict:
    return {"family": "unet3d", "results": {arm: {"per_video": videos} for arm, videos in per_video_by_arm.items()}}


def test_the_paired_difference_is_the_mean_of_the_differences_with_their_standard_error():
    from shapes.measure import paired_difference

    mean, se = paired_difference([1.0, 1.0, 2.0], [2.0, 3.0, 5.0])  # differences 1, 2, 3
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0 / np.sqrt(3.0))
    mean, se = paired_difference([0.5], [0.25])
    assert mean == pytest.approx(-0.25) and np.isnan(se)


def test_bench_flags_reach_every_generate_command_after_the_arms_own(tmp_path, monkeypatch):
    from tests.eval_run_fixtures import load_script

    bench = load_script("bench_shapes")
    args = bench.parse_args(["--family", "wan", "--per-task", "1", "--out", str(tmp_path),
                             "--flags", "--guided-blocks 1 2 --loss_scale 40"])
    commands = []
    monkeypatch.setattr(bench, "run", lambda command, threads: commands.append(command))
    (tmp_path / "lvd-tuned" / "imgs_x" / "run0").mkdir(parents=True)
    bench.generate_arm("lvd-tuned", "lvd_wan_shapes", bench.arm_flags("lvd-tuned", "wan"), args)
    assert len(commands) == len(bench.TASKS)
    for command in commands:
        assert command[-9:] == ["--loss_scale", "300", "--loss_threshold", "0", "--guided-blocks", "1", "2",
                                "--loss_scale", "40"]


def test_the_tuned_arms_take_their_familys_preset():
    from tests.eval_run_fixtures import load_script

    bench = load_script("bench_shapes")
    assert bench.arm_flags("lvd-tuned", "unet3d") == ["--loss_scale", "20", "--loss_threshold", "0"]
    assert bench.arm_flags("mask+lvd-tuned", "wan") == ["--control", "mask", "energy", "--loss_scale", "300",
                                                        "--loss_threshold", "0"]
    assert bench.arm_flags("mask", "wan") == ["--control", "mask"]


def test_two_runs_compare_prompt_by_prompt_with_a_standard_error():
    from tests.eval_run_fixtures import load_script

    bench = load_script("bench_shapes")

    def video(index, objects, followed, miou, task_success=True):
        return {"index": index, "objects": objects, "followed": followed, "miou": miou,
                "salient_miou": miou if objects == 1 else None, "task_success": task_success}

    a = _bench_results({"lvd": [video(0, 1, False, 0.1), video(1, 1, False, 0.2), video(2, 2, True, 0.3),
                                video(3, 1, True, 0.4)],
                        "baseline": [video(0, 1, True, 0.0)]})
    b = _bench_results({"lvd": [video(0, 1, True, 0.5), video(1, 1, True, 0.6), video(2, 2, True, 0.7),
                                video(3, 1, True, 0.8)],
                        "mask": [video(0, 1, True, 0.0)]})
    rows = {(r["arm"], r["measure"]): r for r in bench.compare_results(a, b)}
    assert {arm for arm, _ in rows} == {"lvd"}                      # only arms both runs have
    single = rows["lvd", "single-object prompt following"]
    assert single["videos"] == 3 and single["a"] == pytest.approx(1 / 3) and single["b"] == 1.0
    # Differences (1, 1, 0): mean 2/3, sample std 0.577, SE 0.333; 2/3 <= 2 x 0.333 is (just) noise.
    assert single["difference"] == pytest.approx(2 / 3) and single["se"] == pytest.approx(1 / 3)
    assert single["within_noise"]
    # Every prompt gains exactly 0.4: the difference is certain, far outside noise.
    miou = rows["lvd", "mIoU"]
    assert miou["videos"] == 4 and miou["difference"] == pytest.approx(0.4) and miou["se"] == pytest.approx(0, abs=1e-12)
    assert not miou["within_noise"]
    assert rows["lvd", "salient mIoU (1 object)"]["videos"] == 3
    assert rows["lvd", "five-task accuracy"]["difference"] == 0 and rows["lvd", "five-task accuracy"]["within_noise"]

    del b["results"]["lvd"]["per_video"]
    with pytest.raises(ValueError, match="no per-video figures.*rerun bench_shapes.py with the same --out"):
        bench.compare_results(a, b)


@pytest.mark.slow
def test_the_benchmark_records_every_video_and_compares_a_run_with_itself(tmp_path, capsys):
    """The reconstruction arm (the shipped VAE over the planned scenes: no sampling, seconds) end to end."""
    from tests.eval_run_fixtures import load_script

    _shipped_folder()
    bench = load_script("bench_shapes")
    assert bench.main(["--arms", "reconstruction", "--per-task", "1", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    videos = results["results"]["reconstruction"]["per_video"]
    assert [v["index"] for v in videos] == [0, 20, 40, 60, 80]
    assert all(0 <= v["miou"] <= 1 for v in videos) and all(isinstance(v["followed"], bool) for v in videos)
    following = results["results"]["reconstruction"]["prompt_following"]["all"]
    assert following["followed"] == sum(v["followed"] for v in videos) and following["total"] == 5
    single = [v for v in videos if v["objects"] == 1]
    single_following = results["results"]["reconstruction"]["prompt_following"]["single_object"]
    assert single and single_following["total"] == len(single)
    for key in ("main", "main_colour", "main_shape"):
        assert single_following[key] == sum(v[key] for v in single)
    assert all(v["main_colour"] and v["main_shape"] for v in single if v["main"])   # the main object needs both
    assert all(v["followed"] for v in videos if v["main"])                         # stricter than following
    assert all(v["colour_asked"] in COLOURS and v["colour_drawn"] in (*COLOURS, "none") for v in single)
    confusion = (tmp_path / "run" / "results.md").read_text().split("asked: drawn (videos):")[1]
    assert sum(int(n) for n in re.findall(r" (\d+)(?=[,;\n])", confusion)) == len(single)
    capsys.readouterr()
    assert bench.main(["--compare", str(tmp_path / "run"), str(tmp_path / "run" / "results.json")]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| reconstruction |")]
    assert len(rows) == 8 and all(" +0.000 | 0.000 | yes |" in row for row in rows)   # no task verdicts: 8 measures
    with pytest.raises(FileNotFoundError, match="expected a bench_shapes.py --out folder"):
        bench.main(["--compare", str(tmp_path / "run"), str(tmp_path / "nothing")])
