"""Stage 2: one video from a layout condition (or a bare prompt), a loaded model and the configs.

The loop is the reference's (spec 5): DPM-Solver++ from the model's scheduler config, classifier-free
guidance with the fixed negative prompt, latents reshaped to frames for the scheduler step, VAE
decode frame by frame, frames as ``floor(255 * clip(x / 2 + 0.5, 0, 1))``. Before the CFG pass of
each of the first ``max_index_step`` steps, LVD guidance (spec 4) moves the latents down the box
energy of the conditional branch's cross-attention.

Initial noise is drawn on the CPU in float32 from ``torch.Generator().manual_seed(seed)`` and then
moved to the model's device and dtype, so a seed gives the same noise on every machine (the
reference drew fp16 noise on the GPU, which is device-dependent).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from generation.config import NOISE_CPU, NOISE_REFERENCE, GuidanceConfig, SamplingConfig
from generation.energies import GuidanceTargets, compute_guidance_energy, prepare_guidance_targets
from generation.guidance import GuidanceRecord, GuidanceSchedule, compute_step_sizes, guide_batch
from models.attention import AttentionRecorder, recording_attention, run_recorded_forward
from models.gligen import (GligenConfig, build_gligen_objects, count_grounded_steps, fuser_state_restored,
                           is_grounded, set_fusers_enabled)
from utils.layout import LayoutCondition

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass
class VideoResult:
    frames: np.ndarray                 # (F, H, W, 3) uint8 RGB
    latents: torch.Tensor              # (1, 4, F, h, w) final latents before decoding, on the CPU
    seed: int
    prompt: str                        # the prompt the model saw
    guidance_log: list[GuidanceRecord] = field(default_factory=list)


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


def _vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class VideoRequest:
    """One video of a batch: the caller's prompt, its seed and (for layout methods) its condition."""

    prompt: str
    seed: int
    condition: LayoutCondition | None = None


@dataclass
class _GuidedVideo:
    """Per-video guidance state inside a batch."""

    schedule: GuidanceSchedule
    targets: GuidanceTargets
    columns: torch.Tensor  # (J,) positions of this video's tokens among the recorded columns


def _make_batch_energy_fn(model, recorder: AttentionRecorder, guided: list[_GuidedVideo | None],
                          cond_embeddings: torch.Tensor, timestep: torch.Tensor, num_frames: int,
                          guidance: GuidanceConfig) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """``energy_fn(latents (A, C, F, h, w), active video indices) -> (A,)`` scaled losses."""
    weights = guidance.energy_weights()

    def energy_fn(latents: torch.Tensor, active: list[int]) -> torch.Tensor:
        # --low-memory keeps the tensors saved for the backward pass in (pinned) host memory.
        offload = guidance.low_memory and latents.device.type == "cuda"
        embeddings = cond_embeddings[active]
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            maps = run_recorded_forward(model.unet, recorder, latents, timestep, encoder_hidden_states=embeddings)
        energies = []
        for position, video in enumerate(active):
            state = guided[video]
            frames = slice(position * num_frames, (position + 1) * num_frames)  # (B*F, ...) is batch-major
            video_maps = {name: m[frames].index_select(-1, state.columns) for name, m in maps.items()}
            energies.append(compute_guidance_energy(video_maps, state.targets, **weights))
        return guidance.loss_scale * torch.stack(energies)

    return energy_fn


def generate_video(model, prompt: str, sampling: SamplingConfig, seed: int, *,
                   condition: LayoutCondition | None = None, guidance: GuidanceConfig | None = None,
                   gligen: GligenConfig | None = None, step_callback: StepCallback | None = None) -> VideoResult:
    """Generate one video.

    ``model`` has ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``device``, ``dtype``
    (see ``models.loading.VideoModel``). With a ``condition`` the model sees ``condition.prompt`` (the
    diffusion prompt with the background); with ``guidance`` too, LVD guidance runs on its boxes.
    With ``gligen`` (a grounded UNet, spec 6), the CFG pass gets the condition's boxes and phrases as
    GLIGEN objects, with the fusers on for the first ``int(beta * steps)`` steps; guided passes get
    none (spec 4.7). Baselines pass none of these and the prompt is used as is.
    """
    request = VideoRequest(prompt=prompt, seed=seed, condition=condition)
    return generate_videos(model, [request], sampling, guidance=guidance, gligen=gligen,
                           step_callback=step_callback)[0]


