"""Random-weight video models: tiny ones for tests and demos, full-size ones for GPU benchmarks.

Tiny models use the real classes (`UNet3DConditionModel`, `AutoencoderKL`, `CLIPTextModel`, the real
CLIP tokenizer, DPM-Solver++ from ModelScope's DDIM config) with shrunken configs that keep the real
module paths, so the six guided cross-attention layers of spec 4.1 exist. Same seed, same weights.

Tiny architecture (see `TINY_UNET_CONFIG`): 4 levels (16, 32, 64, 64) channels, i.e. the 1:2:4:4
ratios of ModelScope's (320, 640, 1280, 1280); per-head size 8, so the guided layers have 4 heads
(level 1) and 8 heads (level 2), like ModelScope's 10 and 20; text width 32. At 128x128 pixels the
latents are 16x16 and the guided maps 8x8 and 4x4.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from models.devices import build_seeded, cast_module, resolve_device, resolve_dtype
from models.gligen import attach_gligen_modules, build_grounded_unet, fuser_modules
from models.registry import TINY_HEIGHT, RunModelSpec
from models.schedulers import MODELSCOPE_DDIM_SCHEDULER_CONFIG, build_dpm_scheduler
from models.tokenizer import VOCAB_SIZE, build_clip_tokenizer, load_tokenizer
from models.video_model import VideoModel, assemble_video_model
from utils.io import atomic_folder, atomic_write_json

TINY_TEXT_HIDDEN_SIZE = 32
# Block types, layers per block and the "attention_head_dim is the per-head size" convention are
# ModelScope's; only widths shrink.
TINY_UNET_CONFIG = types.MappingProxyType({
    "sample_size": TINY_HEIGHT // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "cross_attention_dim": TINY_TEXT_HIDDEN_SIZE,
    "attention_head_dim": 8,
})
# 4 levels keep the real 8x spatial factor.
TINY_VAE_CONFIG = types.MappingProxyType({
    "sample_size": TINY_HEIGHT,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
})
# Real vocabulary and 77 positions so the real tokenizer's ids work. The special-token ids copy
# ModelScope's text_encoder config (eos_token_id 2 selects transformers' legacy pooled-output path).
TINY_TEXT_ENCODER_CONFIG = types.MappingProxyType({
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TINY_TEXT_HIDDEN_SIZE,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": TINY_TEXT_HIDDEN_SIZE,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
})
# model_index.json of a saved tiny model (the layout of the real hub repos).
TINY_MODEL_INDEX = types.MappingProxyType({
    "_class_name": "TextToVideoSDPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet3DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
})
# Each component gets its own seed derived from the model seed, so their weights are independent.
# The GLIGEN modules of the grounded UNet have their own, so its stock part equals the tiny UNet.
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "gligen": 3}
# Gate value (alpha_attn, alpha_dense) of the tiny grounded UNet's fusers. diffusers initialises the
# gates to 0 (fusers are no-ops); trained adapters have non-zero gates, so the tiny model does too.
TINY_FUSER_GATE = 1.0


def build_tiny_unet(seed: int = 0) -> UNet3DConditionModel:
    return build_seeded(seed + _SEED_OFFSETS["unet"],
                         lambda: UNet3DConditionModel.from_config(dict(TINY_UNET_CONFIG)))


def build_tiny_grounded_unet(seed: int = 0, fuser_gate: float = TINY_FUSER_GATE) -> UNet3DConditionModel:
    """The tiny UNet (same weights as `build_tiny_unet(seed)`) plus GLIGEN fusers and a position net
    (positive_len = the tiny text width), seeded; every fuser gate set to ``fuser_gate``."""
    unet = build_tiny_unet(seed)
    build_seeded(seed + _SEED_OFFSETS["gligen"], lambda: attach_gligen_modules(unet))
    with torch.no_grad():
        for fuser in fuser_modules(unet).values():
            fuser.alpha_attn.fill_(fuser_gate)
            fuser.alpha_dense.fill_(fuser_gate)
    return unet


def build_tiny_vae(seed: int = 0) -> AutoencoderKL:
    return build_seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKL.from_config(dict(TINY_VAE_CONFIG)))


def build_tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    return build_seeded(seed + _SEED_OFFSETS["text_encoder"],
                         lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG)))


def build_tiny_components(seed: int = 0, *, grounded: bool = False) -> dict[str, Any]:
    """Tiny fp32 CPU components (unet, vae, text_encoder, tokenizer, scheduler); same seed, same weights.

    ``grounded``: the UNet has GLIGEN fusers and a position net (LVD-GLIGEN / LVD-plus).
    """
    return {
        "unet": build_tiny_grounded_unet(seed) if grounded else build_tiny_unet(seed),
        "vae": build_tiny_vae(seed),
        "text_encoder": build_tiny_text_encoder(seed),
        "tokenizer": build_clip_tokenizer(),
        "scheduler": build_dpm_scheduler(),
    }


def save_tiny_model(folder: str | os.PathLike, seed: int = 0, *, overwrite: bool = False,
                    grounded: bool = False) -> Path:
    """Write a tiny model as a hub-like folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) that `load_video_model(spec, model_path=folder)` loads.

    The folder is written next to its destination and renamed into place, so it is never half-written.
    The scheduler folder holds ModelScope's DDIM config, as the real repos do. ``grounded`` saves the
    grounded UNet (its config with ``attention_type: "gated"``), as a lvd-gligen / lvd-plus spec loads it.
    """
    components = build_tiny_components(seed, grounded=grounded)
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            components[name].save_pretrained(str(staging / name))
        atomic_write_json(staging / "scheduler" / "scheduler_config.json", dict(MODELSCOPE_DDIM_SCHEDULER_CONFIG))
        atomic_write_json(staging / "model_index.json", dict(TINY_MODEL_INDEX))
    return Path(folder)


def build_random_model_from_configs(config_dir: str | os.PathLike, dtype: str | torch.dtype | None = None,
                                    device: str | torch.device | None = None, seed: int = 0,
                                    spec: RunModelSpec | None = None, grounded: bool | None = None) -> VideoModel:
    """A full-size random-weight `VideoModel` from a config folder laid out like a hub repo
    (shared/model-configs/<name>/: unet/, vae/, text_encoder/ configs, optional tokenizer/, scheduler/).

    For benchmarks without weights. Modules are built directly on ``device`` (the 1.4B UNet takes
    minutes on CPU); ``device="meta"`` builds the architecture without memory or initialisation.
    ``grounded`` builds the GLIGEN UNet of LVD-GLIGEN / LVD-plus on the base model's config (the
    adapters keep the base architecture); None: when ``spec`` is grounded or the UNet config says
    ``attention_type: "gated"``. Its fuser gates keep diffusers' initialisation (0); set them to
    benchmark with active fusers (the cost is the same either way).
    """
    config_dir = Path(config_dir)
    device = torch.device(device) if str(device) == "meta" else resolve_device(device)
    dtype = resolve_dtype(dtype, device if device.type != "meta" else "cpu")
    for sub in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
        if not (config_dir / sub).is_file():
            raise FileNotFoundError(f"{config_dir / sub} not found: expected a folder laid out like "
                                    "shared/model-configs/<model>/ (unet/, vae/, text_encoder/ configs)")

    def build_on_device(component_seed: int, build):
        def build_here():
            with torch.device(device):
                return build()
        return build_seeded(component_seed, build_here, device)

    unet_config = UNet3DConditionModel.load_config(str(config_dir / "unet"))
    if grounded is None:
        grounded = (spec is not None and spec.grounded) or unet_config.get("attention_type") == "gated"
    if grounded:
        build_unet = lambda: build_grounded_unet(unet_config)  # noqa: E731
    else:
        build_unet = lambda: UNet3DConditionModel.from_config(unet_config)  # noqa: E731
    vae_config = AutoencoderKL.load_config(str(config_dir / "vae"))
    text_config = CLIPTextConfig.from_json_file(str(config_dir / "text_encoder" / "config.json"))
    # Cast each component right after building it to bound peak memory.
    unet = cast_module(build_on_device(seed + _SEED_OFFSETS["unet"], build_unet), dtype)
    vae = cast_module(build_on_device(seed + _SEED_OFFSETS["vae"],
                                      lambda: AutoencoderKL.from_config(vae_config)), dtype)
    text_encoder = cast_module(build_on_device(seed + _SEED_OFFSETS["text_encoder"],
                                               lambda: CLIPTextModel(text_config)), dtype)
    tokenizer_dir = config_dir / "tokenizer"
    has_vocab = (tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "vocab.json").is_file()
    tokenizer = load_tokenizer(tokenizer_dir) if has_vocab else build_clip_tokenizer()
    scheduler_file = config_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                  "scheduler": build_dpm_scheduler(scheduler_config)}
    return assemble_video_model(components, device, dtype, spec,
                                f"random weights (seed {seed}) from configs in {config_dir}")
