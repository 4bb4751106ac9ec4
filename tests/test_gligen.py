"""LVD-GLIGEN / LVD-plus: the grounded UNet3D (models/gligen.py) and its sampling path, on tiny models.

Spec: LVD-REFERENCE.md 1.5 (run-models), 4.7 (guided passes get no GLIGEN objects), 6 (conditioning
tensors, scheduled sampling, fusers in spatial blocks only), 13 (fork vs stock).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import generate
from generation.backbones import backbone_for
from generation.backbones.unet3d import prepare_latents
from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig
from generation.guidance import compute_step_sizes, guidance_step
from generation.lvd import build_layout_guidance, make_layout_energy_fn
from generation.sampling import generate_video
from models import tiny
from models.gligen import (MAX_OBJECTS, GligenConfig, GroundedModelError, build_gligen_inputs,
                           build_grounded_unet, compute_gligen_objects, count_grounded_steps, encode_phrases,
                           fuser_modules, gligen_parameter_names, is_grounded, load_grounded_unet,
                           spatial_transformer_block_paths, stack_cfg_gligen_inputs, temporal_transformer_paths,
                           validate_grounded_config)
from models.hub import MissingWeightsError
from models.loading import load_video_model
from models.registry import LVD_GUIDED_LAYERS, get_run_model
from utils.layout import Box, ObjectTrack, SceneLayout, build_condition

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO.parent / "shared" / "model-configs"
MS_CONFIG_DIR = MODEL_CONFIGS / "damo-vilab__text-to-video-ms-1.7b"
ZS_CONFIG_DIR = MODEL_CONFIGS / "cerspense__zeroscope_v2_576w"
needs_shared = pytest.mark.skipif(not MS_CONFIG_DIR.is_dir(), reason="needs ../shared/model-configs (absent in CI)")

SAMPLING = SamplingConfig(height=64, width=64, num_frames=4, num_inference_steps=4)
SEED = 5
# diffusers' GLIGEN parameter names (BasicTransformerBlock.fuser, UNet2DConditionModel.position_net).
FUSER_KEY = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.0\.fuser\."
                       r"(linear|attn|ff|norm1|norm2|alpha_attn|alpha_dense)")


@pytest.fixture(scope="module")
def stock_model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def grounded_model(tiny_grounded_model):
    return tiny_grounded_model


@pytest.fixture(scope="module")
def condition(stock_model):
    car = ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.8) for i in range(6)))
    cat = ObjectTrack(1, "blue cat", (None, None, Box(0.5, 0.1, 0.9, 0.5), Box(0.5, 0.1, 0.9, 0.5),
                                      Box(0.4, 0.1, 0.8, 0.5), Box(0.3, 0.1, 0.7, 0.5)))
    layout = SceneLayout("A red car and a blue cat", "street", (car, cat))
    return build_condition(layout, SAMPLING.num_frames, stock_model.tokenizer)


def _unet_inputs(num_frames: int = 3):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, num_frames, 8, 8, generator=generator)          # [uncond; cond]
    text = torch.randn(2, 77, tiny.TINY_TEXT_HIDDEN_SIZE, generator=generator)
    return sample, torch.tensor(500), text


def _objects(unet, boxes_xyxy: np.ndarray) -> torch.Tensor:
    """(2F, 30, C) objects of one track with fixed phrase features and the given (1, F, 4) boxes."""
    phrase = torch.linspace(-1, 1, tiny.TINY_TEXT_HIDDEN_SIZE)[None]
    return compute_gligen_objects(unet, stack_cfg_gligen_inputs(build_gligen_inputs(boxes_xyxy, phrase)))


def _forward(unet, sample, timestep, text, cross_attention_kwargs=None) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False)[0]


# --- architecture and names ------------------------------------------------------------------------


def test_fusers_sit_in_spatial_blocks_only_with_diffusers_gligen_names():
    unet = tiny.build_tiny_grounded_unet(0)
    spatial = spatial_transformer_block_paths(unet)
    assert len(spatial) == 16 and set(fuser_modules(unet)) == set(spatial)   # 6 down, 1 mid, 9 up
    assert "mid_block.attentions.0.transformer_blocks.0" in spatial
    assert all("temp_attentions" not in path and not path.startswith("transformer_in") for path in spatial)
    assert "transformer_in" in temporal_transformer_paths(unet) and len(temporal_transformer_paths(unet)) == 17
    names = gligen_parameter_names(unet)
    fuser_names = [n for n in names if ".fuser." in n]
    assert fuser_names and all(FUSER_KEY.match(n) for n in fuser_names)
    assert {n for n in names if n not in fuser_names} == {
        "position_net.null_positive_feature", "position_net.null_position_feature",
        *(f"position_net.linears.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))}
    assert unet.config.attention_type == "gated" and is_grounded(unet)
    assert not is_grounded(tiny.build_tiny_unet(0))

    # The names and shapes diffusers itself gives a gated UNet (UNet2DConditionModel, attention_type="gated").
    reference = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=tiny.TINY_TEXT_HIDDEN_SIZE, attention_head_dim=8, attention_type="gated")
    ours, theirs = unet.state_dict(), reference.state_dict()
    block = "down_blocks.0.attentions.0.transformer_blocks.0.fuser."   # 16 channels in both
    ours_fuser = {k[len(block):]: tuple(v.shape) for k, v in ours.items() if k.startswith(block)}
    theirs_fuser = {k[len(block):]: tuple(v.shape) for k, v in theirs.items() if k.startswith(block)}
    assert ours_fuser == theirs_fuser
    assert {k.split(".fuser.")[1] for k in fuser_names} == {k.split(".fuser.")[1] for k in theirs if ".fuser." in k}
    assert ({k: tuple(v.shape) for k, v in ours.items() if k.startswith("position_net.")}
            == {k: tuple(v.shape) for k, v in theirs.items() if k.startswith("position_net.")})


def test_stock_part_of_the_tiny_grounded_unet_is_the_tiny_unet():
    grounded, stock = tiny.build_tiny_grounded_unet(0).state_dict(), tiny.build_tiny_unet(0).state_dict()
    assert set(stock) == {k for k in grounded if not k.startswith("position_net.") and ".fuser." not in k}
    assert all(torch.equal(grounded[k], stock[k]) for k in stock)
    gates = [v.item() for k, v in grounded.items() if k.endswith(("alpha_attn", "alpha_dense"))]
    assert gates and set(gates) == {tiny.TINY_FUSER_GATE}


def test_config_checks_name_what_was_found():
    config = {"cross_attention_dim": 1024}
    with pytest.raises(GroundedModelError, match="attention_type 'gated'.*found attention_type None"):
        validate_grounded_config(config, "unet/config.json")
    with pytest.raises(GroundedModelError, match="cross_attention_dim 1024.*found 32"):
        validate_grounded_config({"attention_type": "gated", "cross_attention_dim": 32}, "x")
    validate_grounded_config({"attention_type": "gated", "cross_attention_dim": 1024}, "x")
    with pytest.raises(GroundedModelError, match="gated-text-image"):
        build_grounded_unet({**tiny.TINY_UNET_CONFIG, "attention_type": "gated-text-image"})
    with pytest.raises(ValueError, match="in \\[0, 1\\].*1.5"):
        GligenConfig(scheduled_sampling_beta=1.5)


# --- forward behaviour ------------------------------------------------------------------------------


def test_zero_gates_equal_the_stock_unet():
    sample, timestep, text = _unet_inputs()
    stock = tiny.build_tiny_unet(0)
    grounded = build_grounded_unet(tiny.TINY_UNET_CONFIG)     # diffusers' init: gates 0
    grounded.load_state_dict({**grounded.state_dict(), **stock.state_dict()})
    boxes = np.array([[[0.1, 0.1, 0.6, 0.6]] * 3])
    expected = _forward(stock, sample, timestep, text)
    objects = {"gligen": {"objs": _objects(grounded, boxes)}}
    assert torch.equal(_forward(grounded, sample, timestep, text, objects), expected)
    # With active gates, no objects (the guided passes) also leaves the stock output.
    active = tiny.build_tiny_grounded_unet(0)
    assert torch.equal(_forward(active, sample, timestep, text), expected)


def test_active_gates_change_the_output_and_depend_on_the_boxes():
    sample, timestep, text = _unet_inputs()
    unet = tiny.build_tiny_grounded_unet(0)
    stock = _forward(unet, sample, timestep, text)
    left_objects = _objects(unet, np.array([[[0.0, 0.1, 0.4, 0.5]] * 3]))
    right_objects = _objects(unet, np.array([[[0.5, 0.4, 1.0, 0.9]] * 3]))
    left = _forward(unet, sample, timestep, text, {"gligen": {"objs": left_objects}})
    right = _forward(unet, sample, timestep, text, {"gligen": {"objs": right_objects}})
    assert torch.isfinite(left).all()
    assert (left - stock).abs().max() > 1e-3 and (left - right).abs().max() > 1e-3
    # The unconditional half has no objects (masks 0): its rows see only the null features.
    assert torch.equal(left[0], right[0]) and not torch.equal(left[1], right[1])


def test_gligen_entry_reaches_fusers_but_never_temporal_blocks_and_the_callers_dict_is_unchanged():
    sample, timestep, text = _unet_inputs()
    unet = tiny.build_tiny_grounded_unet(0)
    seen: dict[str, list] = {"temporal": [], "fuser": []}
    handles = []
    for path in temporal_transformer_paths(unet):
        block = unet.get_submodule(path).transformer_blocks[0]
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw: seen["temporal"].append(dict(kw.get("cross_attention_kwargs") or {})), with_kwargs=True))
    for fuser in fuser_modules(unet).values():
        handles.append(fuser.register_forward_pre_hook(lambda m, a: seen["fuser"].append(a[1].shape)))
    objects = _objects(unet, np.array([[[0.1, 0.1, 0.6, 0.6]] * 3]))
    kwargs = {"gligen": {"objs": objects}, "other": 1}
    _forward(unet, sample, timestep, text, kwargs)
    for handle in handles:
        handle.remove()
    assert kwargs == {"gligen": {"objs": objects}, "other": 1} and kwargs["gligen"]["objs"] is objects
    assert len(seen["temporal"]) == 17 and all(kw == {"other": 1} for kw in seen["temporal"])
    assert seen["fuser"] == [torch.Size([6, MAX_OBJECTS, tiny.TINY_TEXT_HIDDEN_SIZE])] * 16


# --- conditioning tensors ---------------------------------------------------------------------------


def test_conditioning_tensors_per_frame():
    boxes = np.zeros((3, 4, 4))
    boxes[0] = [0.1, 0.2, 0.5, 0.6]                 # present in every frame
    boxes[1, 1:] = [0.7, 0.1, 1.2, 0.4]             # absent in frame 0; past the right edge (kept unclipped)
    boxes[2, 3] = [0.0, 0.0, 0.0, 0.0]              # never present
    embeddings = torch.arange(3.0)[:, None].expand(3, 8) + 1
    inputs = build_gligen_inputs(boxes, embeddings)
    assert inputs.boxes_xyxy.shape == (4, MAX_OBJECTS, 4) and inputs.masks.shape == (4, MAX_OBJECTS)
    assert inputs.phrase_embeddings.shape == (4, MAX_OBJECTS, 8)
    assert inputs.masks.sum(1).tolist() == [1, 2, 2, 2]
    assert inputs.boxes_xyxy[1, 1].tolist() == pytest.approx([0.7, 0.1, 1.2, 0.4])
    assert inputs.phrase_embeddings[0, 0, 0] == 1 and inputs.phrase_embeddings[1, 1, 0] == 2
    assert inputs.phrase_embeddings[0, 1:].abs().sum() == 0 and inputs.boxes_xyxy[0, 1:].abs().sum() == 0
    cfg = stack_cfg_gligen_inputs(inputs)
    assert cfg.masks.shape == (8, MAX_OBJECTS)
    assert cfg.masks[:4].sum() == 0 and torch.equal(cfg.masks[4:], inputs.masks)   # uncond frames, then cond
    assert torch.equal(cfg.boxes_xyxy[:4], inputs.boxes_xyxy) and torch.equal(cfg.boxes_xyxy[4:], inputs.boxes_xyxy)


def test_at_most_30_objects_per_frame(caplog):
    boxes = np.tile(np.array([0.1, 0.1, 0.3, 0.3]), (32, 2, 1))
    with caplog.at_level(logging.WARNING, logger="models.gligen"):
        inputs = build_gligen_inputs(boxes, torch.arange(32.0)[:, None])
    assert inputs.masks.sum(1).tolist() == [30, 30]
    assert inputs.phrase_embeddings[0, :, 0].tolist() == list(range(30))   # the first 30 tracks, in order
    assert "32 objects" in caplog.text


def test_phrase_features_are_the_pooled_output_independent_of_padding(stock_model):
    encoder, tokenizer = stock_model.text_encoder, stock_model.tokenizer
    together = encode_phrases(encoder, tokenizer, ["cat", "a big red moving car"], "cpu", torch.float32)
    alone = encode_phrases(encoder, tokenizer, ["cat"], "cpu", torch.float32)
    tokens = tokenizer(["cat"], return_tensors="pt")
    with torch.no_grad():
        pooled = encoder(tokens.input_ids).pooler_output
    assert together.shape == (2, tiny.TINY_TEXT_HIDDEN_SIZE)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, pooled, rtol=0, atol=1e-6)
    assert encode_phrases(encoder, tokenizer, [], "cpu", torch.float32).shape == (0, tiny.TINY_TEXT_HIDDEN_SIZE)


# --- sampling ---------------------------------------------------------------------------------------


def test_scheduled_sampling_step_counts():
    assert count_grounded_steps(0.4, 40) == 16 and count_grounded_steps(1.0, 40) == 40
    assert count_grounded_steps(0.0, 40) == 0 and count_grounded_steps(0.3, 4) == 1


def test_beta_zero_equals_the_stock_video_bit_for_bit(stock_model, grounded_model, condition):
    stock = generate_video(stock_model, condition.prompt, SAMPLING, SEED, condition=condition)
    off = generate_video(grounded_model, condition.prompt, SAMPLING, SEED, condition=condition,
                         gligen=GligenConfig(scheduled_sampling_beta=0.0))
    on = generate_video(grounded_model, condition.prompt, SAMPLING, SEED, condition=condition,
                        gligen=GligenConfig(scheduled_sampling_beta=0.5))
    assert torch.equal(off.latents, stock.latents) and np.array_equal(off.frames, stock.frames)
    assert not torch.equal(on.latents, stock.latents)
    assert on.frames.dtype == np.uint8 and on.frames.shape == (4, 64, 64, 3)


def test_fusers_on_for_the_first_beta_steps_then_restored(grounded_model, condition):
    fuser = next(iter(fuser_modules(grounded_model.unet).values()))
    states: list[bool] = []
    handle = fuser.register_forward_pre_hook(lambda module, args: states.append(module.enabled))
    try:
        generate_video(grounded_model, condition.prompt, SAMPLING, SEED, condition=condition,
                       gligen=GligenConfig(scheduled_sampling_beta=0.5))
    finally:
        handle.remove()
    assert states == [True, True, False, False]      # one CFG pass per step; int(0.5 * 4) = 2 steps on
    assert all(f.enabled for f in fuser_modules(grounded_model.unet).values())


# --- LVD-plus ---------------------------------------------------------------------------------------


def test_lvd_plus_records_attention_and_guidance_lowers_the_energy(condition):
    model = load_video_model(get_run_model("lvd-plus_tiny"), device="cpu")
    assert is_grounded(model.unet) and model.spec.guided_layers == LVD_GUIDED_LAYERS
    config = GuidanceConfig()
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(40)
    backbone = backbone_for(model)
    guidance = build_layout_guidance(backbone, [condition.prompt], [condition],
                                     backbone.encode_text([condition.prompt], None).cond, config, ExecutionConfig(),
                                     scheduler, scheduler.timesteps, SAMPLING.num_frames, 64, 64)
    production_energy = make_layout_energy_fn(backbone, guidance.recorder, guidance.cond, scheduler.timesteps[0],
                                              guidance.videos, config.energy_weights(), guidance.num_map_frames)
    maps_seen = []

    def energy_fn(latents):
        energy = production_energy(latents, [0])[0]
        maps_seen.append({name: tuple(m.shape) for name, m in guidance.recorder.maps.items()})
        return energy

    latents = prepare_latents(SEED, SAMPLING.num_frames, 64, 64, 4, "cpu", torch.float32)
    step_size = compute_step_sizes(scheduler.alphas_cumprod, scheduler.timesteps)[0]
    with guidance:
        guided, before = guidance_step(latents, energy_fn, step_size, config.loss_scale)
        _, after = guidance_step(guided, energy_fn, step_size, config.loss_scale)
    assert set(maps_seen[0]) == set(LVD_GUIDED_LAYERS)
    assert maps_seen[0]["down_blocks.1.attentions.0.transformer_blocks.0.attn2"][:3] == (4, 4, 16)
    assert torch.isfinite(before) and after < before, (before.item(), after.item())


def test_lvd_plus_guided_passes_give_the_fusers_no_objects(condition):
    model = load_video_model(get_run_model("lvd-plus_tiny"), device="cpu")
    guidance = GuidanceConfig(loss_threshold=0.0, max_iter=2, max_index_step=2)
    calls = []
    fuser = next(iter(fuser_modules(model.unet).values()))
    handle = fuser.register_forward_pre_hook(lambda module, args: calls.append(args[1].shape[0]))
    try:
        result = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=guidance,
                                gligen=GligenConfig(scheduled_sampling_beta=0.4))
    finally:
        handle.remove()
    assert len(result.guidance_log) == 4                      # 2 steps x 2 guided iterations
    assert calls == [2 * SAMPLING.num_frames] * SAMPLING.num_inference_steps   # CFG passes only


# --- saving and loading -----------------------------------------------------------------------------


def test_tiny_grounded_model_saves_and_reloads_strictly(tmp_path):
    folder = tiny.save_tiny_model(tmp_path / "lvd-gligen-tiny", seed=0, grounded=True)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["attention_type"] == "gated" and config["cross_attention_dim"] == tiny.TINY_TEXT_HIDDEN_SIZE
    built = tiny.build_tiny_grounded_unet(0).state_dict()
    loaded = load_grounded_unet(folder, cross_attention_dim=None).state_dict()
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    model = load_video_model(get_run_model("lvd-gligen_tiny"), model_path=folder, device="cpu")
    assert is_grounded(model.unet) and not any(p.requires_grad for p in model.unet.parameters())
    with pytest.raises(GroundedModelError, match="cross_attention_dim 1024"):
        load_grounded_unet(folder)                            # the published adapters' width

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    broken = {k: v for k, v in state.items() if not k.endswith("fuser.alpha_attn")}
    broken["position_net.extra"] = torch.zeros(1)
    save_file(broken, str(weights))
    with pytest.raises(GroundedModelError, match=r"16 missing keys \['down_blocks.*alpha_attn.*1 unexpected keys "
                                                 r"\['position_net.extra'\]"):
        load_grounded_unet(folder, cross_attention_dim=None)
    config.pop("attention_type")
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GroundedModelError, match="attention_type"):
        load_video_model(get_run_model("lvd-gligen_tiny"), model_path=folder, device="cpu")


@pytest.mark.parametrize("name, model_id", [("lvd-gligen_zeroscope", "longlian/text-to-video-lvd-zs"),
                                            ("lvd-gligen_modelscope256", "longlian/text-to-video-lvd-ms"),
                                            ("lvd-plus_modelscope256", "longlian/text-to-video-lvd-ms")])
def test_full_size_run_models_without_weights_fail_naming_the_model(tmp_path, name, model_id):
    spec = get_run_model(name)
    with pytest.raises(MissingWeightsError, match=re.escape(model_id)) as info:
        load_video_model(spec, device="cpu", local_files_only=True, cache_dir=tmp_path)
    if spec.method == "lvd-plus":
        assert "(revision weights_only)" in str(info.value) and "--revision weights_only" in str(info.value)


def test_registry_entries():
    expected = {  # name: (method, model_id, revision, height, width, default frames, min frames, guided)
        "lvd-gligen_modelscope256": ("lvd-gligen", "longlian/text-to-video-lvd-ms", None, 256, 256, 16, 2, ()),
        "lvd-gligen_zeroscope": ("lvd-gligen", "longlian/text-to-video-lvd-zs", None, 320, 576, 24, 24, ()),
        "lvd-plus_modelscope256": ("lvd-plus", "longlian/text-to-video-lvd-ms", "weights_only", 256, 256, 16, 2,
                                   LVD_GUIDED_LAYERS),
        "lvd-gligen_tiny": ("lvd-gligen", None, None, 128, 128, 8, 2, ()),
        "lvd-plus_tiny": ("lvd-plus", None, None, 128, 128, 8, 2, LVD_GUIDED_LAYERS),
    }
    for name, values in expected.items():
        spec = get_run_model(name)
        assert (spec.method, spec.model_id, spec.revision, spec.height, spec.width, spec.default_num_frames,
                spec.min_num_frames, spec.guided_layers) == values
        assert spec.grounded and spec.tiny == (spec.model_id is None)
    assert not get_run_model("lvd_modelscope256").grounded and not get_run_model("zeroscope").grounded


# --- full-size architectures (meta device) ----------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("config_dir", [MS_CONFIG_DIR, ZS_CONFIG_DIR], ids=["modelscope", "zeroscope"])
def test_full_size_grounded_unet_on_meta(config_dir):
    spec = get_run_model("lvd-plus_modelscope256")
    model = tiny.build_random_model_from_configs(config_dir, device="meta", spec=spec)
    unet = model.unet
    assert is_grounded(unet) and next(unet.parameters()).device.type == "meta"
    validate_grounded_config(dict(unet.config), "built")
    fusers = fuser_modules(unet)
    assert len(fusers) == 16
    assert fusers["down_blocks.0.attentions.0.transformer_blocks.0"].linear.in_features == 1024
    assert fusers["down_blocks.0.attentions.0.transformer_blocks.0"].attn.heads == 5     # 320 channels / 64
    assert unet.position_net.positive_len == 1024 and unet.position_net.linears[0].in_features == 1024 + 64
    gligen_names = set(gligen_parameter_names(unet))
    stock = sum(p.numel() for n, p in unet.named_parameters() if n not in gligen_names)
    assert stock == 1_411_233_860       # the base UNet is unchanged (shared/model-configs/SOURCES.md)


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_model, extra", [("lvd-gligen_tiny", []),
                                               ("lvd-plus_tiny", ["--max_index_step", "1", "--max_iter", "1"])])
def test_cli_writes_the_videos_and_the_gligen_config(tmp_path, run_model, extra):
    code = generate.main(["--run-model", run_model, "--prompt-type", "demo", "--model", "handwritten",
                          "--template_version", "v0.1", "--cache-dir", str(REPO / "cache"),
                          "--output-dir", str(tmp_path), "--gligen_scheduled_sampling_beta", "0.4",
                          "--num_inference_steps", "3", "--num_frames", "4", *extra])
    assert code == 0
    run_dir = tmp_path / f"imgs_demo_templatev0.1_handwritten_{run_model}" / "run0"
    for name in ("video_0.gif", "video_0.joblib", "video_0_annotated.gif", "layout.json"):
        assert (run_dir / "0" / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["gligen"] == {"scheduled_sampling_beta": 0.4, "max_objects": 30}
    assert (config["guidance"] is not None) == (run_model == "lvd-plus_tiny")


def test_cli_rejects_a_bad_beta_and_guidance_flags_for_lvd_gligen(tmp_path, capsys):
    common = ["--prompt-type", "demo", "--model", "handwritten", "--template_version", "v0.1",
              "--cache-dir", str(REPO / "cache"), "--output-dir", str(tmp_path)]
    assert generate.main(["--run-model", "lvd-gligen_tiny", "--gligen_scheduled_sampling_beta", "2", *common]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert generate.main(["--run-model", "lvd-gligen_tiny", "--loss_scale", "3", *common]) == 2
    assert "no attention guidance" in capsys.readouterr().err
    assert not tmp_path.joinpath("imgs_demo_templatev0.1_handwritten_lvd-gligen_tiny").exists()
