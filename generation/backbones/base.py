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

Classifier-free guidance is one wrapper (`generation.cfg`): :meth:`Backbone.predict` asks the guider how many
branches to run, :meth:`Backbone.predict_branches` runs them the family's way, the guider combines them.
Which videos of a model call are conditional is exposed, not assumed (:attr:`Backbone.model_call`), so an
attention processor that acts on the conditional branch only (attention masking, modulation) works on both
layouts: one call on ``[uncond; cond]`` (UNet3D) or one call per branch (Wan). Processors for any purpose
(recording, masking, modulation) are installed by :meth:`Backbone.attention_processors`, which restores the
previous ones on exit; installations nest, each new processor wrapping the one it replaces.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from generation.cfg import CFG_STANDARD, CFG_VARIANTS, CFG_ZERO_STAR, ClassifierFreeGuidance
from models.attention import AttentionRecorder, processors_replaced
from utils.layout import LayoutCondition, SceneLayout


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts of a batch: what the model call of classifier-free guidance needs."""

    cond: torch.Tensor                  # (B, tokens, D): the prompts the model sees
    uncond: torch.Tensor | None = None  # (B, tokens, D): the negative prompt; None: no CFG pass


# Kinds of attention modules (`Backbone.attention_layers`): what their queries and keys are.
from generation.attention_config import CROSS, SPATIAL, TEMPORAL, VIDEO  # noqa: E402,F401  (the kinds)
ATTENTION_KINDS = (CROSS, SPATIAL, TEMPORAL, VIDEO)


@dataclass(frozen=True)
class ModelCall:
    """The batch of the model call in progress: ``num_videos`` videos, the conditional (prompt) ones at
    ``cond`` (a slice of videos; the others see the negative prompt). Rows of every attention module are
    video-major, so video ``v`` owns rows ``[v * r, (v + 1) * r)`` for ``r = rows / num_videos``."""

    num_videos: int
    cond: slice


class Backbone(abc.ABC):
    """One family of text-to-video diffusion models, as the sampling loop and the guidance see it."""

    #: The CFG rule of the pipeline this family reproduces (see `generation.cfg`).
    cfg_skips_at_or_below_one: bool = False

    def __init__(self, model: Any):
        self.model = model
        #: Set while `predict_branches` calls the model (None otherwise, e.g. in guided passes).
        self.model_call: ModelCall | None = None

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

    def make_guider(self, guidance_scale: float, variant: str = CFG_STANDARD,
                    rescale: float = 0.0) -> ClassifierFreeGuidance:
        """Classifier-free guidance at ``guidance_scale`` with this family's pipeline rule (``variant`` and
        ``rescale``: `generation.cfg`'s variants)."""
        if variant not in CFG_VARIANTS:
            raise ValueError(f"CFG variant must be one of {CFG_VARIANTS}, found {variant!r}")
        return ClassifierFreeGuidance(guidance_scale, skip_at_or_below_one=self.cfg_skips_at_or_below_one,
                                      guidance_rescale=rescale, zero_star=variant == CFG_ZERO_STAR)

    def predict(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                guidance, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The model output at ``timestep``, classifier-free guided when ``text.uncond`` is given.

        ``guidance``: a CFG scale (this family's guider) or a guider with diffusers' interface.
        """
        guider = self.make_guider(guidance) if isinstance(guidance, (int, float)) else guidance
        with_uncond = text.uncond is not None and guider.num_conditions == 2
        pred_cond, pred_uncond = self.predict_branches(scheduler, latents, timestep, text, with_uncond,
                                                       model_kwargs or {})
        return guider.forward(pred_cond, pred_uncond).pred if with_uncond else pred_cond

    @abc.abstractmethod
    def predict_branches(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning,
                         with_uncond: bool, model_kwargs: dict[str, Any]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional, unconditional or None) model outputs at ``timestep``, each call inside
        :meth:`calling` so that processors know which videos are conditional."""

    @contextlib.contextmanager
    def calling(self, num_videos: int, cond: slice) -> Iterator[None]:
        """Mark a model call of ``num_videos`` videos whose conditional ones are ``cond``."""
        self.model_call = ModelCall(num_videos, cond)
        try:
            yield
        finally:
            self.model_call = None

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

    # -- attention processors --------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def attention_model(self) -> torch.nn.Module:
        """The module whose ``attn_processors`` are the family's attention modules (a UNet, a transformer)."""

    @abc.abstractmethod
    def attention_layers(self) -> dict[str, str]:
        """Module path -> kind (`ATTENTION_KINDS`) of every attention module of the model."""

    def attention_processors(self, layer_names: Sequence[str], build: Callable[[str, Any], Any]
                             ) -> contextlib.AbstractContextManager:
        """Give each named module the processor ``build(name, the processor it replaces)``, for any purpose;
        restores the previous processors on exit. The built processor should call the replaced one whenever it
        does not act itself, so that installations compose (e.g. a mask under the LVD recorder)."""
        return processors_replaced(self.attention_model, layer_names, build)

    @abc.abstractmethod
    def recording(self, recorder: AttentionRecorder) -> contextlib.AbstractContextManager:
        """Install the recording processors on the recorder's modules; restore the previous ones on exit."""

    @abc.abstractmethod
    def recorded_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                         recorder: AttentionRecorder, low_memory: bool = False) -> dict[str, torch.Tensor]:
        """One guided forward pass (conditional branch only) -> module path -> maps
        ``(videos * map_frames, heads, h * w, recorded tokens)``, with their autograd graph."""
