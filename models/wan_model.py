"""`WanVideoModel`: the components of a Wan 2.1 T2V model (a DiT trained with flow matching) as one frozen
object, assembled from built or loaded components; loading from a hub-like folder; decoding latents.

Components (diffusers' `WanPipeline` layout, ``Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers``):
- ``transformer``: `WanTransformer3DModel` (1.3B: 30 blocks, 12 heads x 128; 14B: 40 blocks, 40 heads x 128);
- ``vae``: `AutoencoderKLWan` (8x space; time: frame 0 alone, then groups of 4 frames per latent frame), fp32
  by default as diffusers recommends; latents are normalised by its ``latents_mean`` / ``latents_std``;
- ``text_encoder``: `UMT5EncoderModel` (umT5-XXL, 5.7B parameters) with its `T5TokenizerFast`, 512 tokens;
- ``scheduler``: `UniPCMultistepScheduler` (flow prediction, flow shift 3.0), optionally with its corrector
  switched off on the first steps (`models.schedulers.build_wan_scheduler`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.video_processor import VideoProcessor
from transformers import T5TokenizerFast, UMT5EncoderModel

from models.hub import MissingWeightsError
from models.weights import WAN_MODEL_CONFIG_FILES, WAN_MODEL_WEIGHT_FOLDERS, find_model_folder  # noqa: F401
from models.registry import RunModelSpec
from models.schedulers import build_wan_scheduler, corrector_off_steps_of
from models.wan_text import encode_wan_prompts, load_wan_tokenizer


@dataclasses.dataclass(frozen=True)
class WanVideoModel:
    """The components of a Wan 2.1 T2V model, frozen, in eval mode.

    ``dtype`` is the transformer's (and text encoder's) compute dtype; ``vae_dtype`` the VAE's (fp32 by default:
    diffusers recommends it for Wan). Latents stay float32 between steps, as in `WanPipeline`. With
    ``offload_text_encoder`` the text encoder lives on the CPU and visits ``device`` only to encode.
    ``text_encoder`` may be None (random-weight benchmarks pass text embeddings themselves).
    """

    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: T5TokenizerFast
    scheduler: UniPCMultistepScheduler
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    spec: RunModelSpec | None
    source: str
    offload_text_encoder: bool = False

    def make_scheduler(self) -> UniPCMultistepScheduler:
        """A fresh scheduler with this model's config (UniPC keeps solver state between steps)."""
        return UniPCMultistepScheduler.from_config(self.scheduler.config)

    @property
    def corrector_off_steps(self) -> int:
        return corrector_off_steps_of(self.scheduler)

    def with_corrector_off_steps(self, steps: int) -> "WanVideoModel":
        """The same model sampling with UniPC's corrector off on the first ``steps`` steps (see
        `build_wan_scheduler`; 0: the stock sampler)."""
        return dataclasses.replace(self, scheduler=build_wan_scheduler(self.scheduler.config, steps))

    def with_text_encoder_offload(self, offload: bool = True) -> "WanVideoModel":
        """The same model with the text encoder kept on the CPU between encodings (or back on ``device``)."""
        if self.text_encoder is not None:
            self.text_encoder.to("cpu" if offload else self.device)
        return dataclasses.replace(self, offload_text_encoder=offload)

    @contextlib.contextmanager
    def text_encoder_on_device(self) -> Iterator[UMT5EncoderModel]:
        """The text encoder on ``device`` for the duration (moved back to the CPU afterwards when offloaded; a
        nested use inside another leaves the move to the outer one)."""
        if self.text_encoder is None:
            raise ValueError(f"{self.source}: this Wan model was built without a text encoder; pass text "
                             "embeddings instead of prompts")
        if not self.offload_text_encoder or next(self.text_encoder.parameters()).device == self.device:
            yield self.text_encoder
            return
        self.text_encoder.to(self.device)
        try:
            yield self.text_encoder
        finally:
            self.text_encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, 512, D) text embeddings of ``prompts`` in the transformer's dtype (see `encode_wan_prompts`)."""
        with self.text_encoder_on_device() as text_encoder:
            states = encode_wan_prompts(self.tokenizer, text_encoder, prompts, self.device, text_encoder.dtype)
        return states.to(self.dtype)


def cast_wan_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` except the modules diffusers keeps in float32 when loading Wan in half precision
    (``_keep_in_fp32_modules``: rope, time embedder, modulation tables, norms), as `from_pretrained` does."""
    keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return transformer


def assemble_wan_model(components: dict[str, Any], device: torch.device, dtype: torch.dtype,
                       vae_dtype: torch.dtype, spec: RunModelSpec | None, source: str, *,
                       offload_text_encoder: bool = False, corrector_off_steps: int = 0) -> WanVideoModel:
    """A `WanVideoModel` from built or loaded components: moved, frozen, in eval mode (dtypes as loaded)."""
    for name in ("transformer", "vae", "text_encoder"):
        module = components.get(name)
        if module is None:
            continue
        module.eval()
        module.requires_grad_(False)
        module.to("cpu" if name == "text_encoder" and offload_text_encoder else device)
    scheduler = build_wan_scheduler(components["scheduler"].config, corrector_off_steps)
    return WanVideoModel(transformer=components["transformer"], vae=components.get("vae"),
                         text_encoder=components.get("text_encoder"), tokenizer=components["tokenizer"],
                         scheduler=scheduler, device=device, dtype=dtype, vae_dtype=vae_dtype, spec=spec,
                         source=source, offload_text_encoder=offload_text_encoder)


def resolve_wan_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                             local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``spec``'s Wan weights (`models.hub.resolve_model_folder`: a clear, fast error)."""
    return find_model_folder(spec, model_path, local_files_only=local_files_only, cache_dir=cache_dir)


def load_wan_components_from_folder(folder: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """Load the five components from a hub-like folder (no network), dtypes as `WanPipeline.from_pretrained`
    gives them (the transformer keeps its float32 modules)."""
    try:
        transformer = WanTransformer3DModel.from_pretrained(str(folder), subfolder="transformer", dtype=dtype,
                                                            local_files_only=True)
        vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", dtype=vae_dtype, local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                        local_files_only=True)
    except OSError as exc:  # diffusers / transformers raise OSError (EnvironmentError) for missing files
        raise MissingWeightsError(f"could not load Wan weights from {folder}: {exc}") from exc
    scheduler = UniPCMultistepScheduler.from_pretrained(str(folder), subfolder="scheduler")
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_wan_tokenizer(folder / "tokenizer"), "scheduler": scheduler}



def wan_latent_num_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames of a ``num_frames`` video: frame 0 alone, then one per group of ``temporal_factor``."""
    return (num_frames - 1) // temporal_factor + 1


def decode_wan_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    """(1, 16, latent frames, h, w) latents -> (F, H, W, 3) float32 frames in [0, 1], as `WanPipeline` decodes
    (``latents / (1 / std) + mean``, one VAE call, then its video processor)."""
    latents = latents.to(next(vae.parameters()).device, dtype=vae.dtype)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device,
                                                                                         latents.dtype)
    with torch.no_grad():
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    return processor.postprocess_video(video, output_type="np")[0]
