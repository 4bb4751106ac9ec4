"""The open assembly and the attention control families (issue 16).

- worked examples of the masks and biases (README, "Layout control families": the equations);
- per backbone (UNet3D tiny, Wan tiny) and family (mask, modulate): zero strength == baseline bit for bit,
  processors restored after every run (also one that fails), the bias acts on the conditional branch only;
- combinations: energy guidance measures the unbiased attention, so [energy, mask] logs the energy-only run's
  first energy; CFG is one guider with one rule (diffusers' guiders plug in); a new energy term is one
  function plus one field.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG

import generate
from generation.attention_control import (MaskingConfig, ModulationConfig, compute_cross_modulation,
                                          compute_mask_bias, compute_position_regions, compute_self_modulation,
                                          compute_token_regions)
from generation.backbones import backbone_for
from generation.backbones.base import CROSS, SPATIAL, TEMPORAL, VIDEO
from generation.config import GuidanceConfig, SamplingConfig
from generation.controls import CONTROL_NAMES
from generation.energies import ENERGY_TERMS, BoxMasks, EnergyTerm, compute_layer_energy
from generation.sampling import generate_video
from models.registry import CONTROL_FAMILY_NAMES, METHOD_CONTROLS, WAN_NEGATIVE_PROMPT, get_run_model
from models.wan import build_tiny_wan_model
from utils.layout import Box, ObjectTrack, SceneLayout

INF = float("-inf")
SEED = 5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Worked examples (2 x 2 maps, row-major positions p = y * 2 + x)


def test_masking_worked_example_one_object_in_the_left_column():
    # Object 0 covers x = 0 (positions 0 and 2) in frame 0 and x = 1 (positions 1, 3) in frame 1.
    masks = torch.tensor([[[1., 0., 1., 0.], [0., 1., 0., 1.]]])           # (O=1, F=2, N=4)
    regions = compute_position_regions(masks)                               # (F, N, 2): object, background
    assert regions[0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    # Spatial self-attention of frame 0: within the object, within the background.
    spatial = compute_mask_bias(regions[0], regions[0])
    allowed = [[0, INF, 0, INF], [INF, 0, INF, 0], [0, INF, 0, INF], [INF, 0, INF, 0]]
    assert spatial.tolist() == allowed
    # Temporal attention at position 0: in the box in frame 0, not in frame 1 -> the frames do not attend.
    temporal = compute_mask_bias(regions[:, 0], regions[:, 0])
    assert temporal.tolist() == [[0, INF], [INF, 0]]
    # Cross-attention: tokens [BOS, "a", "dog", EOS, pad]; "dog" (2) the object, "a" (1) a background word.
    tokens, objects = compute_token_regions(5, [(2,)], [1])
    cross = compute_mask_bias(regions[0], tokens)                           # (N, K)
    assert cross.tolist() == [[0, INF, 0, 0, 0], [0, 0, INF, 0, 0], [0, INF, 0, 0, 0], [0, 0, INF, 0, 0]]
    assert objects.tolist() == [[0], [0], [1], [0], [0]]


def test_masking_overlapping_boxes_share_a_region_and_no_query_is_left_without_keys():
    masks = torch.tensor([[[1., 1., 0., 0.]], [[0., 1., 1., 0.]]])         # two objects overlapping at p = 1
    regions = compute_position_regions(masks)[0]
    bias = compute_mask_bias(regions, regions)
    assert bias[1].tolist() == [0, 0, 0, INF]                                # p = 1 is in both objects
    assert bias[0].tolist() == [0, 0, INF, INF] and bias[3].tolist() == [INF, INF, INF, 0]
    no_keys = compute_mask_bias(torch.tensor([[1., 0.]]), torch.tensor([[0., 1.]]))
    assert no_keys.tolist() == [[0.0]]


def test_modulation_worked_example_scales_with_the_box_area():
    masks = torch.tensor([[[1., 0., 0., 0.]]])                              # box area 1/4 in the only frame
    regions = compute_position_regions(masks)[0]                            # (N, 2)
    areas = regions.mean(dim=0, keepdim=True).expand_as(regions)            # object 1/4, background 3/4
    _, objects = compute_token_regions(3, [(1,)], [])
    cross = compute_cross_modulation(regions, areas, objects, strength=2.0)
    # token 1 (the object): +2 * (1 - 1/4) inside, -1.5 outside; the other tokens: 0.
    assert cross.tolist() == [[0, 1.5, 0], [0, -1.5, 0], [0, -1.5, 0], [0, -1.5, 0]]
    weights = (regions * (1 - areas) + (1 - regions) * -1).amax(dim=-1)     # 1 - area of the key's region
    assert weights.tolist() == [0.75, 0.25, 0.25, 0.25]
    spatial = compute_self_modulation(regions, regions, weights, strength=2.0)
    assert spatial[0].tolist() == [1.5, -0.5, -0.5, -0.5]
    assert spatial[1].tolist() == [-1.5, 0.5, 0.5, 0.5]


def test_strength_schedules():
    mask = MaskingConfig(max_index_step=3)
    assert [mask.strength_at(CROSS, i, 10) for i in range(5)] == [1, 1, 1, 0, 0]
    modulate = ModulationConfig(cross_strength=2.0, self_strength=0.5, decay_power=2.0)
    assert modulate.strength_at(CROSS, 0, 4) == 2.0 and modulate.strength_at(CROSS, 2, 4) == 0.5
    assert modulate.strength_at(SPATIAL, 2, 4) == 0.125
    assert set(ModulationConfig(self_strength=0.0).kinds()) == {CROSS}
    assert set(MaskingConfig(temporal=False).kinds()) == {CROSS, SPATIAL, VIDEO}
    assert TEMPORAL in MaskingConfig().kinds()


# --------------------------------------------------------------------------------------------
# Both backbones


LAYOUT = SceneLayout("A red car and a blue cat", "street", (
    ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.7) for i in range(6))),
    ObjectTrack(1, "blue cat", (Box(0.6, 0.1, 0.9, 0.4),) * 3 + (None,) * 3)))


@pytest.fixture(scope="module", params=["unet3d", "wan"])
def arm(request, tiny_model):
    if request.param == "unet3d":
        model = tiny_model
        sampling = SamplingConfig(height=64, width=64, num_frames=4, num_inference_steps=4)
        guidance = GuidanceConfig(max_index_step=2, max_iter=1, loss_threshold=-1.0)
    else:
        model = build_tiny_wan_model(seed=0)
        sampling = SamplingConfig(height=64, width=96, num_frames=9, num_inference_steps=4, guidance_scale=5.0,
                                  negative_prompt=WAN_NEGATIVE_PROMPT)
        guidance = GuidanceConfig(guided_layers=get_run_model("lvd_wan_tiny").guided_layers, max_index_step=2,
                                  max_iter=1, loss_threshold=-1.0)
    condition = backbone_for(model).build_condition(LAYOUT, sampling.num_frames)
    baseline = generate_video(model, condition.prompt, sampling, SEED, condition=condition)
    return dataclasses.make_dataclass("Arm", ["name", "model", "sampling", "guidance", "condition", "baseline"])(
        request.param, model, sampling, guidance, condition, baseline)


@pytest.mark.parametrize("config", [MaskingConfig(max_index_step=0),
                                    ModulationConfig(cross_strength=0.0, self_strength=0.0)], ids=["mask", "modulate"])
def test_zero_strength_is_the_baseline_bit_for_bit(arm, config):
    result = generate_video(arm.model, arm.condition.prompt, arm.sampling, SEED, condition=arm.condition,
                            controls=[config])
    assert torch.equal(result.latents, arm.baseline.latents)


@pytest.mark.parametrize("controls", [[MaskingConfig()], [ModulationConfig()], [MaskingConfig(), ModulationConfig()]],
                         ids=["mask", "modulate", "mask+modulate"])
def test_a_family_changes_the_video_and_restores_every_processor(arm, controls):
    model = backbone_for(arm.model).attention_model
    before = dict(model.attn_processors)
    result = generate_video(arm.model, arm.condition.prompt, arm.sampling, SEED, condition=arm.condition,
                            controls=controls)
    assert dict(model.attn_processors) == before
    assert torch.isfinite(result.latents).all() and not torch.equal(result.latents, arm.baseline.latents)

    def fail(index, count):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_video(arm.model, arm.condition.prompt, arm.sampling, SEED, condition=arm.condition,
                       controls=controls, step_callback=fail)
    assert dict(model.attn_processors) == before


@pytest.mark.parametrize("config", [MaskingConfig(), ModulationConfig()], ids=["mask", "modulate"])
def test_the_bias_acts_on_the_conditional_branch_only(arm, config):
    from generation.attention_control import build_attention_control
    from generation.loop import BatchContext, Step

    backbone = backbone_for(arm.model)
    text = backbone.encode_text([arm.condition.prompt], arm.sampling.negative_prompt)
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(arm.sampling.num_inference_steps)
    latents = backbone.prepare_latents(SEED, arm.sampling.num_frames, arm.sampling.height, arm.sampling.width, "cpu")
    context = BatchContext(arm.model, backbone, ("p",), (arm.condition,), text, scheduler, scheduler.timesteps,
                           arm.sampling, None)
    timestep = scheduler.timesteps[0]
    with torch.no_grad():
        cond, uncond = backbone.predict_branches(scheduler, latents, timestep, text, True, {})
        with build_attention_control(config, context) as control:
            control.before_step(Step(0, timestep, len(scheduler.timesteps)), latents)
            biased_cond, biased_uncond = backbone.predict_branches(scheduler, latents, timestep, text, True, {})
    assert not torch.allclose(biased_cond, cond, atol=1e-4)
    if arm.name == "wan":   # a call of its own: untouched
        assert torch.equal(biased_uncond, uncond)
    else:                   # rows of the same call, with a zero bias
        torch.testing.assert_close(biased_uncond, uncond, atol=1e-5, rtol=1e-5)


def test_energy_guidance_measures_the_unbiased_attention(arm):
    alone = generate_video(arm.model, arm.condition.prompt, arm.sampling, SEED, condition=arm.condition,
                           controls=[arm.guidance])
    combined = generate_video(arm.model, arm.condition.prompt, arm.sampling, SEED, condition=arm.condition,
                              controls=[MaskingConfig(), arm.guidance])
    assert alone.guidance_log and combined.guidance_log
    assert combined.guidance_log[0].energy == alone.guidance_log[0].energy   # step 0, before any masked call
    assert not torch.equal(combined.latents, alone.latents)


def test_cfg_is_one_guider_and_diffusers_guiders_plug_in(arm):
    backbone = backbone_for(arm.model)
    assert backbone.make_guider(1.0).num_conditions == (1 if arm.name == "wan" else 2)
    assert backbone.make_guider(0.5).num_conditions == (1 if arm.name == "wan" else 2)
    text = backbone.encode_text([arm.condition.prompt], arm.sampling.negative_prompt)
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(arm.sampling.num_inference_steps)
    latents = backbone.prepare_latents(SEED, arm.sampling.num_frames, arm.sampling.height, arm.sampling.width, "cpu")
    with torch.no_grad():
        ours = backbone.predict(scheduler, latents, scheduler.timesteps[0], text, 5.0)
        theirs = backbone.predict(scheduler, latents, scheduler.timesteps[0], text, DiffusersCFG(guidance_scale=5.0))
    assert torch.equal(ours, theirs)


def test_cfg_variants_on_worked_examples():
    """CFG-Zero* (s* = <c, u> / ||u||^2 per video) and Lin et al.'s rescale, on hand-made predictions."""
    from generation.cfg import ClassifierFreeGuidance, zero_star_scale

    uncond = torch.tensor([[1.0, 2.0, 0.0, -1.0], [1.0, 0.0, 0.0, 0.0]]).view(2, 1, 4)
    cond = torch.stack([2 * uncond[0], torch.tensor([[0.0, 3.0, 0.0, 0.0]])])  # video 0: 2u; video 1: c orthogonal to u
    assert zero_star_scale(cond, uncond).flatten().tolist() == pytest.approx([2.0, 0.0])
    pred = ClassifierFreeGuidance(7.5, zero_star=True).forward(cond, uncond).pred
    assert torch.allclose(pred[0], cond[0])              # s* u = c: nothing left to amplify
    assert torch.allclose(pred[1], 7.5 * cond[1])        # s* = 0: s c
    standard = ClassifierFreeGuidance(7.5).forward(cond, uncond).pred
    assert torch.equal(standard, uncond + 7.5 * (cond - uncond))
    rescaled = ClassifierFreeGuidance(7.5, guidance_rescale=1.0).forward(cond, uncond).pred
    assert torch.allclose(rescaled.std(dim=(1, 2)), cond.std(dim=(1, 2)))


