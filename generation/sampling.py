"""Stage 2: videos from layout conditions (or bare prompts), a loaded model and the configs.

`generate_videos` assembles one run of the denoising loop (`generation.loop.denoise`) for a batch:
the model family's backbone adapter (`generation.backbones`), the encoded prompts and initial noise,
and the method's extensions: LVD's layout guidance as a ``before_step`` hook (`generation.lvd`) and
GLIGEN's grounding inputs as a per-step model-kwargs provider (:class:`GligenGrounding`). Baselines
have neither. Every video keeps its own seed, layout and guidance state.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from generation.backbones import backbone_for
from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig
from generation.guidance import GuidanceRecord
from generation.loop import Step, StepCallback, denoise
from generation.lvd import build_layout_guidance
from models.gligen import (GligenConfig, build_gligen_objects, count_grounded_steps, fuser_state_restored,
                           is_grounded, set_fusers_enabled)
from utils.layout import LayoutCondition

logger = logging.getLogger(__name__)


@dataclass
class VideoResult:
    frames: np.ndarray                 # (F, H, W, 3) uint8 RGB
    latents: torch.Tensor              # (1, C, latent frames, h, w) final latents before decoding, on the CPU
    seed: int
    prompt: str                        # the prompt the model saw
    guidance_log: list[GuidanceRecord] = field(default_factory=list)


@dataclass(frozen=True)
class VideoRequest:
    """One video of a batch: the caller's prompt, its seed and (for layout methods) its condition."""

    prompt: str
    seed: int
    condition: LayoutCondition | None = None


def generate_video(model, prompt: str, sampling: SamplingConfig, seed: int, *,
                   condition: LayoutCondition | None = None, guidance: GuidanceConfig | None = None,
                   gligen: GligenConfig | None = None, execution: ExecutionConfig | None = None,
                   step_callback: StepCallback | None = None) -> VideoResult:
    """Generate one video.

    ``model`` is a loaded model (``models.loading.load_video_model``). With a ``condition`` the model
    sees ``condition.prompt`` (the diffusion prompt with the background); with ``guidance`` too, LVD
    guidance runs on its boxes. With ``gligen`` (a grounded UNet, spec 6), the CFG pass gets the
    condition's boxes and phrases as GLIGEN objects, with the fusers on for the first
    ``int(beta * steps)`` steps; guided passes get none (spec 4.7). Baselines pass none of these and the
    prompt is used as is.
    """
    request = VideoRequest(prompt=prompt, seed=seed, condition=condition)
    return generate_videos(model, [request], sampling, guidance=guidance, gligen=gligen, execution=execution,
                           step_callback=step_callback)[0]


