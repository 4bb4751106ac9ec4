"""Frozen configs for stage 2, with the paper's defaults, and the README presets (reference spec 4.8).

- `SamplingConfig`: the denoising loop (size, frames, steps, CFG, negative prompt, initial noise).
- `GuidanceConfig`: LVD's energy guidance, each hyperparameter with the spec section it comes from;
  every field changes results.
- `ExecutionConfig`: how guidance runs (memory, early stop, recorded columns); no field changes a result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.registry import (GUIDED_METHODS, LVD_GUIDED_LAYERS, UNET3D_FAMILY, WAN_FAMILY, WAN_LVD_CORRECTOR_OFF_STEPS,
                             RunModelError, RunModelSpec, validate_num_frames, validate_size)

if TYPE_CHECKING:
    from generation.energies import EnergyWeights

# Used by every stage-2 method of the reference (spec 5.3).
NEGATIVE_PROMPT = "dull, gray, unrealistic, colorless, blurry, low-quality, weird, abrupt"

STOP_CARRIED = "carried"    # reference rule: compare the carried loss; stop for good once below (spec 4.5)
STOP_PER_STEP = "per-step"  # corrected rule (spec 15.2): recompute at every step, stop that step when below
STOP_RULES = (STOP_CARRIED, STOP_PER_STEP)

# The reference starts its carried loss (loss_scale * energy) at this sentinel (spec 4.5).
INITIAL_LOSS = 10000.0

NOISE_CPU = "cpu"              # float32 noise from a CPU generator: the same on every machine (default)
NOISE_REFERENCE = "reference"  # the reference's draw: a generator on the model's device, in its dtype
NOISE_KINDS = (NOISE_CPU, NOISE_REFERENCE)
CFG_STANDARD = "standard"      # classifier-free guidance as the pipelines run it (generation.cfg)
CFG_ZERO_STAR = "zero-star"    # CFG-Zero*'s optimised scale (generation.cfg)
CFG_VARIANTS = (CFG_STANDARD, CFG_ZERO_STAR)


@dataclass(frozen=True)
class SamplingConfig:
    """The denoising loop (spec 5)."""

    height: int
    width: int
    num_frames: int = 16                 # LVD default (spec 4.8); Zeroscope uses 24
    num_inference_steps: int = 40        # spec 4.8
    guidance_scale: float = 9.0          # CFG scale, the pipeline default (spec 5.2)
    negative_prompt: str = NEGATIVE_PROMPT  # spec 5.3
    initial_noise: str = NOISE_CPU          # see the backbone's prepare_latents
    # Wan's UniPC with its corrector off on the first K steps, so guided edits survive (README, "Wan 2.1"; 0: the
    # stock sampler). None: the model's sampler as loaded. The UNet3D family's DPM-Solver has no such setting (0).
    corrector_off_steps: int | None = None
    cfg_variant: str = CFG_STANDARD      # generation.cfg: "standard" or "zero-star"
    guidance_rescale: float = 0.0        # generation.cfg: Lin et al.'s rescale (0: off)

    def __post_init__(self):
        if self.cfg_variant not in CFG_VARIANTS:
            raise ValueError(f"cfg_variant must be one of {CFG_VARIANTS}, found {self.cfg_variant!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], found {self.guidance_rescale}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, found {self.guidance_scale}")
        if self.initial_noise not in NOISE_KINDS:
            raise ValueError(f"initial_noise must be one of {NOISE_KINDS}, found {self.initial_noise!r}")
        if self.corrector_off_steps is not None and self.corrector_off_steps < 0:
            raise ValueError(f"corrector_off_steps must be >= 0, found {self.corrector_off_steps}")
        for name in ("height", "width", "num_frames", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, found {getattr(self, name)}")


@dataclass(frozen=True)
class GuidanceConfig:
    """LVD energy guidance on the conditional branch; defaults of the reference's ``run()`` (spec 4.8)."""

    loss_scale: float = 5.0          # spec 4.5: the energy is scaled by this before its gradient is taken
    loss_threshold: float = 200.0    # spec 4.5: guide while the (unscaled) energy is above this
    max_iter: int | tuple[int, ...] = 5   # spec 4.5: guided iterations per step (a per-step tuple allowed)
    max_index_step: int = 10         # spec 4.5: guide the first max_index_step denoising steps
    fg_top_p: float = 0.75           # spec 4.4: top-k fraction inside the box
    bg_top_p: float = 0.75           # spec 4.4: top-k fraction outside the box
    fg_weight: float = 1.0           # spec 4.4
    bg_weight: float = 4.0           # spec 4.4
    attn_sync_weight: float = 0.0    # spec 4.4 (optional term, off)
    boxdiff_loss_scale: float = 0.0  # spec 4.4 (optional BoxDiff term, off)
    boxdiff_normed: bool = True      # spec 4.4
    com_loss_scale: float = 0.0      # spec 4.4 (centre of mass; the benchmark preset uses 0.03)
    use_ratio_based_loss: bool = False  # spec 4.4 (replaces the fg/bg terms)
    stop_rule: str = STOP_CARRIED    # spec 4.5 (carried, the reference) or 15.2 (per-step)
    guided_layers: tuple[str, ...] = LVD_GUIDED_LAYERS  # spec 4.1 (module paths of the backbone)

    def __post_init__(self):
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, found {self.stop_rule!r}")

    def iterations_at(self, step_index: int) -> int:
        if isinstance(self.max_iter, int):
            return self.max_iter
        return self.max_iter[step_index] if step_index < len(self.max_iter) else 0

    def disabled_reason(self) -> str | None:
        """Why these settings can run no guided iteration at all, in one sentence; None when they can.

        Faithful: the settings are kept (the reference ran such videos unguided without a word); callers warn.
        """
        if self.max_index_step == 0:
            return "max_index_step is 0, so no denoising step is guided"
        if not any(self.iterations_at(step) for step in range(self.max_index_step)):
            return f"max_iter is {self.max_iter}, so no guided iteration runs"
        start = INITIAL_LOSS / self.loss_scale
        if self.stop_rule == STOP_CARRIED and not start > self.loss_threshold:
            return (f"the reference's carried energy starts at {INITIAL_LOSS:g} / loss_scale = {start:g}, which is not "
                    f"above loss_threshold {self.loss_threshold:g}, so guidance never starts (lower loss_scale or "
                    f"loss_threshold, or use the per-step stop rule)")
        return None

    def energy_weights(self) -> "EnergyWeights":
        """The energy's numbers; each term of `generation.energies.ENERGY_TERMS` takes its field of this config."""
        # Imported here: energies needs torch, and configs are built on paths that need none (--help, --dry-run).
        from generation.energies import EnergyWeights

        return EnergyWeights(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EnergyWeights)
                                if hasattr(self, f.name)})


