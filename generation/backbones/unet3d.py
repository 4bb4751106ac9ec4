"""The UNet3D backbone family: ModelScope, Zeroscope (and Zeroscope XL), their GLIGEN adapters and the tiny
models, as the reference samples them (spec 5).

- Prompts are tokenised to 77 CLIP tokens (the tokenizer's pad, truncated) and encoded in one batch,
  negative prompts first: ``[uncond x B; cond_1 .. cond_B]``, the order the CFG chunking expects.
- Initial noise ``(1, 4, F, H/8, W/8)`` is drawn on the CPU in float32 from
  ``torch.Generator().manual_seed(seed)`` and moved to the model's device and dtype, so a seed gives the
  same noise on every machine (the reference drew fp16 noise on the GPU: ``noise="reference"``).
- One UNet call on ``[latents; latents]`` for CFG; the scheduler steps on ``(B*F, C, h, w)``.
- The VAE decodes frame by frame (slicing); frames are ``floor(255 * clip(x / 2 + 0.5, 0, 1))``.
- Guidance step size ``sqrt(1 - alpha_bar_t)`` (spec 4.5); maps of the spatial cross-attention layers
  ``(B*F, heads, h*w, tokens)`` at ``latent / {1, 2, 4, 8}``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch

from generation.backbones.base import CROSS, SPATIAL, TEMPORAL, Backbone, TextConditioning
from generation.config import NOISE_CPU, NOISE_REFERENCE
from generation.energies import compute_latent_map_sizes
from generation.guidance import compute_step_sizes
from models.attention import AttentionRecorder, check_guided_layers, recording_attention, run_recorded_forward
from utils.layout import LayoutCondition, SceneLayout, build_condition


def encode_prompts(model, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (n, 77, D) text embeddings (padded to 77 with the tokenizer's pad, truncated)."""
    tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model.text_encoder(tokens.input_ids.to(model.device))[0].to(model.dtype)