def test_cfg_flags_reach_the_guider_and_the_video(arm):
    args = generate.build_parser().parse_args(["--run-model", "lvd_tiny", "--cfg", "zero-star", "--cfg-rescale", "0.7",
                                               "--guidance-scale", "4"])
    from generation.settings import configs_from_args

    sampling = configs_from_args(args).sampling
    assert (sampling.cfg_variant, sampling.guidance_rescale, sampling.guidance_scale) == ("zero-star", 0.7, 4.0)
    default = configs_from_args(generate.build_parser().parse_args(["--run-model", "lvd_tiny"])).sampling
    assert (default.cfg_variant, default.guidance_rescale) == ("standard", 0.0)  # the pipelines' CFG by default
    zero_star = dataclasses.replace(arm.sampling, cfg_variant="zero-star")
    result = generate_video(arm.model, arm.condition.prompt, zero_star, SEED, condition=arm.condition)
    assert not torch.equal(result.latents, arm.baseline.latents)
    with pytest.raises(ValueError, match="cfg_variant"):
        dataclasses.replace(arm.sampling, cfg_variant="cfg++")


# --------------------------------------------------------------------------------------------
# The assembly's tables


def test_control_families_are_one_table():
    assert CONTROL_NAMES == CONTROL_FAMILY_NAMES
    assert all(set(controls) <= set(CONTROL_NAMES) for controls in METHOD_CONTROLS.values())
    assert get_run_model("lvd-plus_tiny").controls == ("gligen", "energy") and get_run_model("wan_tiny").controls == ()
    from models.registry import GUIDED_METHODS, LAYOUT_METHODS

    assert GUIDED_METHODS == ("lvd", "lvd-plus") and set(LAYOUT_METHODS) == {"lvd", "lvd-gligen", "lvd-plus"}


