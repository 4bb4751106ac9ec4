"""`load_video_model`: the video model of a run-model, built in memory (tiny specs) or loaded from a
local folder (``model_path``) or the Hugging Face cache / hub (see `models.hub`).
"""
from __future__ import annotations

import logging
import os

import torch

from models.devices import resolve_device, resolve_dtype
from models.registry import GLIGEN_CROSS_ATTENTION_DIM, WAN_FAMILY, WAN_LVD_CORRECTOR_OFF_STEPS, RunModelSpec
from models.tiny import build_tiny_components
from models.video_model import VideoModel, assemble_video_model, load_components_from_folder, resolve_video_model_folder
from models.wan import (WanVideoModel, assemble_wan_model, build_tiny_wan_components, cast_wan_transformer,
                        load_wan_components_from_folder, resolve_wan_model_folder)
from models.weights import find_model_folder  # noqa: F401  (the folder check, re-exported for callers here)

logger = logging.getLogger(__name__)


def load_video_model(spec: RunModelSpec, model_path: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                     local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                     seed: int = 0) -> VideoModel | WanVideoModel:
    """Load the video model of ``spec`` on ``device`` (default: CUDA if available) in ``dtype``
    (default: fp16 on CUDA, fp32 on CPU; bf16 on CUDA for Wan, see `load_wan_model`).

    Tiny specs are built in memory from ``seed`` unless ``model_path`` is given. Others are loaded
    from ``model_path`` or the HF cache / hub; `MissingWeightsError` says what was tried and how to fix it.
    """
    if spec.family == WAN_FAMILY:
        return load_wan_model(spec, model_path, device, dtype, local_files_only=local_files_only,
                              cache_dir=cache_dir, seed=seed)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if spec.tiny and model_path is None:
        components = build_tiny_components(seed, grounded=spec.grounded)
        source = f"tiny random weights (seed {seed})"
    else:
        folder = resolve_video_model_folder(spec, model_path, local_files_only=local_files_only,
                                            cache_dir=cache_dir)
        logger.info("loading %s from %s (%s, %s)", spec.model_id or spec.name, folder, device, dtype)
        components = load_components_from_folder(
            folder, dtype, grounded=spec.grounded,
            cross_attention_dim=None if spec.tiny else GLIGEN_CROSS_ATTENTION_DIM)  # published adapters: 1024
        source = str(folder)
    return assemble_video_model(components, device, dtype, spec, source)


def load_wan_model(spec: RunModelSpec, model_path: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                   local_files_only: bool = False, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                   vae_dtype: str | torch.dtype | None = "fp32", offload_text_encoder: bool = False,
                   corrector_off_steps: int | None = None) -> WanVideoModel:
    """A Wan 2.1 model: tiny random weights (tiny specs without ``model_path``) or the weights of a folder / the
    HF cache / the hub (`MissingWeightsError` within seconds, naming the model id, otherwise).

    ``dtype`` (transformer and text encoder) defaults to bf16 on CUDA (Wan's training dtype; fp16 risks
    overflow) and fp32 on CPU; the VAE runs in fp32 unless ``vae_dtype`` says otherwise. The scheduler is the
    model's UniPC, with its corrector off on the first ``corrector_off_steps`` steps (0: stock; None: the guided
    steps of the default schedule for LVD run-models, 0 for baselines).
    """
    if corrector_off_steps is None:
        corrector_off_steps = WAN_LVD_CORRECTOR_OFF_STEPS if spec.method == "lvd" else 0
    device = resolve_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else ("bf16" if device.type == "cuda" else None), device)
    vae_dtype = resolve_dtype(vae_dtype, device) if vae_dtype is not None else dtype
    if spec.tiny and model_path is None:
        components = build_tiny_wan_components(seed)
        cast_wan_transformer(components["transformer"], dtype)
        for name, target in (("text_encoder", dtype), ("vae", vae_dtype)):
            if next(components[name].parameters()).dtype != target:  # built in fp32
                components[name].to(target)
        source = f"tiny random Wan weights (seed {seed})"
    else:
        folder = resolve_wan_model_folder(spec, model_path, local_files_only=local_files_only, cache_dir=cache_dir)
        logger.info("loading %s from %s (%s, %s, VAE %s)", spec.model_id or spec.name, folder, device, dtype,
                    vae_dtype)
        components = load_wan_components_from_folder(folder, dtype, vae_dtype)
        source = str(folder)
    return assemble_wan_model(components, device, dtype, vae_dtype, spec, source,
                              offload_text_encoder=offload_text_encoder, corrector_off_steps=corrector_off_steps)
