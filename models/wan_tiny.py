"""Tiny and full-size random-weight Wan models: the real classes and module paths (``blocks.<i>.attn2``) with
shrunken widths (tests, demos), and full-size architectures for benchmarks and FLOP counts on the meta device."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from models.devices import build_seeded, resolve_device, resolve_dtype
from models.registry import RunModelSpec, get_run_model
from models.schedulers import build_wan_scheduler
from models.wan_configs import (_SEED_OFFSETS, TINY_UMT5_OVERRIDES, TINY_WAN_MODEL_INDEX, TINY_WAN_TRANSFORMER_CONFIG,
                                TINY_WAN_VAE_CONFIG, WAN_UMT5_CONFIG, WAN_VAE_CONFIG, _config_dict,
                                wan_transformer_config)
from models.wan_model import WanVideoModel, assemble_wan_model, cast_wan_transformer
from models.wan_text import build_tiny_umt5_tokenizer
from utils.io import atomic_folder, atomic_write_json


def build_tiny_wan_components(seed: int = 0) -> dict[str, Any]:
    """Tiny fp32 CPU components (transformer, vae, text_encoder, tokenizer, scheduler); same seed, same weights."""
    tokenizer = build_tiny_umt5_tokenizer()
    umt5_config = UMT5Config(**{**WAN_UMT5_CONFIG, **TINY_UMT5_OVERRIDES, "vocab_size": len(tokenizer)})
    return {
        "transformer": build_seeded(seed + _SEED_OFFSETS["transformer"],
                                    lambda: WanTransformer3DModel.from_config(_config_dict(TINY_WAN_TRANSFORMER_CONFIG))),
        "vae": build_seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKLWan.from_config(_config_dict(TINY_WAN_VAE_CONFIG))),
        "text_encoder": build_seeded(seed + _SEED_OFFSETS["text_encoder"], lambda: UMT5EncoderModel(umt5_config)),
        "tokenizer": tokenizer,
        "scheduler": build_wan_scheduler(),
    }


def build_tiny_wan_model(seed: int = 0, device: str | torch.device | None = "cpu",
                         dtype: str | torch.dtype | None = None, spec: RunModelSpec | None = None, *,
                         corrector_off_steps: int = 0) -> WanVideoModel:
    """A tiny random-weight `WanVideoModel` (default: CPU, fp32; ``spec`` defaults to `lvd_wan_tiny`)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    components = build_tiny_wan_components(seed)
    cast_wan_transformer(components["transformer"], dtype)
    if dtype != torch.float32:
        components["text_encoder"].to(dtype)
    return assemble_wan_model(components, device, dtype, torch.float32,
                              spec if spec is not None else get_run_model("lvd_wan_tiny"),
                              f"tiny random Wan weights (seed {seed})", corrector_off_steps=corrector_off_steps)


def save_tiny_wan_model(folder: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write the tiny Wan model as a hub-like folder (transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json) that `load_video_model(spec, model_path=folder)` loads (written aside, then
    renamed into place)."""
    components = build_tiny_wan_components(seed)
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            components[name].save_pretrained(str(staging / name))
        atomic_write_json(staging / "model_index.json", dict(TINY_WAN_MODEL_INDEX))
    return Path(folder)


def build_random_wan_model(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                           size: str = "1.3b", seed: int = 0, with_vae: bool = True, spec: RunModelSpec | None = None,
                           tokenizer=None, transformer_overrides: Mapping[str, Any] | None = None) -> WanVideoModel:
    """A full-size random-weight Wan model (transformer and, with ``with_vae``, the VAE) for benchmarks: no text
    encoder (5.7B parameters; benchmarks pass text embeddings). Built directly on ``device``; ``"meta"`` builds the
    architecture without memory (FLOP and activation counts). The transformer keeps diffusers' float32 modules.
    ``transformer_overrides`` change its config (e.g. fewer blocks for a quick count)."""
    device = torch.device(device) if str(device) == "meta" else resolve_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else ("bf16" if device.type == "cuda" else None),
                          device if device.type != "meta" else "cpu")
    config = {**wan_transformer_config(size), **(transformer_overrides or {})}

    def build_here(build):
        def build_on_device():
            with torch.device(device):
                return build()
        return build_on_device

    transformer = build_seeded(seed + _SEED_OFFSETS["transformer"],
                               build_here(lambda: WanTransformer3DModel.from_config(config)),
                               device if device.type == "cuda" else None)
    cast_wan_transformer(transformer, dtype)
    vae = None
    if with_vae:
        vae = build_seeded(seed + _SEED_OFFSETS["vae"], build_here(lambda: AutoencoderKLWan.from_config(
            _config_dict(WAN_VAE_CONFIG))), device if device.type == "cuda" else None)
    components = {"transformer": transformer, "vae": vae, "text_encoder": None,
                  "tokenizer": tokenizer if tokenizer is not None else build_tiny_umt5_tokenizer(),
                  "scheduler": build_wan_scheduler()}
    return assemble_wan_model(components, device, dtype, torch.float32, spec,
                              f"random Wan 2.1 {size} weights (seed {seed}), no text encoder")
