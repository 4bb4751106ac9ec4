"""Latent guidance (generation/guidance.py) and its use in the sampling loop.

Spec: LVD-REFERENCE.md 4.5 (update, carried threshold, sentinel), 4.7 (conditional branch only),
14.6-14.7, 15.1 (early stop and token columns change no result), 15.2 (per-step rule).
The schedule is tested with scripted stub energies (no model); the rest on the tiny model.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from generation.backbones import backbone_for
from generation.backbones.unet3d import prepare_latents
from generation.config import STOP_PER_STEP, ExecutionConfig, GuidanceConfig, SamplingConfig, benchmark_preset
from generation.guidance import INITIAL_LOSS, GuidanceError, GuidanceSchedule, compute_step_sizes, guidance_step, guide_batch
from generation.lvd import build_layout_guidance, make_layout_energy_fn
from generation.sampling import generate_video
from utils.layout import Box, ObjectTrack, SceneLayout, build_condition

SAMPLING = SamplingConfig(height=64, width=64, num_frames=4, num_inference_steps=6)
SEED = 5
# Guidance that always runs (threshold 0) for two steps of two iterations: cheap but exercises the loop.
ACTIVE = GuidanceConfig(loss_threshold=0.0, max_iter=2, max_index_step=2)


# --------------------------------------------------------------------------------------------
# The schedule, with scripted energies


class ScriptedEnergy:
    """Returns the scripted energies in order, with gradient 1 for every latent entry; counts calls.

    Called as guide_batch calls it: ``(latents of the active videos, their indices) -> (A,)`` energies.
    """

    def __init__(self, energies):
        self.energies = list(energies)
        self.calls = 0

    def __call__(self, latents: torch.Tensor, active: list[int]) -> torch.Tensor:
        value = self.energies[self.calls]
        self.calls += 1
        total = latents.sum(dim=-1)
        return total - total.detach() + value


def run_step(schedule: GuidanceSchedule, step_index: int, energies) -> tuple[int, int]:
    """One denoising step of guidance through the production path (guide_batch, one video) from zero
    latents with step size 1: (energy calls, updates). Each update subtracts loss_scale."""
    energy = ScriptedEnergy(energies)
    latents = guide_batch([schedule], torch.zeros(1, 3), step_index, 999 - step_index, energy, torch.tensor(1.0),
                          schedule.config.loss_scale)
    updates = -latents[0, 0].item() / schedule.config.loss_scale
    assert torch.all(latents == latents[0, 0]) and updates == int(updates)
    return energy.calls, int(updates)


def test_guidance_step_is_plain_gradient_descent():
    latents = torch.tensor([1.0, -2.0, 4.0])
    new, energy = guidance_step(latents, lambda z: 0.5 * (z ** 2).sum(), torch.tensor(0.25))
    assert torch.equal(new, latents * 0.75) and energy.item() == pytest.approx(10.5)
    assert not new.requires_grad and not energy.requires_grad
    kept, energy = guidance_step(latents, lambda z: 0.5 * (z ** 2).sum(), 0.25, update_if=lambda e: False)
    assert kept is latents and energy.item() == pytest.approx(10.5)
    # Works inside no_grad (the sampling loop's CFG pass is gradient-free).
    with torch.no_grad():
        new, _ = guidance_step(latents, lambda z: 0.5 * (z ** 2).sum(), 0.5)
    assert torch.equal(new, latents * 0.5)


def test_carried_rule_starts_at_the_sentinel_and_stops_for_good():
    schedule = GuidanceSchedule(GuidanceConfig())   # loss_scale 5, threshold 200: runs while energy > 200
    assert schedule.carried_energy * schedule.config.loss_scale == INITIAL_LOSS == 10000.0
    # The check before each iteration uses the energy of the previous one (pre-update): 180 is below,
    # but the update it triggered still happens; then the carried 180 stops this step ...
    assert run_step(schedule, 0, [400.0, 300.0, 180.0, 1000.0, 1000.0]) == (3, 3)
    # ... and every later step, whatever the energy would be now.
    assert run_step(schedule, 1, [1000.0] * 5) == (0, 0)
    assert run_step(schedule, 5, [1000.0] * 5) == (0, 0)
    assert [(r.step, r.iteration, r.energy, r.loss) for r in schedule.log] == [
        (0, 0, 400.0, 2000.0), (0, 1, 300.0, 1500.0), (0, 2, 180.0, 900.0)]
    assert [r.timestep for r in schedule.log] == [999, 999, 999]


def test_carried_rule_compares_the_previous_steps_last_loss():
    schedule = GuidanceSchedule(GuidanceConfig(max_iter=1))
    assert run_step(schedule, 0, [240.0]) == (1, 1)    # sentinel 10000 / 5 -> runs; carries 240
    assert run_step(schedule, 1, [160.0]) == (1, 1)    # 240 carried -> runs, although this energy is below
    assert run_step(schedule, 2, [1000.0]) == (0, 0)   # 160 carried -> off for good


def test_iterations_and_steps_are_capped():
    schedule = GuidanceSchedule(GuidanceConfig(max_iter=3, max_index_step=2))
    assert [run_step(schedule, step, [1000.0] * 3) for step in range(4)] == [(3, 3), (3, 3), (0, 0), (0, 0)]
    per_step = GuidanceSchedule(GuidanceConfig(max_iter=(2, 0, 1), max_index_step=10))
    assert [run_step(per_step, step, [1000.0] * 2) for step in range(4)] == [(2, 2), (0, 0), (1, 1), (0, 0)]


def test_sentinel_over_loss_scale_can_disable_guidance():
    # 10000 / loss_scale must exceed the threshold: loss_scale >= 10000 / 200 = 50 never guides.
    assert run_step(GuidanceSchedule(GuidanceConfig(loss_scale=50.0)), 0, [1e4] * 5) == (0, 0)
    assert run_step(GuidanceSchedule(GuidanceConfig(loss_scale=49.0)), 0, [1e4] * 5) == (5, 5)
    # The per-step rule recomputes the energy, so the sentinel plays no part there.
    per_step = GuidanceSchedule(GuidanceConfig(loss_scale=50.0, stop_rule=STOP_PER_STEP))
    assert run_step(per_step, 0, [1e4] * 5) == (5, 5)


def test_per_step_rule_recomputes_every_step_and_updates_only_while_above():
    schedule = GuidanceSchedule(GuidanceConfig(stop_rule=STOP_PER_STEP))   # above means energy > 200
    assert run_step(schedule, 0, [400.0, 180.0, 1000.0]) == (2, 1)         # 180: no update, step ends
    assert run_step(schedule, 1, [160.0, 1000.0]) == (1, 0)                # recomputed: below, no update
    assert run_step(schedule, 2, [600.0] * 5) == (5, 5)                    # above again: guidance resumes
    assert run_step(schedule, 10, [600.0] * 5) == (0, 0)                   # past max_index_step
    assert [(r.step, r.iteration, r.loss) for r in schedule.log] == [
        (0, 0, 2000.0), (0, 1, 900.0), (1, 0, 800.0)] + [(2, i, 3000.0) for i in range(5)]


@pytest.mark.parametrize("stop_rule", ["carried", "per-step"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_energy_raises_naming_the_step(stop_rule, bad):
    schedule = GuidanceSchedule(GuidanceConfig(stop_rule=stop_rule))
    run_step(schedule, 0, [400.0] * 5)
    with pytest.raises(GuidanceError, match=r"denoising step 3 \(timestep 996\), iteration 1"):
        run_step(schedule, 3, [400.0, bad, 400.0])


def test_config_rejects_an_unknown_stop_rule():
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        GuidanceConfig(stop_rule="sometimes")


# --------------------------------------------------------------------------------------------
# On the tiny model


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def condition(model):
    car = ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.8) for i in range(6)))
    cat = ObjectTrack(1, "blue cat", (None, None, Box(0.5, 0.1, 0.9, 0.5), Box(0.5, 0.1, 0.9, 0.5),
                                      Box(0.4, 0.1, 0.8, 0.5), Box(0.3, 0.1, 0.7, 0.5)))
    layout = SceneLayout("A red car and a blue cat", "street", (car, cat))
    return build_condition(layout, SAMPLING.num_frames, model.tokenizer)


@pytest.fixture(scope="module")
def baseline(model, condition):
    return generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition)


def make_guidance(model, prompt: str, condition, config: GuidanceConfig, timesteps: torch.Tensor):
    """The production hook for one video whose guided pass sees ``prompt``'s conditional embedding."""
    backbone = backbone_for(model)
    cond = backbone.encode_text([prompt], None).cond   # (1, 77, D)
    return build_layout_guidance(backbone, [prompt], [condition], cond, config, ExecutionConfig(),
                                 model.make_scheduler(), timesteps, SAMPLING.num_frames, SAMPLING.height,
                                 SAMPLING.width)


