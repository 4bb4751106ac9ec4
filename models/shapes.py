"""LVD-Shapes: the architecture of the small text-to-video models trained on the shapes world
(`shapes/world.py`, `scripts/train_shapes.py`), and where their shipped weights live.

The UNet model is the ModelScope family at a CPU size: `UNet3DConditionModel` with ModelScope's block types
and layers per block (so LVD's six guided `...attn2` layers exist at the same module paths), a 3-level
`AutoencoderKL` (4x spatial: 64x64 frames -> 16x16 latents -> guided maps 8x8 and 4x4), a `CLIPTextModel`
over the real CLIP tokenizer, ModelScope's DDIM scheduler config (sampled with DPM-Solver++ like every
UNet3D run-model). Saved as a diffusers pipeline folder, so `TextToVideoSDPipeline.from_pretrained(folder)`
loads it as well as `load_video_model`.

The Wan model is Wan 2.1 T2V at a CPU size: `WanTransformer3DModel` (8 blocks of width 128, patch 1x2x2), a
3-level `AutoencoderKLWan` (4x in space like the UNet's VAE, Wan's 4x in time: 64x64 frames -> 16x16 latents ->
guided maps 8x8; 17 frames -> 5 latent frames), a small `UMT5EncoderModel` over a unigram tokenizer of the shapes
world's words (umT5's structure, built offline), Wan's UniPC flow-matching scheduler; a `WanPipeline` folder.
"""
from __future__ import annotations

import copy
import os
import types
from pathlib import Path

from diffusers import AutoencoderKL, AutoencoderKLWan, UNet3DConditionModel, WanTransformer3DModel
from transformers import CLIPTextConfig, CLIPTextModel, UMT5Config, UMT5EncoderModel

from models.devices import build_seeded
from models.schedulers import MODELSCOPE_DDIM_SCHEDULER_CONFIG
from models.tiny import TINY_MODEL_INDEX
from models.registry import SHAPES_WAN_NUM_LAYERS
from models.schedulers import build_wan_scheduler
from models.tokenizer import VOCAB_SIZE, build_clip_tokenizer
from models.wan_configs import (TINY_WAN_MODEL_INDEX, WAN_1_3B_TRANSFORMER_CONFIG, WAN_UMT5_CONFIG, WAN_VAE_CONFIG,
                                _config_dict)
from models.wan_model import cast_wan_transformer
from models.wan_text import build_tiny_umt5_tokenizer
from utils.io import atomic_folder, atomic_write_json


SHAPES_TEXT_HIDDEN_SIZE = 64
SHAPES_UNET_CONFIG = types.MappingProxyType({
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "cross_attention_dim": SHAPES_TEXT_HIDDEN_SIZE,
    "attention_head_dim": 8,
})
# 3 levels: a 4x spatial factor. scaling_factor is set from the trained encoder's latent std.
SHAPES_VAE_CONFIG = types.MappingProxyType({
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 1.0,
})
# The real vocabulary and 77 positions, so the real tokenizer's ids and LVD's token positions apply.
SHAPES_TEXT_ENCODER_CONFIG = types.MappingProxyType({
    "vocab_size": VOCAB_SIZE,
    "hidden_size": SHAPES_TEXT_HIDDEN_SIZE,
    "intermediate_size": 2 * SHAPES_TEXT_HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": SHAPES_TEXT_HIDDEN_SIZE,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
})


def build_shapes_unet3d_components(seed: int = 0) -> dict:
    """Untrained components of the UNet shapes model (fp32, CPU), seeded: unet, vae, text_encoder, tokenizer."""
    return {
        "unet": build_seeded(seed, lambda: UNet3DConditionModel.from_config(dict(SHAPES_UNET_CONFIG))),
        "vae": build_seeded(seed + 1, lambda: AutoencoderKL.from_config(dict(SHAPES_VAE_CONFIG))),
        "text_encoder": build_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER_CONFIG))),
        "tokenizer": build_clip_tokenizer(),
    }


def save_unet3d_pipeline_folder(folder: str | os.PathLike, components: dict, *, dtype=None,
                                overwrite: bool = True) -> Path:
    """Write unet / vae / text_encoder / tokenizer / scheduler / model_index.json as a diffusers pipeline
    folder (the layout of damo-vilab/text-to-video-ms-1.7b), atomically; ``dtype`` casts copies on save."""
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name in ("unet", "vae", "text_encoder"):
            module = components[name]
            if dtype is not None:
                module = copy.deepcopy(module).to(dtype)
            module.save_pretrained(str(staging / name), safe_serialization=True)
        components["tokenizer"].save_pretrained(str(staging / "tokenizer"))
        atomic_write_json(staging / "scheduler" / "scheduler_config.json", dict(MODELSCOPE_DDIM_SCHEDULER_CONFIG))
        atomic_write_json(staging / "model_index.json", dict(TINY_MODEL_INDEX))
    return Path(folder)