def generate_videos(model, requests: Sequence[VideoRequest], sampling: SamplingConfig, *,
                    guidance: GuidanceConfig | None = None, gligen: GligenConfig | None = None,
                    execution: ExecutionConfig | None = None,
                    step_callback: StepCallback | None = None) -> list[VideoResult]:
    """Generate several videos in one batch (one forward per step for all of them).

    Each video keeps its own seed, layout and guidance state, so every result equals
    :func:`generate_video` on its own up to floating-point differences of batched kernels.
    """
    if not requests:
        return []
    backbone = backbone_for(model)
    execution = execution or ExecutionConfig()
    # Fresh (multistep solvers keep the previous outputs as state), with the run's sampler setting.
    scheduler = backbone.make_scheduler(sampling.corrector_off_steps)
    texts = [r.condition.prompt if r.condition is not None else r.prompt for r in requests]
    text = backbone.encode_text(texts, sampling.negative_prompt)
    latents = torch.cat([backbone.prepare_latents(r.seed, sampling.num_frames, sampling.height, sampling.width,
                                                  sampling.initial_noise) for r in requests])
    scheduler.set_timesteps(sampling.num_inference_steps, device=backbone.device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma

    hooks = []
    if guidance is not None:
        layout_guidance = build_layout_guidance(
            backbone, [r.prompt for r in requests], [r.condition for r in requests], text.cond, guidance,
            execution, scheduler, timesteps, sampling.num_frames, sampling.height, sampling.width)
        hooks = [layout_guidance] if layout_guidance is not None else []
    grounding = GligenGrounding.build(model, requests, sampling.num_frames, gligen, len(timesteps))
    providers = [grounding] if grounding is not None else []

    with contextlib.ExitStack() as stack:
        for extension in (*providers, *hooks):
            stack.enter_context(extension)  # recording processors / fuser state, restored on exit
        latents = denoise(backbone, latents, scheduler, timesteps, text, sampling.guidance_scale, hooks=hooks,
                          kwargs_providers=providers, step_callback=step_callback)

    schedules = hooks[0].schedules if hooks else [None] * len(requests)
    results = []
    for index, request in enumerate(requests):
        video_latents = latents[index:index + 1]
        schedule = schedules[index]
        results.append(VideoResult(frames=backbone.decode(video_latents), latents=video_latents.detach().cpu(),
                                   seed=request.seed, prompt=texts[index],
                                   guidance_log=list(schedule.log) if schedule else []))
    return results


class GligenGrounding:
    """GLIGEN conditioning as a model-kwargs provider (spec 6.1): the CFG pass gets the layout's objects,
    ``(2 * B * F, max_objects, C)`` with the unconditional videos first; the fusers are on for the first
    ``int(beta * steps)`` steps (scheduled sampling) and their state is restored on exit."""

    def __init__(self, unet, objects: torch.Tensor, num_grounded_steps: int):
        self.unet = unet
        self.objects = objects
        self.num_grounded_steps = num_grounded_steps
        self._restore = None

    @classmethod
    def build(cls, model, requests: Sequence[VideoRequest], num_frames: int, gligen: GligenConfig | None,
              num_steps: int) -> "GligenGrounding | None":
        per_video = [_video_gligen_objects(model, r.prompt, num_frames, r.condition, gligen) for r in requests]
        if all(objects is None for objects in per_video):
            return None
        if any(objects is None for objects in per_video):
            raise ValueError("a GLIGEN batch needs a layout condition for every video")
        # Each video's objects are (2F, ...): uncond F, then cond F.
        objects = torch.cat([o[:num_frames] for o in per_video] + [o[num_frames:] for o in per_video])
        return cls(model.unet, objects, count_grounded_steps(gligen.scheduled_sampling_beta, num_steps))

    def __enter__(self) -> "GligenGrounding":
        self._restore = fuser_state_restored(self.unet)
        self._restore.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore.__exit__(*exc_info)
        self._restore = None

    def model_kwargs(self, step: Step) -> dict:
        set_fusers_enabled(self.unet, step.index < self.num_grounded_steps)  # scheduled sampling (spec 6.1)
        return {"cross_attention_kwargs": {"gligen": {"objs": self.objects}}}


def _video_gligen_objects(model, prompt: str, num_frames: int, condition: LayoutCondition | None,
                          gligen: GligenConfig | None) -> torch.Tensor | None:
    """One video's ``(2 * F, max_objects, C)`` GLIGEN objects, or None (computed once per video: they
    depend only on the layout)."""
    if gligen is None:
        if condition is not None and hasattr(model, "unet") and is_grounded(model.unet):  # UNet3D family only
            logger.warning("prompt %r: the UNet has GLIGEN fusers but no GLIGEN config was given; its fusers "
                           "get no objects", prompt)
        return None
    if condition is None:
        logger.warning("prompt %r: GLIGEN is configured but no layout condition was given; generating without "
                       "GLIGEN objects", prompt)
        return None
    if condition.num_frames != num_frames:
        raise ValueError(f"prompt {condition.prompt!r}: the layout has boxes for {condition.num_frames} frames but "
                         f"{num_frames} frames are generated; build the condition with num_frames={num_frames}")
    return build_gligen_objects(model, condition.boxes_xyxy, condition.phrases, gligen.max_objects)
