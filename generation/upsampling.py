"""Upsampling generated videos to high resolution (spec 11): Zeroscope v2 XL video-to-video, and the
SDXL refiner frame by frame.

Zeroscope XL (`refine_video_zeroscope_xl`) refines the whole video at once, as diffusers'
(deprecated) ``VideoToVideoSDPipeline`` does, which the reference used; the loop here is our own and
reproduces that pipeline (tests/test_upsample.py):
- frames (already resized to the target size) -> [-1, 1] -> VAE encode (one frame per call),
  a sample of the posterior, times the VAE scaling factor;
- the DPM-Solver++ timesteps truncated by ``strength`` as diffusers' img2img ``get_timesteps`` does:
  the last ``int(steps * strength)`` of ``steps`` timesteps;
- noise added at the first kept timestep; posterior sample and noise both drawn from one CPU generator
  seeded with ``seed`` (the reference's ``torch.manual_seed(seed)``), in the model dtype;
- CFG with the negative prompt, the scheduler step on (frames, 4, h, w), decode one frame per call,
  ``floor(255 * clip(x / 2 + 0.5, 0, 1))``.

The SDXL refiner (`refine_frames_sdxl`) runs diffusers' ``StableDiffusionXLImg2ImgPipeline`` on each
frame with the prompt, the strength and the stock defaults (50 steps, guidance 5.0); spec 11 names no
negative prompt for it, so `sdxl_refine_config` sets none. [quirk] Each frame gets a generator re-seeded with the same seed (spec 11, 15.11), so every frame
gets the same noise; the reference does this, possibly on purpose (it keeps frames consistent).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from generation.backbones.unet3d import UNet3DBackbone
from generation.loop import StepCallback, denoise
from generation.upsampling_config import (CHAINED_SDXL_STRENGTH, DEFAULT_SEED, DEFAULT_STRENGTH, GIF_FPS,  # noqa: F401
                                          HORIZONTAL_SIZE, MP4_FPS, SDXL, SQUARE_SIZE, UPSAMPLE_NEGATIVE_PROMPT,
                                          UPSAMPLERS, ZEROSCOPE_XL, RefineConfig, compute_target_size, format_strength,
                                          sdxl_refine_config, upsampled_video_stem, zeroscope_xl_refine_config)
from utils.video_io import validate_frames

logger = logging.getLogger(__name__)

FrameCallback = Callable[[int, int], None]  # (frame index, number of frames)


@dataclass
class RefineResult:
    frames: np.ndarray          # (F, H, W, 3) uint8 RGB
    latents: torch.Tensor       # (1, 4, F, h, w) final latents before decoding, on the CPU
    seed: int
    prompt: str


# ---------------------------------------------------------------------------------------------
# Sizes, names, frames


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, height, width, 3) uint8 with PIL's LANCZOS filter (spec 11).
    Frames already at that size are returned unchanged."""
    validate_frames(frames)
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.LANCZOS)) for frame in frames])


def frames_to_model_input(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float32 in [-1, 1], as diffusers' image processor does."""
    images = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32) / 255.0
    return 2.0 * images.permute(0, 3, 1, 2) - 1.0


# ---------------------------------------------------------------------------------------------
# Zeroscope XL video-to-video


def compute_img2img_timesteps(scheduler, num_inference_steps: int, strength: float, device=None) -> torch.Tensor:
    """Set ``scheduler``'s timesteps and return the last ``int(steps * strength)`` of them, and set the
    scheduler's begin index there (diffusers' img2img ``get_timesteps``)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    num_kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - num_kept, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def encode_video_latents(vae, frames: np.ndarray, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 4, H/8, W/8): a posterior sample times the scaling factor.

    One VAE call over all frames: with slicing on, the VAE encodes one frame at a time, and the
    posterior is sampled in one draw as the reference pipeline does.
    """
    video = frames_to_model_input(frames).to(device=device, dtype=dtype)
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
    return vae.config.scaling_factor * posterior.sample(generator)


def refine_video_zeroscope_xl(model, frames: np.ndarray, prompt: str, config: RefineConfig, *,
                              step_callback: StepCallback | None = None) -> RefineResult:
    """Refine a video with Zeroscope XL (video-to-video), at the frames' size.

    ``model`` is a `models.video_model.VideoModel` (see `models.upsamplers.load_zeroscope_xl`); ``frames``
    (F, H, W, 3) uint8 are already at the target size (`resize_frames`). Returns (F, H, W, 3) uint8.
    """
    validate_frames(frames)
    backbone = UNet3DBackbone(model)
    scheduler = backbone.make_scheduler()  # fresh: DPM-Solver keeps state
    use_cfg = config.guidance_scale > 1.0  # as the pipeline: no unconditional pass at scale <= 1
    text = backbone.encode_text([prompt], (config.negative_prompt or "") if use_cfg else None)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    timesteps = compute_img2img_timesteps(scheduler, config.num_inference_steps, config.strength, model.device)

    init_latents = encode_video_latents(model.vae, frames, generator, model.device, model.dtype)  # (F, 4, h, w)
    noise = randn_tensor(init_latents.shape, generator=generator, device=model.device, dtype=model.dtype)
    noisy = scheduler.add_noise(init_latents, noise, timesteps[:1])
    latents = noisy[None].permute(0, 2, 1, 3, 4)                                                  # (1, 4, F, h, w)
    latents = denoise(backbone, latents, scheduler, timesteps, text, config.guidance_scale,
                      step_callback=step_callback)
    return RefineResult(frames=backbone.decode(latents), latents=latents.detach().cpu(), seed=config.seed,
                        prompt=prompt)


# ---------------------------------------------------------------------------------------------
# SDXL refiner, per frame


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def _without_vae_cast_warnings():
    """The SDXL pipeline casts its VAE to fp32 and back on every call (the refiner VAE's force_upcast) and
    diffusers logs a warning for each cast: two per frame, all alike. Drop them while refining."""
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    message_filter = _DropMessages("Casting directly with `to()`")
    diffusers_logger.addFilter(message_filter)
    try:
        yield
    finally:
        diffusers_logger.removeFilter(message_filter)


def refine_frames_sdxl(pipe, frames: np.ndarray, prompt: str, config: RefineConfig, *,
                       frame_callback: FrameCallback | None = None) -> np.ndarray:
    """Refine each frame with the SDXL refiner img2img pipeline ``pipe``, at the frames' size.

    ``frames`` (F, H, W, 3) uint8 -> (F, H, W, 3) uint8 (the pipeline's PIL output, rounded).
    [quirk] The generator is re-seeded with ``config.seed`` for every frame (spec 11, 15.11).
    """
    validate_frames(frames)
    refined = []
    for frame_index, frame in enumerate(frames):
        generator = torch.Generator("cpu").manual_seed(config.seed)  # same noise for every frame
        with _without_vae_cast_warnings():
            image = pipe(prompt=prompt, image=Image.fromarray(frame), strength=config.strength,
                         num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                         negative_prompt=config.negative_prompt, generator=generator, output_type="pil").images[0]
        refined.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        if frame_callback is not None:
            frame_callback(frame_index, len(frames))
    return np.stack(refined)