def compute_size_term(attention: torch.Tensor, box_masks: BoxMasks, weights) -> torch.Tensor:
    """A size-consistency term: (attention mass of the token in frame f - the box's share of the map)^2."""
    mass = attention.mean(dim=2).sum(dim=-1) / attention.mean(dim=2).sum(dim=-1).clamp(min=1e-6).amax()
    return (mass - box_masks.masks.mean(dim=-1)) ** 2


def test_a_new_energy_term_is_one_function_and_one_field(monkeypatch):
    term = EnergyTerm("size_loss_scale", compute_size_term, "size-consistency term (0)")
    terms = (*ENERGY_TERMS, term)
    attention = torch.rand(2, 3, 4, 1)                                       # (F, H, N, J)
    masks = BoxMasks(2, 2, torch.tensor([[[1., 0., 0., 0.], [1., 1., 0., 0.]]]), torch.zeros(1, 2, 4))
    numbers = dict(fg_top_p=0.75, bg_top_p=0.75, fg_weight=1.0, bg_weight=4.0)
    without = compute_layer_energy(attention, masks, torch.ones(1), terms=terms, **numbers)
    with_term = compute_layer_energy(attention, masks, torch.ones(1), terms=terms, size_loss_scale=2.0, **numbers)
    expected = 2.0 * compute_size_term(attention.float().permute(3, 0, 1, 2), masks, None).sum()
    torch.testing.assert_close(with_term - without, expected)
    # The one field: a GuidanceConfig with it.
    config_type = dataclasses.make_dataclass("SizedGuidance", [("size_loss_scale", float, 0.0)],
                                             bases=(GuidanceConfig,), frozen=True)
    assert config_type(size_loss_scale=0.5).size_loss_scale == 0.5