def make_energy_fn(guidance, timestep: torch.Tensor):
    """The guided energy of spec 4.4-4.5 for the hook's one video: the production make_layout_energy_fn."""
    energy_fn = make_layout_energy_fn(guidance.backbone, guidance.recorder, guidance.cond, timestep,
                                      guidance.videos, guidance.config.energy_weights(), guidance.num_map_frames)
    return lambda latents: energy_fn(latents, [0])[0]


def test_one_guidance_iteration_lowers_the_energy(model, condition):
    config = GuidanceConfig()
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(40)
    step_size = compute_step_sizes(scheduler.alphas_cumprod, scheduler.timesteps)[0]
    latents = prepare_latents(SEED, SAMPLING.num_frames, SAMPLING.height, SAMPLING.width, 4, "cpu", torch.float32)
    guidance = make_guidance(model, condition.prompt, condition, config, scheduler.timesteps)
    energy_fn = make_energy_fn(guidance, scheduler.timesteps[0])
    with guidance:
        guided, before = guidance_step(latents, energy_fn, step_size, config.loss_scale)
        _, after = guidance_step(guided, energy_fn, step_size, config.loss_scale)
    assert not torch.equal(guided, latents)
    assert torch.isfinite(before) and after < before, (before.item(), after.item())


@pytest.mark.parametrize("guidance", [
    None,
    GuidanceConfig(loss_threshold=0.0, max_index_step=0),
    GuidanceConfig(loss_threshold=0.0, max_iter=0),
    GuidanceConfig(loss_scale=50.0),   # the sentinel 10000 / 50 is not above the threshold 200
], ids=["no-config", "max-index-step-0", "max-iter-0", "sentinel"])
def test_zero_guidance_equals_the_baseline_bit_for_bit(model, condition, baseline, guidance):
    result = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=guidance)
    assert torch.equal(result.latents, baseline.latents)
    assert np.array_equal(result.frames, baseline.frames)
    assert result.guidance_log == []


