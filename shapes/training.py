"""Training the shapes models from nothing, on a CPU (or a CUDA device): the VAE first, then the denoiser and
text encoder.

Every step's randomness (its videos, caption variants, timesteps and noise) is derived from (seed, stage,
step), so a run resumed from a checkpoint continues exactly where it stopped, and the same seed gives the
same model on the same machine. Checkpoints are written atomically every few steps. Data, noise and timesteps
are drawn on the CPU whatever the device, so a CUDA run draws the same batches as a CPU run (its sums differ in
the last bits, as between CPUs).

Denoiser objective: the epsilon loss of the model's DDPM schedule (ModelScope's scheduler config), with the
caption dropped for 10 % of the videos (classifier-free guidance) and, with weight
``attention_loss_weight``, an attention-localisation term on LVD's six guided cross-attention layers: for
each object token, ``-log`` of the share of its (pixel-normalised) attention that falls inside its box.
Large models learn where words go from scale; this term gives a small model trained for an hour the same
habit, which LVD's energy relies on. Set it to 0 to train without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from generation.energies import compute_box_masks
from models.attention import AttentionRecorder, recording_attention
from models.registry import (LVD_GUIDED_LAYERS, SHAPES_WAN_HEIGHT, SHAPES_WAN_NUM_FRAMES, SHAPES_WAN_TRAINED_LAYERS,
                             SHAPES_WAN_WIDTH)
from models.schedulers import MODELSCOPE_DDIM_SCHEDULER_CONFIG
from models.wan_attention import recording_wan_attention
from models.wan_model import wan_latent_num_frames
from models.wan_text import clean_prompt, compute_wan_token_positions, encode_wan_prompts
from shapes.world import NUM_FRAMES, sample_video, scene_boxes
from utils.io import atomic_path, atomic_write_json
from utils.layout import LayoutError, compute_token_positions

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a training run does; recorded in the model card."""

    seed: int = 0
    vae_steps: int = 500
    vae_batch_frames: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # Reconstruction error on object pixels counts (1 + this) times: objects cover a few percent of a frame, and
    # with plain MSE 300 steps left them brown blobs (the shapes detector named 1 of 24 reconstructions).
    vae_object_weight: float = 10.0
    vae_batch_videos: int = 2         # Wan: whole clips per VAE step (its VAE is a video VAE)
    steps: int = 3000                 # denoiser steps (a --max-minutes budget may stop earlier)
    # Anneal the learning rate over this much denoiser wall time instead of ``steps``, and stop there (or at
    # ``steps``, whichever comes first): a GPU's fixed budget; the steps done depend on the machine, and are recorded.
    denoiser_minutes: float | None = None
    batch_size: int = 4
    lr: float = 5e-4
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    lvd_suffix_probability: float = 0.5   # append ", <bg> background" as LVD's diffusion prompt does
    attention_loss_weight: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    # Min-SNR-gamma loss weighting (Hang et al., 2023) of the UNet's epsilon loss: each video's error times
    # min(SNR, gamma) / SNR, which lowers the nearly clean timesteps' share (0: uniform, the recipe).
    snr_gamma: float = 0.0


# Where the Wan family's recipe differs: the DiT takes a lower rate than the UNet. (Its VAE once took 2e-4: its
# decoder clamps to [-1, 1], and on the GPU run an early step at 1e-3 pushed the background past the clamp, where no
# gradient flows. Three CPU runs at 1e-3 never did, and 1e-3 for the same 700 steps doubled the VAE's ceiling on the
# shapes benchmark: docs/BENCHMARKS.md, "The Wan sibling, retrained with a faster VAE".)
FAMILY_RECIPES = {"unet3d": {}, "wan": {"lr": 3e-4}}


def train_config(family: str, **overrides) -> TrainConfig:
    """The family's recipe (`FAMILY_RECIPES` over `TrainConfig`'s defaults), then ``overrides`` (None: default)."""
    if family not in FAMILY_RECIPES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILY_RECIPES)}")
    values = {**FAMILY_RECIPES[family], **{k: v for k, v in overrides.items() if v is not None}}
    config = dataclasses.replace(TrainConfig(), **values)
    if family == "wan" and config.snr_gamma:
        raise ValueError(f"snr_gamma={config.snr_gamma:g}: min-SNR weighting is defined here for the UNet's epsilon "
                         "objective only; the Wan family trains by flow matching (leave it at 0)")
    return config