def generate_videos(model, requests: Sequence[VideoRequest], sampling: SamplingConfig, *,
                    guidance: GuidanceConfig | None = None, gligen: GligenConfig | None = None,
                    step_callback: StepCallback | None = None) -> list[VideoResult]:
    """Generate several videos in one batch (one UNet forward per step for all of them).

    Each video keeps its own seed, layout and guidance state, so every result equals
    :func:`generate_video` on its own up to floating-point differences of batched kernels.
    """
    if not requests:
        return []
    unet = model.unet
    # A fresh scheduler per batch: DPM-Solver keeps the previous model outputs as state.
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    device, dtype = model.device, model.dtype
    batch = len(requests)
    texts = [r.condition.prompt if r.condition is not None else r.prompt for r in requests]
    # (2B, 77, D): [uncond x B; cond_1 .. cond_B], the order the CFG chunking expects.
    embeddings = encode_prompts(model, [sampling.negative_prompt] * batch + texts)
    latents = torch.cat([prepare_latents(r.seed, sampling.num_frames, sampling.height, sampling.width,
                                         unet.config.in_channels, device, dtype, _vae_scale_factor(model.vae),
                                         noise=sampling.initial_noise) for r in requests])
    scheduler.set_timesteps(sampling.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma

    guided = [_prepare_guidance(r, guidance, sampling.num_frames, embeddings.shape[1], latents.shape[-2:], device)
              for r in requests]
    recorder = None
    if any(guided):
        if guidance.record_object_tokens_only:
            recorded = sorted({int(i) for state in guided if state for i in state.targets.token_indices})
        else:
            recorded = list(range(embeddings.shape[1]))
        for state in guided:
            if state:
                state.columns = torch.tensor([recorded.index(int(i)) for i in state.targets.token_indices],
                                             device=device)
        recorder = AttentionRecorder(
            guidance.guided_layers,
            token_indices=torch.tensor(recorded, device=device) if guidance.record_object_tokens_only else None,
            stop_when_complete=guidance.stop_after_last_guided_layer)
        step_sizes = compute_step_sizes(scheduler.alphas_cumprod, timesteps).to(device)
    schedules = [state.schedule if state else None for state in guided]

    gligen_kwargs = _prepare_gligen_batch(model, requests, sampling.num_frames, gligen)
    if gligen_kwargs is not None:
        num_grounded_steps = count_grounded_steps(gligen.scheduled_sampling_beta, len(timesteps))

    context = recording_attention(unet, recorder) if recorder is not None else contextlib.nullcontext()
    fusers = fuser_state_restored(unet) if gligen_kwargs is not None else contextlib.nullcontext()
    with context, fusers:
        for step_index, timestep in enumerate(timesteps):
            if gligen_kwargs is not None:  # scheduled sampling (spec 6.1)
                set_fusers_enabled(unet, step_index < num_grounded_steps)
            if recorder is not None and step_index < guidance.max_index_step:
                energy_fn = _make_batch_energy_fn(model, recorder, guided, embeddings[batch:], timestep,
                                                  sampling.num_frames, guidance)
                latents = guide_batch(schedules, latents, step_index, int(timestep), energy_fn,
                                      step_sizes[step_index])
            with torch.no_grad():
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                noise = unet(model_input, timestep, encoder_hidden_states=embeddings,
                             cross_attention_kwargs=gligen_kwargs, return_dict=False)[0]
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + sampling.guidance_scale * (noise_cond - noise_uncond)
                latents = step_scheduler_over_frames(scheduler, noise, timestep, latents)
            if step_callback is not None:
                step_callback(step_index, len(timesteps))

    results = []
    for index, request in enumerate(requests):
        video_latents = latents[index:index + 1]
        frames = frames_to_uint8(decode_latents(model.vae, video_latents))
        schedule = schedules[index]
        results.append(VideoResult(frames=frames, latents=video_latents.detach().cpu(), seed=request.seed,
                                   prompt=texts[index], guidance_log=list(schedule.log) if schedule else []))
    return results


def _prepare_guidance(request: VideoRequest, guidance: GuidanceConfig | None, num_frames: int, num_tokens: int,
                      latent_size: tuple[int, int], device) -> _GuidedVideo | None:
    """Guidance state of one video, or None when it is not guided (with a warning where that is surprising)."""
    condition = request.condition
    if guidance is None:
        return None
    if condition is None:
        logger.warning("prompt %r: guidance is configured but no layout condition was given; "
                       "generating without guidance", request.prompt)
        return None
    if not condition.phrases:
        logger.warning("prompt %r: the layout has no objects; generating without guidance", request.prompt)
        return None
    if guidance.max_index_step <= 0:
        return None
    _check_condition(condition, num_frames, num_tokens)
    targets = prepare_guidance_targets(condition.boxes_xyxy, condition.token_positions, latent_size[0],
                                       latent_size[1], device)
    return _GuidedVideo(schedule=GuidanceSchedule(guidance), targets=targets, columns=targets.token_indices)


def _prepare_gligen_batch(model, requests: Sequence[VideoRequest], num_frames: int,
                          gligen: GligenConfig | None) -> dict | None:
    """The CFG pass's GLIGEN objects for a batch: ``(2 * B * F, max_objects, C)``, unconditional videos first."""
    per_video = [_prepare_gligen(model, r.prompt, num_frames, r.condition, gligen) for r in requests]
    if all(kwargs is None for kwargs in per_video):
        return None
    if any(kwargs is None for kwargs in per_video):
        raise ValueError("a GLIGEN batch needs a layout condition for every video")
    objects = [kwargs["gligen"]["objs"] for kwargs in per_video]  # each (2F, ...): uncond F, then cond F
    return {"gligen": {"objs": torch.cat([o[:num_frames] for o in objects] + [o[num_frames:] for o in objects])}}


def _prepare_gligen(model, prompt: str, num_frames: int, condition: LayoutCondition | None,
                    gligen: GligenConfig | None) -> dict | None:
    """``cross_attention_kwargs`` of the CFG pass: ``{"gligen": {"objs": (2 * F, max_objects, C)}}``, or None.

    The objects depend only on the layout, so they are computed once per video.
    """
    if gligen is None:
        if condition is not None and is_grounded(model.unet):
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
    objects = build_gligen_objects(model, condition.boxes_xyxy, condition.phrases, gligen.max_objects)
    return {"gligen": {"objs": objects}}


def _check_condition(condition: LayoutCondition, num_frames: int, num_tokens: int) -> None:
    """Guidance needs token positions inside the text embedding and one box per generated frame; say so
    instead of failing deep inside the energy (the reference has no such guard, spec 15.9)."""
    if condition.token_positions is None:
        raise ValueError(f"prompt {condition.prompt!r}: guidance needs the objects' token positions; build "
                         "the condition with the model's tokenizer (build_condition(..., tokenizer=...))")
    boxes_frames = condition.boxes_xyxy.shape[1]
    if boxes_frames != num_frames:
        raise ValueError(f"prompt {condition.prompt!r}: the layout has boxes for {boxes_frames} frames but "
                         f"{num_frames} frames are generated; build the condition with num_frames={num_frames}")
    for phrase, positions in zip(condition.phrases, condition.token_positions):
        if any(position >= num_tokens for position in positions):
            raise ValueError(f"prompt {condition.prompt!r}: object {phrase!r} has token positions "
                             f"{list(positions)}, past the {num_tokens}-token text embedding (the prompt is "
                             "truncated there); shorten the prompt or the phrase suffixes")


def step_scheduler_over_frames(scheduler, noise: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler steps on (B*F, C, h, w), as the reference pipeline reshapes (spec 5.2)."""
    batch, channels, frames, height, width = latents.shape
    flat_latents = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    flat_noise = noise.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    flat_latents = scheduler.step(flat_noise, timestep, flat_latents).prev_sample
    return flat_latents.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)