def prepare_latents(seed: int, num_frames: int, height: int, width: int, channels: int, device, dtype,
                    vae_scale_factor: int = 8, noise: str = NOISE_CPU) -> torch.Tensor:
    """(1, C, F, H/8, W/8) standard normal noise.

    ``noise="cpu"``: drawn on the CPU in float32, then moved (the same on every machine).
    ``noise="reference"``: drawn as the reference did, by a generator on ``device`` in ``dtype``
    (fp16 on CUDA; device-dependent), for bit-level comparisons with the original code.
    """
    shape = (1, channels, num_frames, height // vae_scale_factor, width // vae_scale_factor)
    if noise == NOISE_REFERENCE:
        generator = torch.Generator(device).manual_seed(seed)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if noise != NOISE_CPU:
        raise ValueError(f"initial noise must be {NOISE_CPU!r} or {NOISE_REFERENCE!r}, found {noise!r}")
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(1, 4, F, h, w) latents -> (F, H, W, 3) float32 in [0, 1], one frame per VAE call.

    On CUDA the VAE's attention runs on the memory-efficient SDPA kernel, as in the reference (spec 5.5).
    """
    latents = latents / vae.config.scaling_factor
    frames = latents[0].permute(1, 0, 2, 3)  # (F, 4, h, w)
    kernels = contextlib.nullcontext()
    if latents.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with torch.no_grad(), kernels:
        images = torch.cat([vae.decode(frame[None]).sample for frame in frames])
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[0, 1] floats -> uint8 by truncation, as the reference does (``astype(uint8)`` of x * 255)."""
    return (frames.cpu().numpy() * 255).astype(np.uint8)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def step_scheduler_over_frames(scheduler, noise: torch.Tensor, timestep: torch.Tensor,
                               latents: torch.Tensor) -> torch.Tensor:
    """The scheduler steps on (B*F, C, h, w), as the reference pipeline reshapes (spec 5.2)."""
    batch, channels, frames, height, width = latents.shape
    flat_latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    flat_noise = noise.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    flat_latents = scheduler.step(flat_noise, timestep, flat_latents).prev_sample
    return flat_latents.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def unet_attention_kind(name: str) -> str:
    """The kind of a UNet3D attention module by its path: the temporal transformers (``transformer_in``,
    ``temp_attentions``) attend across frames in both their modules; the spatial ones have self-attention
    ``attn1`` and text cross-attention ``attn2``."""
    if name.startswith("transformer_in.") or ".temp_attentions." in name:
        return TEMPORAL
    return CROSS if name.endswith("attn2") else SPATIAL


class UNet3DBackbone(Backbone):
    """A `models.video_model.VideoModel` (UNet3D, AutoencoderKL, CLIP text encoder, DPM-Solver++)."""

    def encode_text(self, prompts: Sequence[str], negative_prompt: str | None) -> TextConditioning:
        prompts = list(prompts)
        if negative_prompt is None:
            return TextConditioning(cond=encode_prompts(self.model, prompts))
        # One encoder call for both halves, as the reference pipeline does.
        embeddings = encode_prompts(self.model, [negative_prompt] * len(prompts) + prompts)
        return TextConditioning(cond=embeddings[len(prompts):], uncond=embeddings[:len(prompts)])

    def build_condition(self, layout: SceneLayout, num_frames: int) -> LayoutCondition:
        return build_condition(layout, num_frames, self.model.tokenizer)

    def prepare_latents(self, seed: int, num_frames: int, height: int, width: int, noise: str) -> torch.Tensor:
        return prepare_latents(seed, num_frames, height, width, self.model.unet.config.in_channels, self.device,
                               self.dtype, vae_scale_factor(self.model.vae), noise=noise)

    def make_scheduler(self, corrector_off_steps: int | None = None):
        if corrector_off_steps:  # a typed config made by hand can say so; sampling_config_for refuses it
            raise ValueError(f"the UNet3D family samples with DPM-Solver, which has no corrector to switch off; "
                             f"corrector_off_steps must be 0 or None, found {corrector_off_steps}")
        return self.model.make_scheduler()

    def predict_branches(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                         with_uncond: bool, model_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        videos = latents.shape[0]
        if not with_uncond:
            model_input = scheduler.scale_model_input(latents, timestep)
            with self.calling(videos, slice(0, videos)):
                return self.model.unet(model_input, timestep, encoder_hidden_states=text.cond, return_dict=False,
                                       **model_kwargs)[0], None
        # One call on [uncond; cond], as the reference pipeline (spec 5.2); GLIGEN objects follow that order.
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
        with self.calling(2 * videos, slice(videos, 2 * videos)):
            noise = self.model.unet(model_input, timestep, encoder_hidden_states=torch.cat([text.uncond, text.cond]),
                                    return_dict=False, **model_kwargs)[0]
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_cond, noise_uncond

    def step(self, scheduler, model_output: torch.Tensor, timestep: torch.Tensor,
             latents: torch.Tensor) -> torch.Tensor:
        return step_scheduler_over_frames(scheduler, model_output, timestep, latents)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return frames_to_uint8(decode_latents(self.model.vae, latents))

    def attention_map_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        factor = vae_scale_factor(self.model.vae)
        return compute_latent_map_sizes(height // factor, width // factor)

    def guidance_step_sizes(self, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        return compute_step_sizes(scheduler.alphas_cumprod, timesteps).to(self.device)

    def check_guided_layers(self, names: Sequence[str]) -> None:
        check_guided_layers(self.model.unet, names)

    @property
    def attention_model(self) -> torch.nn.Module:
        return self.model.unet

    def attention_layers(self) -> dict[str, str]:
        names = (key.removesuffix(".processor") for key in self.model.unet.attn_processors)
        # attn1 / attn2 of the transformer blocks (not e.g. GLIGEN's gated self-attention, ``fuser.attn``)
        return {name: unet_attention_kind(name) for name in names if name.endswith(("attn1", "attn2"))}

    def recording(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        return recording_attention(self.model.unet, recorder)

    def recorded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                         recorder: AttentionRecorder, low_memory: bool = False) -> dict[str, torch.Tensor]:
        # Low memory keeps the tensors saved for the backward pass in (pinned) host memory.
        offload = low_memory and latents.device.type == "cuda"
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            return run_recorded_forward(self.model.unet, recorder, latents, timestep, encoder_hidden_states=cond)