def test_fast_path_equals_the_reference_path_bit_for_bit(model, condition, baseline):
    config = dataclasses.replace(ACTIVE, com_loss_scale=benchmark_preset().com_loss_scale)   # 0.03 too
    reference = ExecutionConfig(stop_after_last_guided_layer=False, record_object_tokens_only=False)
    fast = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=config)
    slow = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=config,
                          execution=reference)
    assert fast.latents.dtype == torch.float32
    assert torch.equal(fast.latents, slow.latents)
    assert [r.energy for r in fast.guidance_log] == [r.energy for r in slow.guidance_log]
    assert not torch.equal(fast.latents, baseline.latents)   # guidance did move the latents


def test_guidance_log_has_one_record_per_guided_iteration(model, condition):
    result = generate_video(model, condition.prompt, SAMPLING, SEED, condition=condition, guidance=ACTIVE)
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(SAMPLING.num_inference_steps)
    assert [(r.step, r.iteration) for r in result.guidance_log] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.timestep for r in result.guidance_log] == [int(scheduler.timesteps[i]) for i in (0, 0, 1, 1)]
    for record in result.guidance_log:
        assert math.isfinite(record.energy) and record.energy > 0
        assert record.loss == pytest.approx(ACTIVE.loss_scale * record.energy)
    # The first guided pass sees the initial noise at the first timestep with the conditional
    # embedding only (spec 4.7): recompute it here, and with the negative prompt for contrast.
    latents = prepare_latents(SEED, SAMPLING.num_frames, SAMPLING.height, SAMPLING.width, 4, "cpu", torch.float32)
    losses = {}
    for name, prompt in (("cond", condition.prompt), ("negative", SAMPLING.negative_prompt)):
        guidance = make_guidance(model, prompt, condition, ACTIVE, scheduler.timesteps)
        with guidance, torch.enable_grad():
            losses[name] = ACTIVE.loss_scale * make_energy_fn(guidance, scheduler.timesteps[0])(latents).item()
    assert result.guidance_log[0].loss == pytest.approx(losses["cond"], rel=1e-6)
    assert losses["negative"] != pytest.approx(losses["cond"], rel=1e-5)
    # Within a step each update lowers the energy the next iteration sees.
    assert result.guidance_log[1].energy < result.guidance_log[0].energy
    assert result.guidance_log[3].energy < result.guidance_log[2].energy


def test_settings_that_make_guidance_impossible_are_named():
    # Issue 17, item 25: the carried sentinel 10000 / loss_scale below the threshold guides nothing (kept, named).
    assert GuidanceConfig().disabled_reason() is None
    reason = GuidanceConfig(loss_scale=1e308).disabled_reason()
    assert "10000 / loss_scale = 1e-304" in reason and "loss_threshold 200" in reason
    assert run_step(GuidanceSchedule(GuidanceConfig(loss_scale=1e308)), 0, [1e4] * 5) == (0, 0)  # the quirk stays
    assert GuidanceConfig(loss_scale=50.0).disabled_reason() is not None  # 10000 / 50 = 200 is not above 200
    assert GuidanceConfig(loss_scale=50.0, stop_rule=STOP_PER_STEP).disabled_reason() is None
    assert "max_iter" in GuidanceConfig(max_iter=0).disabled_reason()
    assert "max_index_step" in GuidanceConfig(max_index_step=0).disabled_reason()
