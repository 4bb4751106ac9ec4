"""`load_video_model`: the video model of a run-model, built in memory (tiny specs) or loaded from a
local folder (``model_path``) or the Hugging Face cache / hub (see `models.hub`).
"""
from __future__ import annotations

import logging
import os

import torch

from models.devices import resolve_device, resolve_dtype
from models.registry import GLIGEN_CROSS_ATTENTION_DIM, RunModelSpec
from models.tiny import build_tiny_components
from models.video_model import VideoModel, assemble_video_model, load_components_from_folder, resolve_video_model_folder

logger = logging.getLogger(__name__)


def load_video_model(spec: RunModelSpec, model_path: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                     local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                     seed: int = 0) -> VideoModel:
    """Load the video model of ``spec`` on ``device`` (default: CUDA if available) in ``dtype``
    (default: fp16 on CUDA, fp32 on CPU).

    Tiny specs are built in memory from ``seed`` unless ``model_path`` is given. Others are loaded
    from ``model_path`` or the HF cache / hub; `MissingWeightsError` says what was tried and how to fix it.
    """
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


def find_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                      local_files_only: bool = False, cache_dir: str | os.PathLike | None = None):
    """The local folder with ``spec``'s weights, without loading them (`MissingWeightsError` otherwise);
    with ``local_files_only`` nothing is downloaded (e.g. to list the run-models usable on this machine)."""
    return resolve_video_model_folder(spec, model_path, local_files_only=local_files_only, cache_dir=cache_dir)