@dataclasses.dataclass
class TrainState:
    """Mutable progress of a run (what a checkpoint holds besides the weights)."""

    stage: str = "vae"                # "vae", "denoiser", "done"
    step: int = 0
    seconds: float = 0.0              # training wall time so far, over every resumed run
    denoiser_seconds: float = 0.0     # of which in the denoiser stage
    continued_from: str | None = None  # the exported folder an --init-from run started from (None: from nothing)
    losses: dict = dataclasses.field(default_factory=lambda: {"vae": [], "denoiser": []})


def _step_generator(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    stage_code = {"vae": 1, "denoiser": 2}[stage]
    mixed = np.random.SeedSequence([seed, stage_code, step])
    rng = np.random.default_rng(mixed)
    generator = torch.Generator().manual_seed(int(mixed.generate_state(1, dtype=np.uint64)[0] % (2 ** 63)))
    return rng, generator


@contextlib.contextmanager
def _step_global_rng(generator: torch.Generator):
    """Seed torch's global RNG (dropout draws from it) from the step's generator, and restore the caller's
    state after: a resumed run draws the same dropout masks as a run straight through."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator.initial_seed() ^ 0x5EED)
        yield


def _video_seed(seed: int, stage: str, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, {"vae": 1, "denoiser": 2}[stage], step, index]).generate_state(1)[0])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(folder: Path, components: dict, optimizers: dict, state: TrainState) -> None:
    payload = {
        "state": dataclasses.asdict(state),
        "models": {name: components[name].state_dict() for name in trained_names(components)},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        # Set on the VAE's config at the end of its stage, not in its weights: a run resumed in the denoiser stage
        # needs them back, or it trains on (and exports) the config's defaults.
        "latent_stats": {key: components["vae"].config[key] for key in LATENT_STATS if key in components["vae"].config},
    }
    with atomic_path(folder / CHECKPOINT_NAME) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(folder: Path, components: dict) -> tuple[TrainState, dict] | None:
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint is only ever replaced whole; anything else is a foreign file
        raise RuntimeError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    for name, weights in payload["models"].items():
        components[name].load_state_dict(weights)
    components["vae"].register_to_config(**payload.get("latent_stats", {}))
    return TrainState(**payload["state"]), payload["optimizers"]


def load_exported_model(folder: Path, components: dict) -> TrainState:
    """Start from an exported model folder (e.g. the shipped weights) instead of nothing: its weights (fp16
    copies are upcast) and the progress its ``training.json`` records, denoiser minutes included (so a
    ``--denoiser-minutes`` budget and its learning-rate schedule count the minutes already spent). The optimiser
    state is not exported, so a run continued this way is close to, not equal to, one continued from its checkpoint."""
    import json

    record_path = folder / "training.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} not found: --init-from expects a folder written by train_shapes.py")
    record = json.loads(record_path.read_text())
    loaded = {name: type(components[name]).from_pretrained(str(folder / name)) for name in trained_names(components)}
    for name, module in loaded.items():
        components[name].load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    components["vae"].register_to_config(**{key: loaded["vae"].config[key] for key in LATENT_STATS
                                            if key in loaded["vae"].config})
    done = record["steps_done"]
    vae_finished = done["vae"] >= record["config"]["vae_steps"]
    history = record.get("loss_history", {})
    return TrainState(stage="denoiser" if vae_finished else "vae", step=done["denoiser"] if vae_finished else 0,
                      seconds=60.0 * record["wall_time_minutes"],
                      denoiser_seconds=60.0 * record.get("denoiser_wall_time_minutes", 0.0),
                      continued_from=str(folder),
                      losses={"vae": list(history.get("vae", [])), "denoiser": list(history.get("denoiser", []))})


def trained_names(components: dict) -> tuple[str, ...]:
    """The trained modules of a family's components: its denoiser (``unet`` or ``transformer``), vae, text_encoder."""
    return ("transformer" if "transformer" in components else "unet", "vae", "text_encoder")


# The VAE config entries set from the trained encoder (UNet: SD's scaling_factor; Wan: per-channel statistics).
LATENT_STATS = ("scaling_factor", "latents_mean", "latents_std")


# --------------------------------------------------------------------------------------------
# VAE


def vae_step(vae, rng: np.random.Generator, generator: torch.Generator, config: TrainConfig,
             seed: int, step: int, draw: Callable = map) -> torch.Tensor:
    """One reconstruction + KL step on random frames of random videos; returns the loss. ``draw``: ``map`` or a
    process pool's (the videos depend on their seeds only, so the batch is the same)."""
    seeds = [_video_seed(seed, "vae", step, index) for index in range(config.vae_batch_frames)]
    frames = [video[int(rng.integers(len(video)))] for _, video in draw(sample_video, seeds)]
    images = frames_to_tensor(np.stack(frames)).to(vae.device)
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)
    reconstruction = vae.decode(latents).sample
    return (reconstruction_loss(reconstruction, images, config.vae_object_weight)
            + config.vae_kl_weight * posterior.kl().mean())


