"""Loading the upsamplers of `scripts/upsample.py` (spec 11): Zeroscope v2 XL and the SDXL refiner.

Zeroscope v2 XL (``cerspense/zeroscope_v2_XL``) is a ModelScope-architecture video model laid out like
the other video repos (unet/, vae/, text_encoder/, tokenizer/, scheduler/: its model_index.json lists
all five), so it loads into a `VideoModel` with the shared rules of `models.loading`. Its scheduler is
DPM-Solver++ built from **its own** DDIM config, which has ``timestep_spacing: "leading"`` and
``steps_offset: 1`` (spec 11; the reference's ``zeroscope_xl`` baseline used the 576w config, 15.10).

The SDXL refiner (``stabilityai/stable-diffusion-xl-refiner-1.0``) runs through diffusers' maintained
`StableDiffusionXLImg2ImgPipeline`, built from the refiner's component folders (fp16 variant when the
dtype is fp16 and the folder has it, as the reference loads it on CUDA).

Tiny random-weight versions of both (`build_tiny_zeroscope_xl`, `build_tiny_sdxl_refiner`) run the real
code paths for tests and the ``--tiny`` demo; their outputs are noise.

Memory (``cpu_offload``): the components stay in CPU memory and accelerate hooks move each one to the
GPU when it runs (text encoder -> unet -> vae, the order diffusers' model offload uses), so only the
running component's weights occupy the GPU. VAE slicing (one frame per encode / decode call) is
always on; ``vae_tiling`` also splits each frame into tiles (changes results slightly: off by default).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import types
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler,
                       StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from models.devices import build_seeded, cast_module, resolve_device, resolve_dtype
from models.hub import MissingWeightsError, resolve_model_folder
from models.schedulers import ZEROSCOPE_XL_DDIM_SCHEDULER_CONFIG, build_zeroscope_xl_scheduler
from models.tiny import TINY_TEXT_ENCODER_CONFIG, TINY_VAE_CONFIG, build_tiny_components, save_tiny_model
from models.tokenizer import build_clip_tokenizer
from models.video_model import (VIDEO_MODEL_CONFIG_FILES, VIDEO_MODEL_WEIGHT_FOLDERS, VideoModel,
                                assemble_video_model, load_components_from_folder)
from utils.io import atomic_folder, atomic_write_json

logger = logging.getLogger(__name__)

ZEROSCOPE_XL_ID = "cerspense/zeroscope_v2_XL"
SDXL_REFINER_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"

# What a refiner folder must hold. The refiner has no first text encoder / tokenizer (null in its
# model_index.json): only the OpenCLIP-bigG tower with projection, as text_encoder_2.
SDXL_REFINER_CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder_2/config.json",
    "tokenizer_2/*.json",
    "scheduler/scheduler_config.json",
)
SDXL_REFINER_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder_2")

# The refiner's Euler scheduler settings (its scheduler_config.json: scaled-linear betas, leading
# spacing, steps_offset 1). Used by the tiny refiner only.
SDXL_REFINER_SCHEDULER_CONFIG = types.MappingProxyType({
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
})

# Tiny refiner. The real refiner UNet: (DownBlock2D, CrossAttn x2, DownBlock2D) over (384, 768, 1536,
# 1536) channels, cross-attention to the 1280-d penultimate hidden states of text_encoder_2, and
# "text_time" added conditioning: pooled text (projection_dim) + 5 size/crop/aesthetic-score values of
# addition_time_embed_dim each (requires_aesthetics_score). The tiny one keeps the block pattern and
# that arithmetic: 32 + 5 * 8 = 72.
TINY_SDXL_TEXT_HIDDEN_SIZE = 32
TINY_SDXL_TIME_EMBED_DIM = 8
SDXL_REFINER_NUM_TIME_IDS = 5  # original (h, w), crop (top, left), aesthetic score
TINY_SDXL_UNET_CONFIG = types.MappingProxyType({
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": (2, 4, 4, 4),
    "transformer_layers_per_block": 1,
    "use_linear_projection": True,
    "cross_attention_dim": TINY_SDXL_TEXT_HIDDEN_SIZE,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_SDXL_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": TINY_SDXL_TEXT_HIDDEN_SIZE
    + SDXL_REFINER_NUM_TIME_IDS * TINY_SDXL_TIME_EMBED_DIM,
})
TINY_SDXL_TEXT_ENCODER_2_CONFIG = types.MappingProxyType(
    {**TINY_TEXT_ENCODER_CONFIG, "hidden_size": TINY_SDXL_TEXT_HIDDEN_SIZE,
     "projection_dim": TINY_SDXL_TEXT_HIDDEN_SIZE})
# The SDXL VAE: SD's architecture with scaling factor 0.13025, upcast to fp32 for decoding.
TINY_SDXL_VAE_CONFIG = types.MappingProxyType({**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True})
_SDXL_SEED_OFFSETS = {"unet": 10, "vae": 11, "text_encoder_2": 12}


# ---------------------------------------------------------------------------------------------
# Zeroscope v2 XL


def enable_model_cpu_offload(model: VideoModel, execution_device: torch.device) -> VideoModel:
    """Keep ``model``'s components in CPU memory; each moves to ``execution_device`` when it runs and
    the previous one moves back (text encoder -> unet -> vae). Returns the model with ``device`` set to
    the execution device (where inputs must go)."""
    from accelerate import cpu_offload_with_hook

    hook = None
    for module in (model.text_encoder, model.unet, model.vae):
        module.to("cpu")
        _, hook = cpu_offload_with_hook(module, execution_device, prev_module_hook=hook)
    return dataclasses.replace(model, device=execution_device)


def _apply_video_memory_options(model: VideoModel, device: torch.device, cpu_offload: bool,
                                vae_tiling: bool) -> VideoModel:
    if vae_tiling:
        model.vae.enable_tiling()
    if cpu_offload:
        return enable_model_cpu_offload(model, device)
    return model


def _placement(device: torch.device, cpu_offload: bool) -> tuple[torch.device, bool]:
    """Where to put weights at load time, and whether offload applies (it does nothing on a CPU)."""
    if cpu_offload and device.type == "cpu":
        logger.warning("--cpu-offload has no effect on a CPU device; ignoring it")
        cpu_offload = False
    return (torch.device("cpu") if cpu_offload else device), cpu_offload


def load_zeroscope_xl(model_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None, *, cpu_offload: bool = False,
                      vae_tiling: bool = False, local_files_only: bool = False,
                      cache_dir: str | os.PathLike | None = None, path_flag: str = "--zsxl-model-path") -> VideoModel:
    """Zeroscope v2 XL from ``model_path`` or the HF cache / hub (`MissingWeightsError` naming
    ``cerspense/zeroscope_v2_XL`` otherwise), with DPM-Solver++ from its own scheduler config.

    Default device: CUDA if available; default dtype: fp16 on CUDA, fp32 on CPU.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = resolve_model_folder(ZEROSCOPE_XL_ID, model_path, required_files=VIDEO_MODEL_CONFIG_FILES,
                                  weight_folders=VIDEO_MODEL_WEIGHT_FOLDERS, local_files_only=local_files_only,
                                  cache_dir=cache_dir, path_flag=path_flag)
    logger.info("loading %s from %s (%s, %s)", ZEROSCOPE_XL_ID, folder, device, dtype)
    components = load_components_from_folder(folder, dtype)  # scheduler: DPM from the XL folder's config
    load_device, cpu_offload = _placement(device, cpu_offload)
    model = assemble_video_model(components, load_device, dtype, None, str(folder))
    return _apply_video_memory_options(model, device, cpu_offload, vae_tiling)