def test_every_energy_term_has_its_flag_and_field():
    """The flag of each term is one explicit line in generation/settings.py (so --help needs no torch): a term
    added to ENERGY_TERMS without its flag or its GuidanceConfig field fails here."""
    from generation.settings import GUIDANCE_FLAGS

    args = vars(generate.build_parser().parse_args([]))
    for term in ENERGY_TERMS:
        assert term.name in GUIDANCE_FLAGS and term.name in args
        assert hasattr(GuidanceConfig(), term.name)


# --------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("argv, message", [
    (["--run-model", "lvd_tiny", "--control", "gligen"], "grounded"),
    (["--run-model", "lvd_tiny", "--mask-max-index-step", "3"], "--control mask"),
    (["--run-model", "baseline_tiny", "--control", "energy"], "guided layers"),
])
def test_control_flags_are_checked(tmp_path, capsys, argv, message):
    code = generate.main(argv + ["--prompt-type", "demo", "--model", "handwritten", "--template_version", "v0.1",
                                 "--output-dir", str(tmp_path), "--dry-run"])
    assert code == 2 and message in capsys.readouterr().err


def test_control_flags_build_the_configs():
    args = generate.build_parser().parse_args(["--control", "energy", "mask", "modulate", "--mask-max-index-step",
                                               "4", "--mask-temporal", "0", "--modulate-cross-strength", "1.5"])
    spec = get_run_model("baseline_tiny")
    from generation.settings import build_attention_control_configs, run_controls

    configs = build_attention_control_configs(args, run_controls(args, spec))
    assert configs == (MaskingConfig(max_index_step=4, temporal=False), ModulationConfig(cross_strength=1.5))
    assert run_controls(args, spec) == ("energy", "mask", "modulate")


