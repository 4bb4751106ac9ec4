"""Where a run-model's weights are, without importing torch, diffusers or transformers.

The files each model family needs in a hub-like folder, and `find_model_folder`: generate.py calls it before
its heavy imports, so missing weights are reported in about a second (`models.hub.MissingWeightsError`).
"""
from __future__ import annotations

import os
from pathlib import Path

from models.hub import MissingWeightsError, find_missing_files, resolve_model_folder
from models.registry import WAN_FAMILY, RunModelSpec

# A hub-like UNet3D folder (ModelScope, Zeroscope, the GLIGEN adapters, Zeroscope XL).
VIDEO_MODEL_CONFIG_FILES = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
VIDEO_MODEL_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")

# A hub-like Wan folder (the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
WAN_MODEL_CONFIG_FILES = (
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
WAN_MODEL_WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")


def find_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                      local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder with ``spec``'s weights, without loading them (`MissingWeightsError` otherwise);
    with ``local_files_only`` nothing is downloaded (e.g. to list the run-models usable on this machine).
    A bundled run-model's folder is the one shipped with the repository, unless ``model_path`` is given."""
    wan = spec.family == WAN_FAMILY
    if model_path is None and spec.bundled_folder is not None:
        folder = spec.bundled_folder
        missing = find_missing_files(folder, WAN_MODEL_CONFIG_FILES if wan else VIDEO_MODEL_CONFIG_FILES,
                                     WAN_MODEL_WEIGHT_FOLDERS if wan else VIDEO_MODEL_WEIGHT_FOLDERS)
        train = f"`python scripts/train_shapes.py --family {'wan' if wan else 'unet3d'}`"
        if not folder.is_dir():
            raise MissingWeightsError(
                f"{spec.name!r} has no weights in this checkout ({folder} does not exist); train them with "
                f"{train}, which writes that folder, or pass --model-path DIR")
        if missing:
            raise MissingWeightsError(
                f"the shipped weights of {spec.name!r} are incomplete in {folder} (missing {', '.join(missing)}); "
                f"restore them with `git checkout -- shapes/weights`, or train them with {train} "
                "(or pass --model-path DIR)")
        return folder
    return resolve_model_folder(spec.model_id, model_path, spec.revision,
                                required_files=WAN_MODEL_CONFIG_FILES if wan else VIDEO_MODEL_CONFIG_FILES,
                                weight_folders=WAN_MODEL_WEIGHT_FOLDERS if wan else VIDEO_MODEL_WEIGHT_FOLDERS,
                                local_files_only=local_files_only, cache_dir=cache_dir)