def build_tiny_zeroscope_xl(seed: int = 0, device: str | torch.device | None = "cpu",
                            dtype: str | torch.dtype | None = None, *, cpu_offload: bool = False,
                            vae_tiling: bool = False) -> VideoModel:
    """A tiny random-weight stand-in for Zeroscope XL (the tiny video model of `models.tiny` with the XL
    scheduler). Same seed, same weights. Its videos are noise."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    components = build_tiny_components(seed)
    components["scheduler"] = build_zeroscope_xl_scheduler()
    load_device, cpu_offload = _placement(device, cpu_offload)
    model = assemble_video_model(components, load_device, dtype, None, f"tiny random Zeroscope XL (seed {seed})")
    return _apply_video_memory_options(model, device, cpu_offload, vae_tiling)


def save_tiny_zeroscope_xl(folder: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write the tiny Zeroscope XL as a hub-like folder that ``load_zeroscope_xl(model_path=folder)`` loads."""
    folder = save_tiny_model(folder, seed, overwrite=overwrite)
    atomic_write_json(folder / "scheduler" / "scheduler_config.json", dict(ZEROSCOPE_XL_DDIM_SCHEDULER_CONFIG))
    return folder


# ---------------------------------------------------------------------------------------------
# SDXL refiner


def _has_variant(folder: Path, variant: str, weight_folders=SDXL_REFINER_WEIGHT_FOLDERS) -> bool:
    """Whether every weight folder holds ``*.<variant>.safetensors`` (or .bin) files."""
    return all(any((folder / sub).glob(f"*.{variant}.safetensors")) or any((folder / sub).glob(f"*.{variant}.bin"))
               for sub in weight_folders)