def test_compare_controls_names_a_missing_cache_before_generating_anything(tmp_path, capsys):
    from tests.eval_run_fixtures import load_script

    compare = load_script("compare_controls")
    code = compare.main(["--pairs", "lvd_tiny:baseline_tiny", "--prompt-type", "lvd", "--model", "gpt-4-1106-preview",
                         "--cache-dir", str(tmp_path / "DIR"), "--output-dir", str(tmp_path / "runs"), "--arms", "none",
                         "--num_prompts", "1", "--num_inference_steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no layout cache at ")
    assert "cache_lvd_v0.1_gpt-4-1106-preview.json is one of the authors' published caches" in err
    assert not (tmp_path / "runs").exists()   # not even the baseline arm ran


@pytest.mark.slow
def test_compare_controls_writes_the_table_on_the_tiny_models(tmp_path):
    from tests.eval_run_fixtures import load_script

    compare = load_script("compare_controls")
    out = tmp_path / "compare.md"
    code = compare.main(["--pairs", "lvd_tiny:baseline_tiny", "--arms", "none", "mask+energy", "--num_inference_steps",
                         "2", "--detector", "tiny", "--device", "cpu", "--output-dir", str(tmp_path / "runs"),
                         "--out", str(out)])
    table = out.read_text()
    assert code == 0 and "| lvd_tiny | mask+energy |" in table and "| baseline_tiny | none |" in table
    rows = [line for line in table.splitlines() if line.startswith("| lvd_tiny")]
    assert all("–" not in line.split("|")[3] for line in rows)   # mIoU measured for the layout arms