# A pixel belongs to an object when a channel is this far from its frame's median (in [-1, 1]: 32 grey levels; the
# beige texture moves 10).
OBJECT_THRESHOLD = 0.25


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Mean squared error with the pixels of objects weighted ``1 + object_weight``. Images (N, 3, H, W) or clips
    (B, 3, F, H, W), in [-1, 1]; the background of each frame is its per-channel median."""
    error = (reconstruction - target) ** 2
    if object_weight:
        background = target.flatten(-2).median(dim=-1).values[..., None, None]
        objects = ((target - background).abs().amax(dim=1, keepdim=True) > OBJECT_THRESHOLD).to(error.dtype)
        error = error * (1 + object_weight * objects)
    return error.mean()


@torch.no_grad()
def measure_latent_scale(vae, seed: int, num_videos: int = 16) -> float:
    """1 / std of the encoder's latents (the SD convention for ``scaling_factor``)."""
    videos = [frames_to_tensor(sample_video(_video_seed(seed, "vae", 2 ** 31, i))[1]) for i in range(num_videos)]
    latents = vae.encode(torch.cat(videos).to(vae.device)).latent_dist.mode()
    return float(1.0 / latents.std())


_wan_video = functools.partial(sample_video, height=SHAPES_WAN_HEIGHT, width=SHAPES_WAN_WIDTH,
                               num_frames=SHAPES_WAN_NUM_FRAMES)


def clips_to_tensor(videos) -> torch.Tensor:
    """[(F, H, W, 3) uint8] -> (B, 3, F, H, W) float in [-1, 1] (a video VAE's input)."""
    return torch.stack([frames_to_tensor(video).permute(1, 0, 2, 3) for video in videos])


def wan_vae_step(vae, rng: np.random.Generator, generator: torch.Generator, config: TrainConfig,
                 seed: int, step: int, draw: Callable = map) -> torch.Tensor:
    """One reconstruction + KL step of the Wan VAE on whole clips; returns the loss (``generator`` unused: no
    sampling)."""
    seeds = [_video_seed(seed, "vae", step, index) for index in range(config.vae_batch_videos)]
    clips = clips_to_tensor([video for _, video in draw(_wan_video, seeds)]).to(vae.device)
    posterior = vae.encode(clips).latent_dist
    # The posterior's mean, not a sample: the sample's unit noise drowned this small encoder's early latents (the
    # decoder learnt to ignore them); the denoiser trains on the mean anyway.
    reconstruction = vae.decode(posterior.mode()).sample
    return (reconstruction_loss(reconstruction, clips, config.vae_object_weight)
            + config.vae_kl_weight * posterior.kl().mean())


@torch.no_grad()
def measure_wan_latent_stats(vae, seed: int, num_videos: int = 16) -> dict:
    """Per-channel mean and std of the encoder's latents (Wan's ``latents_mean`` / ``latents_std``)."""
    clips = clips_to_tensor([_wan_video(_video_seed(seed, "vae", 2 ** 31, i))[1] for i in range(num_videos)])
    latents = torch.cat([vae.encode(clip[None].to(vae.device)).latent_dist.mode() for clip in clips])
    channels = latents.transpose(0, 1).flatten(1)
    return {"latents_mean": [round(float(v), 5) for v in channels.mean(1)],
            "latents_std": [round(float(v), 5) for v in channels.std(1)]}


def normalise_wan_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Encoder latents -> the denoiser's space, as `WanPipeline` un-normalises them in reverse."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
    return (latents - mean) / std


# --------------------------------------------------------------------------------------------
# Denoiser


def encode_unet_latents(vae, videos) -> torch.Tensor:
    """[(F, H, W, 3) uint8] -> (B, C, F, h, w): the encoder's mode, scaled, as the UNet takes it."""
    pixels = torch.cat([frames_to_tensor(video) for video in videos]).to(vae.device, vae.dtype)   # (B*F, 3, H, W)
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    return latents.unflatten(0, (len(videos), -1)).permute(0, 2, 1, 3, 4)


