"""The Wan 2.1 T2V backbone (a DiT trained with flow matching), sampled as diffusers' `WanPipeline` samples it.

- Prompts are cleaned (``prompt_clean``) and encoded by umT5 to 512 tokens, zero-padded after the prompt's own
  tokens; the negative prompt (Wan's own by default) is encoded in its own call, as the pipeline does.
- Initial noise ``(1, 16, (F - 1) / 4 + 1, H / 8, W / 8)`` in float32 from ``torch.Generator("cpu")``; latents
  stay float32 between steps and are cast to the transformer's dtype for each call.
- Classifier-free guidance: two batch-B transformer calls (prompt, then negative prompt), combined as
  ``uncond + scale * (cond - uncond)``; no negative pass when the scale is <= 1 (as the pipeline).
- UniPC steps on the 5-D latents; decoding un-normalises by the VAE's latents mean / std in one VAE call.

Guidance (generation/lvd.py) on this backbone:
- maps of ``blocks.<i>.attn2`` (models/wan_attention.py), ``(B * latent frames, heads, h * w, tokens)`` with
  ``h, w = H / 16, W / 16``; boxes are given for the latent frames (`guided_num_frames`: 81 -> 21, the six
  keyframes resampled to them by the layout's rule);
- step size ``sigma * sqrt((1 - sigma)^2 + sigma^2)`` (README, "Wan 2.1": LVD's ``sqrt(1 - alpha_bar)`` update
  carried into the flow-matching coordinates).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from generation.backbones.base import CROSS, VIDEO, Backbone, TextConditioning
from generation.config import NOISE_CPU, NOISE_REFERENCE
from models.attention import AttentionRecorder, run_recorded_forward
from models.wan import (WAN_TEXT_TOKENS, WanVideoModel, clean_prompt, compute_wan_token_positions,
                        decode_wan_latents, wan_latent_num_frames)
from models.wan_attention import check_wan_guided_layers, checkpointed_transformer_blocks, recording_wan_attention
from utils.layout import LayoutCondition, SceneLayout, build_condition


def compute_flow_step_sizes(sigmas: torch.Tensor) -> torch.Tensor:
    """(steps,) float32 LVD step sizes under flow matching: ``sigma * sqrt((1 - sigma)^2 + sigma^2)``.

    With ``x = (1 - sigma) x0 + sigma eps`` and ``c = sqrt((1 - sigma)^2 + sigma^2)``, ``z = x / c`` is a
    variance-preserving latent with ``sqrt(1 - alpha_bar) = sigma / c``. LVD's ``z <- z - sqrt(1 - alpha_bar)
    grad_z E`` with ``grad_z = c grad_x`` becomes ``x <- x - sigma c grad_x E``.
    """
    sigmas = sigmas.to(torch.float32)
    return sigmas * torch.sqrt((1 - sigmas) ** 2 + sigmas ** 2)


def prepare_wan_latents(seed: int, num_frames: int, height: int, width: int, channels: int, device,
                        spatial_factor: int = 8, temporal_factor: int = 4, noise: str = NOISE_CPU) -> torch.Tensor:
    """(1, C, (F - 1) / 4 + 1, H / 8, W / 8) float32 standard normal noise.

    ``noise="cpu"``: a CPU generator (the same on every machine; `WanPipeline` with
    ``generator=torch.Generator("cpu").manual_seed(seed)``). ``noise="reference"``: a generator on ``device``
    (`WanPipeline` with a generator on the GPU; device-dependent).
    """
    shape = (1, channels, wan_latent_num_frames(num_frames, temporal_factor), height // spatial_factor,
             width // spatial_factor)
    if noise == NOISE_REFERENCE:
        return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device,
                           dtype=torch.float32)
    if noise != NOISE_CPU:
        raise ValueError(f"initial noise must be {NOISE_CPU!r} or {NOISE_REFERENCE!r}, found {noise!r}")
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(device)


class WanBackbone(Backbone):
    """A `models.wan.WanVideoModel` (WanTransformer3DModel, AutoencoderKLWan, umT5, UniPC)."""

    cfg_skips_at_or_below_one = True  # WanPipeline: CFG only above 1

    def __init__(self, model: WanVideoModel):
        super().__init__(model)
        self._recording: WanRecordingContext | None = None

    @property
    def transformer(self):
        return self.model.transformer

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @property
    def spatial_factor(self) -> int:
        return self.model.vae.config.scale_factor_spatial if self.model.vae is not None else 8

    @property
    def temporal_factor(self) -> int:
        return self.model.vae.config.scale_factor_temporal if self.model.vae is not None else 4

    # -- text ------------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str], negative_prompt: str | None) -> TextConditioning:
        with self.model.text_encoder_on_device():  # one visit of an offloaded encoder for both encodings
            cond = self.model.encode(list(prompts))
            if negative_prompt is None:
                return TextConditioning(cond=cond)
            return TextConditioning(cond=cond, uncond=self.model.encode([negative_prompt] * len(prompts)))

    def build_condition(self, layout: SceneLayout, num_frames: int) -> LayoutCondition:
        """The UNets' condition (same diffusion prompt, boxes for ``num_frames`` frames), with umT5 token
        positions found on the cleaned prompt the encoder sees."""
        condition = build_condition(layout, num_frames)
        positions, token_map = compute_wan_token_positions(clean_prompt(condition.prompt), condition.phrases,
                                                           self.model.tokenizer, WAN_TEXT_TOKENS)
        return dataclasses.replace(condition, token_positions=positions, token_map=token_map)

    # -- latents, sampling, decoding -------------------------------------------------------------

    def prepare_latents(self, seed: int, num_frames: int, height: int, width: int, noise: str) -> torch.Tensor:
        return prepare_wan_latents(seed, num_frames, height, width, self.transformer.config.in_channels, self.device,
                                   self.spatial_factor, self.temporal_factor, noise=noise)

    def make_scheduler(self, corrector_off_steps: int | None = None):
        if corrector_off_steps is None:
            return self.model.make_scheduler()
        return self.model.with_corrector_off_steps(corrector_off_steps).make_scheduler()

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                          **model_kwargs) -> torch.Tensor:
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timestep.expand(latents.shape[0]),
                                encoder_hidden_states=text, return_dict=False, **model_kwargs)[0]

    def predict_branches(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                         with_uncond: bool, model_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        unknown = sorted(set(model_kwargs) - {"attention_kwargs"})
        if unknown:
            raise ValueError(f"the Wan transformer takes attention_kwargs only as extra model inputs, got {unknown} "
                             "(GLIGEN adapters exist for the UNet3D models only)")
        videos = latents.shape[0]
        with self.calling(videos, slice(0, videos)):  # the prompt first, then the negative prompt (WanPipeline)
            cond = self._call_transformer(latents, timestep, text.cond, **model_kwargs)
        if not with_uncond:
            return cond, None
        with self.calling(videos, slice(0, 0)):
            return cond, self._call_transformer(latents, timestep, text.uncond, **model_kwargs)

    def step(self, scheduler, model_output: torch.Tensor, timestep: torch.Tensor,
             latents: torch.Tensor) -> torch.Tensor:
        if scheduler.step_index is None and scheduler.begin_index is None:
            scheduler.set_begin_index(0)  # as WanPipeline: no timestep lookup (and no device-to-host sync)
        return scheduler.step(model_output, timestep, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self.model.vae is None:
            raise ValueError(f"{self.model.source}: this Wan model was built without a VAE")
        frames = decode_wan_latents(self.model.vae, latents)  # (F, H, W, 3) float32 in [0, 1]
        return (frames * 255).astype(np.uint8)                 # truncation, as the UNet backbone (spec 5.5)

    # -- attention guidance ----------------------------------------------------------------------

    def guided_num_frames(self, num_frames: int) -> int:
        """Latent frames (81 -> 21): the maps have one frame per latent frame."""
        return wan_latent_num_frames(num_frames, self.temporal_factor) // self.patch_size[0]

    def attention_map_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        _, patch_h, patch_w = self.patch_size
        return ((height // (self.spatial_factor * patch_h), width // (self.spatial_factor * patch_w)),)

    def guidance_step_sizes(self, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        return compute_flow_step_sizes(scheduler.sigmas[:len(timesteps)]).to(self.device)

    def check_guided_layers(self, names: Sequence[str]) -> None:
        check_wan_guided_layers(self.transformer, names)

    @property
    def attention_model(self) -> torch.nn.Module:
        return self.transformer

    def attention_layers(self) -> dict[str, str]:
        """``blocks.<i>.attn1``: 3-D self-attention over latent frames x patches; ``blocks.<i>.attn2``: text."""
        names = (key.removesuffix(".processor") for key in self.transformer.attn_processors)
        return {name: CROSS if name.endswith("attn2") else VIDEO for name in names}

    def recording(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        return WanRecordingContext(self, recorder)

    def recorded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                         recorder: AttentionRecorder, low_memory: bool = False) -> dict[str, torch.Tensor]:
        if self._recording is None or self._recording.recorder is not recorder:
            raise RuntimeError("recorded_forward needs the backbone's recording(recorder) context")
        state = self._recording.state
        _, _, frames, height, width = latents.shape
        patch_t, patch_h, patch_w = self.patch_size
        state.grid = (frames // patch_t, height // patch_h, width // patch_w)
        state.use_text(cond)  # text keys / values are computed once per prompt
        # Low memory: gradient checkpointing of the blocks (the pass stops at the last guided one).
        blocks = (checkpointed_transformer_blocks(self.transformer, state, recorder) if low_memory
                  else contextlib.nullcontext())
        with blocks:
            return run_recorded_forward(self.transformer, recorder, hidden_states=latents.to(self.dtype),
                                        timestep=timestep.expand(latents.shape[0]), encoder_hidden_states=cond,
                                        return_dict=False)


class WanRecordingContext(contextlib.AbstractContextManager):
    """`WanBackbone.recording`: the recording processors installed, and their shared state, for one run."""

    def __init__(self, backbone: WanBackbone, recorder: AttentionRecorder):
        self.backbone = backbone
        self.recorder = recorder
        self.state = None
        self._installed: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "WanRecordingContext":
        self._installed = recording_wan_attention(self.backbone.transformer, self.recorder)
        self.state = self._installed.__enter__()
        self.backbone._recording = self
        return self

    def __exit__(self, *exc_info) -> None:
        self.backbone._recording = None
        installed, self._installed = self._installed, None
        installed.__exit__(*exc_info)

