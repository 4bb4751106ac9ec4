"""What the denoising loop and the guidance need from a family of video models: the `Backbone` interface.

A backbone adapter wraps the loaded components of one model family (`models.video_model.VideoModel` for
the UNet3D family: ModelScope, Zeroscope, their GLIGEN adapters and the tiny models) and owns everything
that differs between families: encoding prompts, the latent shape and initial noise, the model call of
classifier-free guidance, the scheduler step, decoding, and for attention guidance which modules can be
recorded, how the recorded maps are laid out and the step size of the latent update. The loop
(`generation.loop.denoise`) and the guidance hooks (`generation.lvd`) only talk to this interface, so
a new model family is a new adapter, not an edit of the loop.

Attention maps reach the energies in one layout, whatever the family: per guided module a tensor
``(videos * map_frames, heads, h * w, tokens)``, batch-major, the token axis holding only the columns
the recorder was asked for.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from models.attention import AttentionRecorder
from utils.layout import LayoutCondition, SceneLayout


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts of a batch: what the model call of classifier-free guidance needs."""

    cond: torch.Tensor                  # (B, tokens, D): the prompts the model sees
    uncond: torch.Tensor | None = None  # (B, tokens, D): the negative prompt; None: no CFG pass


class Backbone(abc.ABC):
    """One family of text-to-video diffusion models, as the sampling loop and the guidance see it."""

    def __init__(self, model: Any):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- text ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_text(self, prompts: Sequence[str], negative_prompt: str | None) -> TextConditioning:
        """Encode a batch of prompts (and the negative prompt for each, unless None)."""

    @abc.abstractmethod
    def build_condition(self, layout: SceneLayout, num_frames: int) -> LayoutCondition:
        """The layout condition of ``layout`` for a video of ``num_frames`` frames, with the token
        positions of every phrase in this family's tokenizer (raises `utils.layout.LayoutError`)."""

    # -- latents, sampling, decoding -------------------------------------------------------------

    @abc.abstractmethod
    def prepare_latents(self, seed: int, num_frames: int, height: int, width: int, noise: str) -> torch.Tensor:
        """(1, C, latent frames, h, w) initial noise of one video from its seed."""

    @abc.abstractmethod
    def make_scheduler(self, corrector_off_steps: int | None = None):
        """A fresh scheduler of this model (schedulers keep solver state between steps); ``corrector_off_steps``
        is `SamplingConfig.corrector_off_steps` (None: the model's sampler as loaded)."""

    @abc.abstractmethod
    def predict(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                guidance_scale: float, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The model output at ``timestep``, classifier-free guided when ``text.uncond`` is given."""

    @abc.abstractmethod
    def step(self, scheduler, model_output: torch.Tensor, timestep: torch.Tensor,
             latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step: the latents of the next timestep."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(1, C, latent frames, h, w) final latents -> (F, H, W, 3) uint8 RGB frames."""

    # -- attention guidance ----------------------------------------------------------------------

    def guided_num_frames(self, num_frames: int) -> int:
        """Frames of the recorded attention maps of a ``num_frames``-frame video (boxes are given for these)."""
        return num_frames

    @abc.abstractmethod
    def attention_map_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """The (h, w) grids of the recordable attention maps of a ``height x width`` video."""

    @abc.abstractmethod
    def guidance_step_sizes(self, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
        """(steps,) float32 factors of the latent update ``x <- x - factor * loss_scale * dE/dx`` per step."""

    @abc.abstractmethod
    def check_guided_layers(self, names: Sequence[str]) -> None:
        """Raise ValueError unless every name is a module this family can record."""

    @abc.abstractmethod
    def recording(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        """Install the recording processors on the recorder's modules; restore the previous ones on exit."""

    @abc.abstractmethod
    def recorded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                         recorder: AttentionRecorder, low_memory: bool = False) -> dict[str, torch.Tensor]:
        """One guided forward pass (conditional branch only) -> module path -> maps
        ``(videos * map_frames, heads, h * w, recorded tokens)``, with their autograd graph."""