@dataclasses.dataclass(frozen=True)
class DenoiserBatch:
    latents: torch.Tensor              # (B, C, F, h, w), scaled
    prompts: tuple[str, ...]
    # Attention targets: (video index, token position, union box mask per map size (F, h*w)).
    targets: tuple[tuple[int, int, dict[int, torch.Tensor]], ...]


def build_denoiser_batch(vae, tokenizer, rng: np.random.Generator, config: TrainConfig, seed: int, step: int,
                         map_sizes: tuple[tuple[int, int], ...], draw: Callable = map, *,
                         family: str = "unet3d") -> DenoiserBatch:
    """Videos, prompts and attention targets of one step. ``family`` "unet3d": 64x64x16 videos, CLIP token
    positions, maps per frame; "wan": 64x64x17 videos, umT5 positions on the cleaned prompt, maps per latent
    frame (the boxes resampled to them, as LVD guides Wan)."""
    wan = family == "wan"
    map_frames = wan_latent_num_frames(SHAPES_WAN_NUM_FRAMES, vae.config.scale_factor_temporal) if wan else NUM_FRAMES
    videos, prompts, targets = [], [], []
    seeds = [_video_seed(seed, "denoiser", step, index) for index in range(config.batch_size)]
    for index, (scene, video) in enumerate(draw(_wan_video if wan else sample_video, seeds)):
        videos.append(video)
        if rng.random() < config.caption_dropout:
            prompts.append("")
            continue
        prompt = scene.caption
        if rng.random() < config.lvd_suffix_probability:
            prompt = f"{prompt}, {scene.background} background"
        prompts.append(prompt)
        phrases = [obj.phrase for obj in scene.objects]
        try:
            if wan:
                positions, _ = compute_wan_token_positions(clean_prompt(prompt), phrases, tokenizer)
            else:
                positions, _ = compute_token_positions(prompt, phrases, tokenizer)
        except LayoutError:  # not expected for world captions; train on the video without the term
            continue
        boxes = scene_boxes(scene, map_frames)
        by_token: dict[int, list[int]] = {}
        for object_index, span in enumerate(positions):
            for position in span:
                by_token.setdefault(position, []).append(object_index)
        for position, objects in by_token.items():
            masks = {}
            for height, width in map_sizes:
                per_object = compute_box_masks(boxes[objects], height, width).masks  # (objects, F, h*w)
                masks[height * width] = per_object.amax(dim=0)
            targets.append((index, position, masks))
    with torch.no_grad():
        if wan:
            latents = normalise_wan_latents(vae, vae.encode(clips_to_tensor(videos).to(vae.device)).latent_dist.mode())
        else:
            latents = encode_unet_latents(vae, videos)
    return DenoiserBatch(latents=latents.contiguous(), prompts=tuple(prompts), targets=tuple(targets))


def compute_attention_loss(maps: dict[str, torch.Tensor], targets, batch_size: int) -> torch.Tensor:
    """Mean over layers and targets of the mean over heads and frames with a box of ``-log`` (attention share
    inside the box); targets with no box in any frame are left out.

    ``maps[layer]``: (B*F, heads, h*w, tokens) cross-attention probabilities. All targets of a layer at once, with
    no host synchronisation (a per-target loop kept a GPU waiting on every target).
    """
    if not maps or not targets:
        return torch.zeros((), device=next(iter(maps.values())).device if maps else None)
    videos = torch.tensor([video for video, _, _ in targets])
    positions = torch.tensor([position for _, position, _ in targets])
    masks_by_size: dict[int, torch.Tensor] = {}
    total, count = 0.0, 0.0
    for probs in maps.values():
        per_video = probs.unflatten(0, (batch_size, -1))                         # (B, F, heads, N, tokens)
        size = per_video.shape[-2]
        if size not in masks_by_size:
            masks_by_size[size] = torch.stack([masks[size] for _, _, masks in targets]).to(probs.device)
        mask = masks_by_size[size]                                                # (K, F, N)
        attention = per_video[videos.to(probs.device), :, :, :, positions.to(probs.device)]   # (K, F, heads, N)
        share = attention / attention.sum(-1, keepdim=True).clamp_min(1e-8)
        inside = (share * mask[:, :, None, :]).sum(-1)                            # (K, F, heads)
        present = (mask.sum(-1) > 0).to(inside.dtype)                             # (K, F)
        frames = present.sum(1)                                                   # (K,)
        per_target = -(torch.log(inside + 1e-6) * present[..., None]).sum((1, 2)) / (frames * inside.shape[-1]).clamp_min(1)
        valid = (frames > 0).to(inside.dtype)
        total = total + (per_target * valid).sum()
        count = count + valid.sum()
    return total / torch.as_tensor(count).clamp_min(1)