def _prepare_sdxl_pipeline(pipe: StableDiffusionXLImg2ImgPipeline, device: torch.device, cpu_offload: bool,
                           vae_tiling: bool) -> StableDiffusionXLImg2ImgPipeline:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder_2):
        module.eval()
        module.requires_grad_(False)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sdxl_refiner(model_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None, *, cpu_offload: bool = False,
                      vae_tiling: bool = False, local_files_only: bool = False,
                      cache_dir: str | os.PathLike | None = None, path_flag: str = "--sdxl-model-path") -> StableDiffusionXLImg2ImgPipeline:
    """The SDXL refiner img2img pipeline from ``model_path`` or the HF cache / hub
    (`MissingWeightsError` naming ``stabilityai/stable-diffusion-xl-refiner-1.0`` otherwise).

    fp16 loads the ``fp16`` weight variant when the folder has it (as the reference does); no watermark
    (the reference environment had no invisible-watermark package).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = resolve_model_folder(SDXL_REFINER_ID, model_path, required_files=SDXL_REFINER_CONFIG_FILES,
                                  weight_folders=SDXL_REFINER_WEIGHT_FOLDERS, local_files_only=local_files_only,
                                  cache_dir=cache_dir, path_flag=path_flag)
    variant = "fp16" if dtype == torch.float16 and _has_variant(folder, "fp16") else None
    logger.info("loading %s from %s (%s, %s, variant %s)", SDXL_REFINER_ID, folder, device, dtype, variant)
    try:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder), dtype=dtype, variant=variant,
                                                                local_files_only=True, add_watermarker=False)
    except OSError as exc:  # diffusers / transformers raise OSError (EnvironmentError) for missing files
        raise MissingWeightsError(f"could not load the {SDXL_REFINER_ID} weights from {folder}: {exc}") from exc
    cpu_offload = _placement(device, cpu_offload)[1]
    return _prepare_sdxl_pipeline(pipe, device, cpu_offload, vae_tiling)


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """Tiny fp32 CPU refiner components (the keyword arguments of `StableDiffusionXLImg2ImgPipeline`)."""
    unet = build_seeded(seed + _SDXL_SEED_OFFSETS["unet"],
                         lambda: UNet2DConditionModel.from_config(dict(TINY_SDXL_UNET_CONFIG)))
    vae = build_seeded(seed + _SDXL_SEED_OFFSETS["vae"],
                        lambda: AutoencoderKL.from_config(dict(TINY_SDXL_VAE_CONFIG)))
    text_config = CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2_CONFIG)
    text_encoder_2 = build_seeded(seed + _SDXL_SEED_OFFSETS["text_encoder_2"],
                                   lambda: CLIPTextModelWithProjection(text_config))
    return {"vae": vae, "text_encoder": None, "text_encoder_2": text_encoder_2, "tokenizer": None,
            "tokenizer_2": build_clip_tokenizer(), "unet": unet,
            "scheduler": EulerDiscreteScheduler.from_config(dict(SDXL_REFINER_SCHEDULER_CONFIG)),
            "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False, "add_watermarker": False}


def build_tiny_sdxl_refiner(seed: int = 0, device: str | torch.device | None = "cpu",
                            dtype: str | torch.dtype | None = None, *, cpu_offload: bool = False,
                            vae_tiling: bool = False) -> StableDiffusionXLImg2ImgPipeline:
    """A tiny random-weight SDXL refiner img2img pipeline. Same seed, same weights. Its frames are noise."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    components = build_tiny_sdxl_components(seed)
    for name in ("unet", "vae", "text_encoder_2"):
        cast_module(components[name], dtype)
    pipe = StableDiffusionXLImg2ImgPipeline(**components)
    return _prepare_sdxl_pipeline(pipe, device, _placement(device, cpu_offload)[1], vae_tiling)


def save_tiny_sdxl_refiner(folder: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write the tiny refiner as a hub-like folder that ``load_sdxl_refiner(model_path=folder)`` loads.

    Written next to its destination and renamed into place, so it is never half-written.
    """
    pipe = StableDiffusionXLImg2ImgPipeline(**build_tiny_sdxl_components(seed))
    with atomic_folder(folder, overwrite=overwrite) as staging:
        pipe.save_pretrained(str(staging))
    return Path(folder)
