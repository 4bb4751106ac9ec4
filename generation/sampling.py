"""Stage 2: videos from layout conditions (or bare prompts), a loaded model and the configs.

`generate_videos` assembles one run of the denoising loop (`generation.loop.denoise`) for a batch:
the model family's backbone adapter (`generation.backbones`), the encoded prompts and initial noise,
and the run's layout controls (`generation.controls`), any set of families at once: LVD's layout
guidance as a ``before_step`` hook (`generation.lvd`), GLIGEN's grounding inputs as a per-step
model-kwargs provider (`generation.grounding`), attention masking and modulation as attention
processors (`generation.attention_control`). Baselines have none. Every video keeps its own seed,
layout and control state.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from generation.backbones import backbone_for
from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig
from generation.controls import build_controls
from generation.guidance import GuidanceRecord
from generation.loop import BatchContext, StepCallback, denoise
from models.gligen import GligenConfig, is_grounded
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
                   condition: LayoutCondition | None = None, controls: Sequence[Any] = (),
                   guidance: GuidanceConfig | None = None, gligen: GligenConfig | None = None,
                   execution: ExecutionConfig | None = None,
                   step_callback: StepCallback | None = None) -> VideoResult:
    """Generate one video.

    ``model`` is a loaded model (``models.loading.load_video_model``). With a ``condition`` the model
    sees ``condition.prompt`` (the diffusion prompt with the background) and the layout controls act on
    its boxes: ``controls`` is a list of control configs (`generation.controls.CONTROL_FAMILIES`), e.g.
    LVD guidance (``GuidanceConfig``), GLIGEN (a grounded UNet, spec 6: the CFG pass gets the boxes and
    phrases as GLIGEN objects, fusers on for the first ``int(beta * steps)`` steps; guided passes get
    none, spec 4.7), attention masking or modulation. ``guidance`` / ``gligen`` are shorthands for
    adding those two configs. Baselines pass none of these and the prompt is used as is.
    """
    request = VideoRequest(prompt=prompt, seed=seed, condition=condition)
    return generate_videos(model, [request], sampling, controls=controls, guidance=guidance, gligen=gligen,
                           execution=execution, step_callback=step_callback)[0]


def generate_videos(model, requests: Sequence[VideoRequest], sampling: SamplingConfig, *,
                    controls: Sequence[Any] = (), guidance: GuidanceConfig | None = None,
                    gligen: GligenConfig | None = None, execution: ExecutionConfig | None = None,
                    step_callback: StepCallback | None = None) -> list[VideoResult]:
    """Generate several videos in one batch (one forward per step for all of them).

    ``controls``: control configs, any set of families at once (one config per family); ``guidance`` and
    ``gligen`` are added to them when given. Each video keeps its own seed, layout and control state, so
    every result equals :func:`generate_video` on its own up to floating-point differences of batched
    kernels.
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

    configs = [*controls, *(config for config in (gligen, guidance) if config is not None)]
    if gligen is None and not any(isinstance(config, GligenConfig) for config in configs):
        warn_unused_fusers(model, requests)
    context = BatchContext(model=model, backbone=backbone, prompts=tuple(r.prompt for r in requests),
                           conditions=tuple(r.condition for r in requests), text=text, scheduler=scheduler,
                           timesteps=timesteps, sampling=sampling, execution=execution)
    built = build_controls(configs, context)
    with contextlib.ExitStack() as stack:
        for control in built:
            stack.enter_context(control)  # processors / fuser state, restored on exit
        guider = backbone.make_guider(sampling.guidance_scale, sampling.cfg_variant, sampling.guidance_rescale)
        latents = denoise(backbone, latents, scheduler, timesteps, text, guider, controls=built,
                          step_callback=step_callback)

    logs: list[list[GuidanceRecord]] = [[] for _ in requests]
    for control in built:
        for index, log in enumerate(getattr(control, "video_logs", lambda: None)() or []):
            logs[index] += log
    results = []
    for index, request in enumerate(requests):
        video_latents = latents[index:index + 1]
        results.append(VideoResult(frames=backbone.decode(video_latents), latents=video_latents.detach().cpu(),
                                   seed=request.seed, prompt=texts[index], guidance_log=logs[index]))
    return results


def warn_unused_fusers(model, requests: Sequence[VideoRequest]) -> None:
    """A grounded UNet run without GLIGEN objects: say so once (its fusers get no objects)."""
    if hasattr(model, "unet") and is_grounded(model.unet):  # UNet3D family only
        for request in requests:
            if request.condition is not None:
                logger.warning("prompt %r: the UNet has GLIGEN fusers but no GLIGEN config was given; its fusers "
                               "get no objects", request.prompt)
