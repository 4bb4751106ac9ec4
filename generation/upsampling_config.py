"""The upsamplers' settings, sizes and file names (spec 11), without torch: what `scripts/upsample.py` needs to
parse its flags and plan its outputs (``--help`` runs in a second). The refinement itself is
:mod:`generation.upsampling`, which re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Spec 11 defaults.
UPSAMPLE_NEGATIVE_PROMPT = ("dull, gray, unrealistic, colorless, drawing, painting, crayon, sketch, graphite, "
                            "impressionist, noisy, blurry, soft, deformed, ugly")
DEFAULT_STRENGTH = 0.35
DEFAULT_SEED = 1
CHAINED_SDXL_STRENGTH = 0.1          # --use_zssdxl: SDXL after Zeroscope XL
HORIZONTAL_SIZE = (576, 1024)        # (height, width) with --horizontal: Zeroscope XL's native size
SQUARE_SIZE = (1024, 1024)           # (height, width) otherwise
GIF_FPS = 8.0                        # 125 ms per frame
MP4_FPS = 8.01
ZEROSCOPE_XL = "zsxl"
SDXL = "sdxl"
UPSAMPLERS = (ZEROSCOPE_XL, SDXL)


@dataclass(frozen=True)
class RefineConfig:
    """One image-to-image / video-to-video refinement. Use the presets `zeroscope_xl_refine_config` and
    `sdxl_refine_config` for each model's defaults (the stock pipelines' defaults, spec 11)."""

    strength: float = DEFAULT_STRENGTH           # spec 11
    num_inference_steps: int = 50                # stock pipeline default (spec 11)
    guidance_scale: float = 15.0                 # VideoToVideoSDPipeline default; SDXL's is 5.0
    negative_prompt: str | None = UPSAMPLE_NEGATIVE_PROMPT
    seed: int = DEFAULT_SEED                     # spec 11

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], found {self.strength}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, found {self.num_inference_steps}")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} with {self.num_inference_steps} steps leaves no denoising "
                             f"step (int(steps * strength) = 0); raise the strength or the number of steps")


def zeroscope_xl_refine_config(**overrides) -> RefineConfig:
    """Zeroscope XL: strength 0.35, 50 steps, guidance 15.0, spec 11's negative prompt, seed 1."""
    return RefineConfig(**overrides)


def sdxl_refine_config(**overrides) -> RefineConfig:
    """SDXL refiner: strength 0.35, 50 steps, guidance 5.0, seed 1, no negative prompt (spec 11 passes
    only the prompt, the frame and the strength to this pipeline)."""
    return RefineConfig(**{"guidance_scale": 5.0, "negative_prompt": None, **overrides})


def compute_target_size(horizontal: bool, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) of the upsampled video: 576x1024 with ``horizontal``, else 1024x1024 (spec 11);
    ``height`` / ``width`` override either. Both must be positive multiples of 8 (the VAE factor)."""
    default_height, default_width = HORIZONTAL_SIZE if horizontal else SQUARE_SIZE
    height = default_height if height is None else height
    width = default_width if width is None else width
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), found {value}")
    return height, width


def format_strength(strength: float) -> str:
    """The strength as the reference's file names write it (Python's ``str`` of the float: 0.1, 0.5, 1.0)."""
    return str(float(strength))


def upsampled_video_stem(video_path: str | Path, upsampler: str, strength: float) -> Path:
    """``<video>_<upsampler>`` for the default strength 0.35, else ``<video>_<upsampler>_s<strength>``
    (spec 11), next to the input. ``video_path`` is the input's joblib path (or any path with a suffix)."""
    if upsampler not in UPSAMPLERS:
        raise ValueError(f"unknown upsampler {upsampler!r}; expected one of {UPSAMPLERS}")
    video_path = Path(video_path)
    suffix = f"_{upsampler}" if strength == DEFAULT_STRENGTH else f"_{upsampler}_s{format_strength(strength)}"
    return video_path.with_name(video_path.stem + suffix)