def encode_prompts(text_encoder, tokenizer, prompts) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def denoiser_step(components: dict, noise_scheduler, rng: np.random.Generator, generator: torch.Generator,
                  config: TrainConfig, seed: int, step: int, draw: Callable = map) -> tuple[torch.Tensor, float, float]:
    """One epsilon-prediction step (+ the attention term); returns (total loss, epsilon loss, attention loss)."""
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    latent_size = unet.config.sample_size
    map_sizes = ((latent_size // 2, latent_size // 2), (latent_size // 4, latent_size // 4))
    batch = build_denoiser_batch(vae, tokenizer, rng, config, seed, step, map_sizes, draw)
    device = batch.latents.device
    noise = torch.randn(batch.latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(batch.latents, noise, timesteps)
    text = encode_prompts(text_encoder, tokenizer, batch.prompts)
    use_attention = config.attention_loss_weight > 0 and batch.targets
    recorder = AttentionRecorder(LVD_GUIDED_LAYERS, stop_when_complete=False)
    if use_attention:
        with recording_attention(unet, recorder):
            recorder.start()
            prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
            recorder.stop()
        attention_loss = compute_attention_loss(recorder.maps, batch.targets, config.batch_size)
    else:
        prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        attention_loss = torch.zeros((), device=device)
    epsilon_loss = F.mse_loss(prediction, noise)
    fitted = epsilon_loss
    if config.snr_gamma:
        alphas = noise_scheduler.alphas_cumprod.to(device)[timesteps]
        snr = alphas / (1 - alphas)
        per_video = (prediction - noise).square().flatten(1).mean(1)
        fitted = (snr.clamp(max=config.snr_gamma) / snr * per_video).mean()
    total = fitted + config.attention_loss_weight * attention_loss
    return total, float(epsilon_loss.detach()), float(attention_loss.detach())


def wan_denoiser_step(components: dict, rng: np.random.Generator, generator: torch.Generator, config: TrainConfig,
                      seed: int, step: int, draw: Callable = map) -> tuple[torch.Tensor, float, float]:
    """One flow-matching step of the Wan transformer (+ the attention term): ``x_s = (1 - s) x_0 + s e`` at
    ``s`` drawn uniformly and moved by the scheduler's flow shift (the sigmas it samples with), target
    ``e - x_0`` (UniPC's ``flow_prediction``); returns (total loss, flow loss, attention loss)."""
    transformer, vae, text_encoder, tokenizer = (components[k] for k in ("transformer", "vae", "text_encoder",
                                                                         "tokenizer"))
    patch_t, patch_h, patch_w = transformer.config.patch_size
    spatial = vae.config.scale_factor_spatial
    map_size = (SHAPES_WAN_HEIGHT // (spatial * patch_h), SHAPES_WAN_WIDTH // (spatial * patch_w))
    batch = build_denoiser_batch(vae, tokenizer, rng, config, seed, step, (map_size,), draw, family="wan")
    device = batch.latents.device
    noise = torch.randn(batch.latents.shape, generator=generator).to(device)
    shift = float(components["scheduler"].config.flow_shift)
    uniform = torch.rand(config.batch_size, generator=generator)
    sigmas = (shift * uniform / (1 + (shift - 1) * uniform)).to(device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * batch.latents + s * noise
    text = encode_wan_prompts(tokenizer, text_encoder, batch.prompts, device, torch.float32, grad=True)
    use_attention = config.attention_loss_weight > 0 and batch.targets
    recorder = AttentionRecorder(SHAPES_WAN_TRAINED_LAYERS if use_attention else (), stop_when_complete=False)

    def predict():
        return transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=text,
                           return_dict=False)[0]

    if use_attention:
        with recording_wan_attention(transformer, recorder) as state:
            state.trainable_text = True
            state.grid = (batch.latents.shape[2] // patch_t, *map_size)
            recorder.start()
            prediction = predict()
            recorder.stop()
        attention_loss = compute_attention_loss(recorder.maps, batch.targets, config.batch_size)
    else:
        prediction = predict()
        attention_loss = torch.zeros((), device=device)
    flow_loss = F.mse_loss(prediction, noise - batch.latents)
    total = flow_loss + config.attention_loss_weight * attention_loss
    return total, float(flow_loss.detach()), float(attention_loss.detach())


@functools.lru_cache(maxsize=1)
def _ddpm_scheduler():
    """The UNet's training noise schedule (ModelScope's DDPM config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(MODELSCOPE_DDIM_SCHEDULER_CONFIG))


def learning_rate(config: TrainConfig, step: int, base: float, denoiser_seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over ``config.steps`` (or ``config.denoiser_minutes``)."""
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.denoiser_minutes is not None:
        progress = min(1.0, denoiser_seconds / (60 * config.denoiser_minutes))
    else:
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_shapes_model(components: dict, config: TrainConfig, checkpoint_dir: Path, *,
                       max_seconds: float | None = None, progress: Callable | None = None,
                       init_from: Path | None = None, stop_after_step: int | None = None,
                       device: str | torch.device = "cpu", workers: int = 0) -> TrainState:
    """Train (or resume) the VAE then the denoiser + text encoder in place; returns the final state. The family
    follows the components (`models.shapes`): a ``unet`` (epsilon, DDPM) or a Wan ``transformer`` (flow matching).

    ``progress(stage, step, total, loss_text)`` is called after every step (the CLI's tqdm). Without a
    checkpoint, ``init_from`` starts from an exported folder (`load_exported_model`) instead of nothing.
    Stops after the first step past ``max_seconds`` of this call (checkpointed, resumable), once the denoiser
    has made ``stop_after_step`` steps (a partly trained export, at the same learning-rate schedule), or when done.
    The models train on ``device`` and are back on the CPU when it returns; ``workers`` processes draw the
    videos (0: this process; same batches either way), which keeps a GPU fed.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    denoiser = trained_names(components)[0]
    for name in trained_names(components):
        components[name].to(device)  # in place: the optimisers below hold these parameters
    vae_opt = torch.optim.AdamW(components["vae"].parameters(), lr=config.vae_lr, weight_decay=0.0)
    denoiser_params = list(components[denoiser].parameters()) + list(components["text_encoder"].parameters())
    denoiser_opt = torch.optim.AdamW(denoiser_params, lr=config.lr, weight_decay=0.0)
    optimizers = {"vae": vae_opt, "denoiser": denoiser_opt}
    state = TrainState()
    loaded = load_checkpoint(checkpoint_dir, components)
    if loaded is None and init_from is not None:
        state = load_exported_model(init_from, components)
        logger.info("starting from %s: stage %s, step %d", init_from, state.stage, state.step)
    if loaded is not None:
        state, optimizer_states = loaded
        for name, opt in optimizers.items():
            opt.load_state_dict(optimizer_states[name])
        logger.info("resumed from %s: stage %s, step %d", checkpoint_dir / CHECKPOINT_NAME, state.stage, state.step)
    with contextlib.ExitStack() as stack:
        draw = map
        if workers > 0:
            import multiprocessing

            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            draw = pool.map
        _train_loop(components, config, checkpoint_dir, optimizers, state, draw, max_seconds, progress,
                    stop_after_step)
    for name in trained_names(components):
        components[name].eval().to("cpu")
    return state


def _train_loop(components, config, checkpoint_dir, optimizers, state, draw, max_seconds, progress,
                stop_after_step) -> None:
    wan = "transformer" in components
    denoiser = trained_names(components)[0]
    vae_opt, denoiser_opt = optimizers["vae"], optimizers["denoiser"]
    denoiser_params = [p for group in denoiser_opt.param_groups for p in group["params"]]
    started = time.monotonic()
    last_tick = started

    def tick(stage: str) -> None:
        nonlocal last_tick
        now = time.monotonic()
        state.seconds += now - last_tick
        if stage == "denoiser":
            state.denoiser_seconds += now - last_tick
        last_tick = now

    def denoiser_finished() -> bool:
        spent = config.denoiser_minutes is not None and state.denoiser_seconds >= 60 * config.denoiser_minutes
        return spent or state.step >= config.steps

    def stopped_at_step() -> bool:
        return stop_after_step is not None and state.stage == "denoiser" and state.step >= stop_after_step

    while state.stage != "done" and not stopped_at_step():
        stage = state.stage
        if stage == "vae":
            vae = components["vae"].train()
            rng, generator = _step_generator(config.seed, "vae", state.step)
            for group in vae_opt.param_groups:
                group["lr"] = config.vae_lr
            with _step_global_rng(generator):
                loss = (wan_vae_step if wan else vae_step)(vae, rng, generator, config, config.seed, state.step, draw)
                vae_opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            vae_opt.step()
            state.losses["vae"].append(float(loss.detach()))
            state.step += 1
            if progress:
                progress("vae", state.step, config.vae_steps, f"recon {state.losses['vae'][-1]:.4f}")
            if state.step >= config.vae_steps:
                vae.eval()
                vae.register_to_config(**(measure_wan_latent_stats(vae, config.seed) if wan else
                                          {"scaling_factor": measure_latent_scale(vae, config.seed)}))
                state.stage, state.step = "denoiser", 0
        else:
            components["vae"].eval().requires_grad_(False)
            components[denoiser].train()
            components["text_encoder"].train()
            rng, generator = _step_generator(config.seed, "denoiser", state.step)
            for group in denoiser_opt.param_groups:
                group["lr"] = learning_rate(config, state.step, config.lr, state.denoiser_seconds)
            with _step_global_rng(generator):
                if wan:
                    total, eps, attention = wan_denoiser_step(components, rng, generator, config, config.seed,
                                                              state.step, draw)
                else:
                    total, eps, attention = denoiser_step(components, _ddpm_scheduler(), rng, generator, config,
                                                          config.seed, state.step, draw)
                denoiser_opt.zero_grad(set_to_none=True)
                total.backward()
            torch.nn.utils.clip_grad_norm_(denoiser_params, config.grad_clip)
            denoiser_opt.step()
            state.losses["denoiser"].append([eps, attention])
            state.step += 1
            if progress:
                progress("denoiser", state.step, config.steps, f"eps {eps:.4f} attn {attention:.3f}")
            tick(stage)
            if denoiser_finished():
                state.stage = "done"
        tick(stage)
        if state.step % config.checkpoint_every == 0 or state.stage == "done":
            save_checkpoint(checkpoint_dir, components, optimizers, state)
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break  # after at least one step, so every call makes progress
    tick(state.stage)
    save_checkpoint(checkpoint_dir, components, optimizers, state)


HELD_OUT_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


@torch.no_grad()
def held_out_epsilon_loss(components: dict, *, num_videos: int = 32, batch_size: int = 4,
                          timesteps: tuple[int, ...] = HELD_OUT_TIMESTEPS, seed: int = 123) -> dict[int, float]:
    """A UNet's epsilon loss on videos no training run draws (world seeds from 10**9), per timestep, with the
    same noise for every model: paired and far less noisy than sampled-video measures, so two recipes' fits
    compare on a few dozen videos. Uses the components' ``unet``, ``vae``, ``text_encoder`` and ``tokenizer``
    (captions without the background suffix)."""
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    scheduler = _ddpm_scheduler()
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(timesteps, 0.0)
    batches = math.ceil(num_videos / batch_size)
    for batch in range(batches):
        drawn = [sample_video(10 ** 9 + batch * batch_size + i) for i in range(batch_size)]
        latents = encode_unet_latents(vae, [video for _, video in drawn]).to(unet.dtype)
        text = encode_prompts(text_encoder, tokenizer, [scene.caption for scene, _ in drawn])
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            steps = torch.full((batch_size,), t, device=latents.device)
            prediction = unet(scheduler.add_noise(latents, noise, steps), steps, encoder_hidden_states=text).sample
            sums[t] += float((prediction.float() - noise.float()).square().mean())
    return {t: total / batches for t, total in sums.items()}


# --------------------------------------------------------------------------------------------
# Model card and loss curve


def draw_loss_curve(path: Path, losses: dict) -> None:
    """A PNG of the (smoothed) losses per stage, drawn with PIL."""
    from PIL import Image, ImageDraw

    series = {"vae recon": [v for v in losses.get("vae", [])],
              "denoiser eps": [v[0] for v in losses.get("denoiser", [])],
              "attention": [v[1] for v in losses.get("denoiser", [])]}
    width, height, pad = 640, 200, 30
    image = Image.new("RGB", (width, height * len(series)), "white")
    draw = ImageDraw.Draw(image)
    for row, (name, values) in enumerate(series.items()):
        top = row * height
        draw.text((pad, top + 4), f"{name} ({len(values)} steps)", fill="black")
        if len(values) < 2:
            continue
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        low, high = float(np.min(smooth)), float(np.max(smooth))
        span = high - low or 1.0
        xs = pad + np.arange(len(smooth)) * (width - 2 * pad) / max(1, len(smooth) - 1)
        ys = top + height - pad - (smooth - low) / span * (height - 2 * pad)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(200, 40, 40), width=2)
        draw.text((pad, top + 18), f"max {high:.4f}  min {low:.4f}  last {smooth[-1]:.4f}", fill=(90, 90, 90))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _planned(config: TrainConfig) -> str:
    if config.denoiser_minutes is None:
        return str(config.steps)
    return f"a {config.denoiser_minutes:g}-minute denoiser budget"


_CLI_OPTIONS = {"seed": "--seed", "steps": "--steps", "vae_steps": "--vae-steps", "batch_size": "--batch-size",
                "attention_loss_weight": "--attention-loss-weight", "lr": "--lr", "vae_lr": "--vae-lr",
                "denoiser_minutes": "--denoiser-minutes", "checkpoint_every": "--checkpoint-every",
                "snr_gamma": "--snr-gamma"}


def training_command(family: str, config: TrainConfig, threads: int) -> str:
    """The `train_shapes.py` command line that trains ``config`` from nothing (options that differ from the recipe)."""
    recipe = train_config(family)
    words = ["python scripts/train_shapes.py", f"--family {family}"]
    words += [f"{option} {getattr(config, field):g}" for field, option in _CLI_OPTIONS.items()
              if getattr(config, field) != getattr(recipe, field)]
    if threads != 1:
        words.append(f"--threads {threads}")
    return " ".join(words)


def write_model_card(folder: Path, *, family: str, config: TrainConfig, state: TrainState, num_parameters: dict,
                     device: str, threads: int) -> None:
    denoiser = state.losses.get("denoiser", [])
    tail = denoiser[-50:]
    final_eps = float(np.mean([v[0] for v in tail])) if tail else float("nan")
    final_attention = float(np.mean([v[1] for v in tail])) if tail else float("nan")
    size = "64x64, 17 frames" if family == "wan" else "64x64, 16 frames"
    record = {
        "family": family,
        "data": f"shapes.world.sample_video(seed) for seeds derived from (seed, stage, step, index): {size}, "
                "shapes {circle, square, triangle} x colours {red, green, blue, yellow}, 1-4 objects, "
                "backgrounds {white, black, gray, beige}, the five LVD tasks uniformly",
        "config": dataclasses.asdict(config),
        "steps_done": {"vae": len(state.losses.get("vae", [])), "denoiser": len(denoiser)},
        "wall_time_minutes": round(state.seconds / 60, 1),
        "denoiser_wall_time_minutes": round(state.denoiser_seconds / 60, 1),
        "continued_from": state.continued_from,
        "device": device,
        "threads": threads,
        "final_loss_epsilon_last50": round(final_eps, 5),
        "final_loss_attention_last50": round(final_attention, 4),
        "parameters": num_parameters,
        "loss_history": {"vae": [round(v, 6) for v in state.losses.get("vae", [])],
                         "denoiser": [[round(a, 6), round(b, 5)] for a, b in denoiser]},
    }
    atomic_write_json(folder / "training.json", record)
    lines = [
        f"# LVD-Shapes ({family})",
        "",
        (f"A small text-to-video model trained from nothing by `{training_command(family, config, threads)}` "
         "on the procedural shapes world (`shapes/world.py`)." if state.continued_from is None else
         f"A small text-to-video model continued from `{state.continued_from}` (its weights and recorded progress; "
         f"the optimiser state started afresh) by `{training_command(family, config, threads)} --init-from "
         f"{state.continued_from}` on the procedural shapes world (`shapes/world.py`); the steps, times and losses "
         "below count the earlier training too."),
        "",
        f"- Data: {record['data']}.",
        f"- Steps: VAE {record['steps_done']['vae']}, denoiser {record['steps_done']['denoiser']} "
        f"(batch {config.batch_size} videos).",
        f"- Wall time: {record['wall_time_minutes']} min on {device} ({threads} thread(s)).",
        f"- Final losses (mean of the last 50 steps): {'flow matching' if family == 'wan' else 'epsilon'} "
        f"{record['final_loss_epsilon_last50']}, "
        f"attention localisation {record['final_loss_attention_last50']} "
        f"(weight {config.attention_loss_weight}).",
        f"- Parameters: {', '.join(f'{k} {v / 1e6:.2f} M' for k, v in num_parameters.items())}.",
        "- Loss curve: `loss_curve.png`; full record: `training.json`.",
        "",
    ]
    if state.stage != "done":
        lines[-1:-1] = [
            f"- **Partial**: exported at {state.stage} step {state.step} of {_planned(config)} (`--export-partial`). "
            "Continue with the same command (from its checkpoint) or with `--init-from` this folder.", ""]
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text("\n".join(lines))
