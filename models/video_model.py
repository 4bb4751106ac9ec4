"""The components of a UNet3D text-to-video model (ModelScope, Zeroscope, their GLIGEN adapters, the tiny
models) as one frozen `VideoModel`, and loading them from a hub-like folder (no network).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet3DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from models.devices import prepare_modules
from models.gligen import load_grounded_unet
from models.hub import MissingWeightsError
from models.registry import RunModelSpec
from models.schedulers import load_dpm_scheduler
from models.tokenizer import load_tokenizer
from models.weights import VIDEO_MODEL_CONFIG_FILES, VIDEO_MODEL_WEIGHT_FOLDERS, find_model_folder  # noqa: F401

# A hub-like video model folder (the layout of damo-vilab/text-to-video-ms-1.7b).


@dataclasses.dataclass(frozen=True)
class VideoModel:
    """The components of a text-to-video diffusion model, on one device and dtype, frozen, in eval mode.

    `scheduler` is stateful (`set_timesteps`); a sampling run should use `make_scheduler()`.
    `source` says where the weights came from (for the run's config JSON).
    """

    unet: UNet3DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DPMSolverMultistepScheduler
    device: torch.device
    dtype: torch.dtype
    spec: RunModelSpec | None
    source: str

    def make_scheduler(self) -> DPMSolverMultistepScheduler:
        """A fresh scheduler with this model's config (no timesteps or solver state carried over)."""
        return DPMSolverMultistepScheduler.from_config(self.scheduler.config)


def assemble_video_model(components: dict[str, Any], device: torch.device, dtype: torch.dtype,
                         spec: RunModelSpec | None, source: str) -> VideoModel:
    """A `VideoModel` from freshly built or loaded components (moved, frozen, VAE slicing on)."""
    prepare_modules([components["unet"], components["vae"], components["text_encoder"]], device, dtype)
    # Decode one frame per VAE call to bound memory (spec 1.5: every LVD-family model has slicing on).
    components["vae"].enable_slicing()
    return VideoModel(unet=components["unet"], vae=components["vae"], text_encoder=components["text_encoder"],
                      tokenizer=components["tokenizer"], scheduler=components["scheduler"],
                      device=device, dtype=dtype, spec=spec, source=source)


def load_components_from_folder(folder: Path, dtype: torch.dtype, *, grounded: bool = False,
                                cross_attention_dim: int | None = None) -> dict[str, Any]:
    """Load unet / vae / text_encoder / tokenizer / scheduler from a hub-like folder (no network).

    ``grounded``: the UNet is the GLIGEN one of LVD-GLIGEN / LVD-plus (models/gligen.py, loaded
    strictly; its config must say ``attention_type: "gated"`` and, unless None, ``cross_attention_dim``).
    """
    try:
        if grounded:
            unet = load_grounded_unet(folder, dtype, cross_attention_dim=cross_attention_dim)
        else:
            unet = UNet3DConditionModel.from_pretrained(str(folder), subfolder="unet", dtype=dtype,
                                                        local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                     local_files_only=True)
    except OSError as exc:  # diffusers / transformers raise OSError (EnvironmentError) for missing files
        raise MissingWeightsError(f"could not load model weights from {folder}: {exc}") from exc
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_tokenizer(folder / "tokenizer"), "scheduler": load_dpm_scheduler(folder)}


def resolve_video_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                               local_files_only: bool = False,
                               cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``spec``'s video model (see `resolve_model_folder`)."""
    return find_model_folder(spec, model_path, local_files_only=local_files_only, cache_dir=cache_dir)