@dataclass(frozen=True)
class ExecutionConfig:
    """How guidance runs. No switch changes a result; off reproduces the reference's work for comparison."""

    stop_after_last_guided_layer: bool = True  # a guided pass ends once the last guided layer is recorded
    record_object_tokens_only: bool = True     # keep only the objects' token columns of the maps
    # Keep the guided pass's saved activations in host memory (UNet3D) or recompute them (gradient
    # checkpointing, DiT backbones): slower, same result, for 24 GB cards.
    low_memory: bool = False


def sampling_config_for(spec: RunModelSpec, *, num_frames: int | None = None, height: int | None = None,
                        width: int | None = None, num_inference_steps: int | None = None,
                        guidance_scale: float | None = None, initial_noise: str = NOISE_CPU,
                        corrector_off_steps: int | None = None, cfg_variant: str = CFG_STANDARD,
                        guidance_rescale: float = 0.0) -> SamplingConfig:
    """The run-model's sampling defaults (size, frames, steps, CFG, negative prompt, sampler), with the given
    overrides validated against what the model allows (raises `models.registry.RunModelError`).

    ``corrector_off_steps`` defaults to the guided steps of the default schedule for LVD Wan run-models and to
    0 (the stock sampler) otherwise; only the Wan family takes another value.
    """
    height, width = validate_size(spec, height, width)
    if spec.family != WAN_FAMILY and corrector_off_steps:
        raise RunModelError(f"run-model {spec.name!r} samples with DPM-Solver: corrector_off_steps applies to the "
                            f"Wan run-models only, found {corrector_off_steps}")
    if corrector_off_steps is None:
        guided_wan = spec.family == WAN_FAMILY and spec.method in GUIDED_METHODS
        corrector_off_steps = WAN_LVD_CORRECTOR_OFF_STEPS if guided_wan else 0
    return SamplingConfig(
        height=height, width=width, num_frames=validate_num_frames(spec, num_frames),
        num_inference_steps=spec.num_inference_steps if num_inference_steps is None else num_inference_steps,
        guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
        negative_prompt=NEGATIVE_PROMPT if spec.negative_prompt is None else spec.negative_prompt,
        initial_noise=initial_noise, corrector_off_steps=corrector_off_steps, cfg_variant=cfg_variant,
        guidance_rescale=guidance_rescale)


def weak_guidance_preset(base_model: str = "zeroscope") -> GuidanceConfig:
    """README weak-guidance preset (spec 4.8): threshold 350 for Zeroscope, 250 for ModelScope."""
    return GuidanceConfig(loss_scale=2.5, loss_threshold=350.0 if base_model == "zeroscope" else 250.0,
                          max_iter=1, max_index_step=10, fg_top_p=0.25, bg_top_p=0.25, fg_weight=1.0,
                          bg_weight=2.0)


# The LVD-Shapes models' tuned loss scales, per family (docs/BENCHMARKS.md: "LVD-Shapes", "The Wan sibling's
# guidance"): the same step moves the Wan sibling's latents far less than the UNet's.
SHAPES_LOSS_SCALES = {UNET3D_FAMILY: 20.0, WAN_FAMILY: 300.0}


def shapes_preset(family: str = UNET3D_FAMILY) -> GuidanceConfig:
    """The tuned guidance of an LVD-Shapes model (models/shapes.py): its energies stay below the paper's threshold
    of 200, which stops guidance after one iteration, so every guided iteration runs (threshold 0), with the
    family's stronger step (`SHAPES_LOSS_SCALES`)."""
    if family not in SHAPES_LOSS_SCALES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(SHAPES_LOSS_SCALES)}")
    return GuidanceConfig(loss_scale=SHAPES_LOSS_SCALES[family], loss_threshold=0.0)


def benchmark_preset() -> GuidanceConfig:
    """The benchmark runs: the defaults plus ``com_loss_scale 0.03`` (spec 4.8)."""
    return GuidanceConfig(com_loss_scale=0.03)


def derive_seed(prompt_index: int, repeat_index: int = 0, seed_offset: int = 0) -> int:
    """The seed of one video (spec 5.4): prompt index + 6789 * repeat index + offset."""
    return prompt_index + repeat_index * 6789 + seed_offset


def replace_config(config, **overrides):
    """``dataclasses.replace`` that ignores None values (unset CLI overrides)."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
