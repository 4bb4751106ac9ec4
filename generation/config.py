"""Frozen configs for stage 2, with the paper's defaults, and the README presets (reference spec 4.8)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.registry import LVD_GUIDED_LAYERS

# Used by every stage-2 method (spec 5.3).
NEGATIVE_PROMPT = "dull, gray, unrealistic, colorless, blurry, low-quality, weird, abrupt"

STOP_CARRIED = "carried"    # reference rule: compare the carried loss; stop for good once below (spec 4.5)
STOP_PER_STEP = "per-step"  # corrected rule (spec 15.2): recompute at every step, stop that step when below
STOP_RULES = (STOP_CARRIED, STOP_PER_STEP)

NOISE_CPU = "cpu"              # float32 noise from a CPU generator: the same on every machine (default)
NOISE_REFERENCE = "reference"  # the reference's draw: a generator on the model's device, in its dtype


@dataclass(frozen=True)
class SamplingConfig:
    """The denoising loop (spec 5)."""

    height: int
    width: int
    num_frames: int = 16                 # LVD default (spec 4.8); Zeroscope uses 24
    num_inference_steps: int = 40        # spec 4.8
    guidance_scale: float = 9.0          # CFG scale, the pipeline default (spec 5.2)
    negative_prompt: str = NEGATIVE_PROMPT  # spec 5.3
    initial_noise: str = NOISE_CPU          # see generation.sampling.prepare_latents


@dataclass(frozen=True)
class GuidanceConfig:
    """Energy guidance on the conditional branch (spec 4.4-4.8); defaults of the reference's ``run()``."""

    loss_scale: float = 5.0
    loss_threshold: float = 200.0
    max_iter: int | tuple[int, ...] = 5   # per-step list allowed
    max_index_step: int = 10
    fg_top_p: float = 0.75
    bg_top_p: float = 0.75
    fg_weight: float = 1.0
    bg_weight: float = 4.0
    attn_sync_weight: float = 0.0
    boxdiff_loss_scale: float = 0.0
    boxdiff_normed: bool = True
    com_loss_scale: float = 0.0
    use_ratio_based_loss: bool = False
    stop_rule: str = STOP_CARRIED
    guided_layers: tuple[str, ...] = LVD_GUIDED_LAYERS  # spec 4.1
    # Efficiency switches that change no result; off reproduces the reference's work for comparison.
    stop_after_last_guided_layer: bool = True
    record_object_tokens_only: bool = True
    # Keep the guided pass's saved activations in host memory (slower, same result): for 24 GB cards.
    low_memory: bool = False

    def __post_init__(self):
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, found {self.stop_rule!r}")

    def iterations_at(self, step_index: int) -> int:
        if isinstance(self.max_iter, int):
            return self.max_iter
        return self.max_iter[step_index] if step_index < len(self.max_iter) else 0

    def energy_weights(self) -> dict:
        """Keyword arguments of :func:`generation.energies.compute_layer_energy`."""
        return {"fg_top_p": self.fg_top_p, "bg_top_p": self.bg_top_p, "fg_weight": self.fg_weight,
                "bg_weight": self.bg_weight, "com_loss_scale": self.com_loss_scale,
                "use_ratio_based_loss": self.use_ratio_based_loss,
                "boxdiff_loss_scale": self.boxdiff_loss_scale, "boxdiff_normed": self.boxdiff_normed,
                "attn_sync_weight": self.attn_sync_weight}


def weak_guidance_preset(base_model: str = "zeroscope") -> dict:
    """README weak-guidance overrides (spec 4.8): threshold 350 for Zeroscope, 250 for ModelScope."""
    return {"loss_scale": 2.5, "loss_threshold": 350.0 if base_model == "zeroscope" else 250.0,
            "max_iter": 1, "max_index_step": 10, "fg_top_p": 0.25, "bg_top_p": 0.25,
            "fg_weight": 1.0, "bg_weight": 2.0}


def benchmark_preset() -> dict:
    """The benchmark runs: the defaults plus ``com_loss_scale 0.03`` (spec 4.8)."""
    return {"com_loss_scale": 0.03}


def replace_config(config, **overrides):
    """``dataclasses.replace`` that ignores None values (unset CLI overrides)."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def derive_seed(prompt_index: int, repeat_index: int = 0, seed_offset: int = 0) -> int:
    """The seed of one video (spec 5.4): prompt index + 6789 * repeat index + offset."""
    return prompt_index + repeat_index * 6789 + seed_offset