# --------------------------------------------------------------------------------------------
# The Wan sibling

SHAPES_WAN_TEXT_DIM = 64
SHAPES_WAN_TRANSFORMER_CONFIG = types.MappingProxyType({
    **WAN_1_3B_TRANSFORMER_CONFIG,
    "attention_head_dim": 32,          # rotary split: 12 time + 10 + 10 space
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "freq_dim": 64,
    "num_layers": SHAPES_WAN_NUM_LAYERS,
    "text_dim": SHAPES_WAN_TEXT_DIM,
})
# Wan's z_dim and 4x in time; 3 levels, so 4x in space (8x made 64x64 frames 8x8 latents: maps of 4x4); small
# widths. latents_mean / latents_std are set from the trained encoder.
SHAPES_WAN_VAE_CONFIG = types.MappingProxyType({
    **WAN_VAE_CONFIG,
    "base_dim": 16,
    "dim_mult": (1, 2, 4),
    "temperal_downsample": (True, True),
    "scale_factor_spatial": 4,
    "scale_factor_temporal": 4,
    "num_res_blocks": 1,
    "latents_mean": (0.0,) * WAN_VAE_CONFIG["z_dim"],
    "latents_std": (1.0,) * WAN_VAE_CONFIG["z_dim"],
})
SHAPES_UMT5_OVERRIDES = types.MappingProxyType({
    "d_ff": 2 * SHAPES_WAN_TEXT_DIM, "d_kv": 16, "d_model": SHAPES_WAN_TEXT_DIM, "num_decoder_layers": 2,
    "num_heads": 4, "num_layers": 2,
})
# Every word of the shapes world's captions (tests/test_shapes.py checks each is one piece), plus "background"'s
# comma form; other text falls back to characters.
SHAPES_WORDS = (
    "a", "and", "appears", "background", "beige", "black", "blue", "bottom", "circle", "circles", "disappears",
    "four", "from", "gray", "green", "halfway", "its", "left", "lower", "moving", "of", "on", "one", "red", "right",
    "square", "squares", "that", "the", "then", "three", "through", "to", "top", "triangle", "triangles", "two",
    "upper", "white", "yellow",
)


def build_shapes_wan_components(seed: int = 0) -> dict:
    """Untrained components of the Wan shapes model (fp32, CPU), seeded: transformer, vae, text_encoder,
    tokenizer, scheduler."""
    tokenizer = build_tiny_umt5_tokenizer(SHAPES_WORDS, ())
    umt5_config = UMT5Config(**{**WAN_UMT5_CONFIG, **SHAPES_UMT5_OVERRIDES, "vocab_size": len(tokenizer)})
    return {
        "transformer": build_seeded(
            seed, lambda: WanTransformer3DModel.from_config(_config_dict(SHAPES_WAN_TRANSFORMER_CONFIG))),
        "vae": build_seeded(seed + 1, lambda: AutoencoderKLWan.from_config(_config_dict(SHAPES_WAN_VAE_CONFIG))),
        "text_encoder": build_seeded(seed + 2, lambda: UMT5EncoderModel(umt5_config)),
        "tokenizer": tokenizer,
        "scheduler": build_wan_scheduler(),
    }


def save_wan_pipeline_folder(folder: str | os.PathLike, components: dict, *, dtype=None,
                             overwrite: bool = True) -> Path:
    """Write transformer / vae / text_encoder / tokenizer / scheduler / model_index.json as a `WanPipeline`
    folder, atomically; ``dtype`` casts copies on save (loading upcasts: the VAE and CPU runs compute in fp32)."""
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            module = components[name]
            if dtype is not None and name == "transformer":  # its float32 modules stay float32, as diffusers loads them
                module = cast_wan_transformer(copy.deepcopy(module), dtype)
            elif dtype is not None and name in ("vae", "text_encoder"):
                module = copy.deepcopy(module).to(dtype)
            module.save_pretrained(str(staging / name))
        atomic_write_json(staging / "model_index.json", dict(TINY_WAN_MODEL_INDEX))
    return Path(folder)
