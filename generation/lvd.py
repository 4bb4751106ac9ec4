"""LVD's layout guidance as a hook of the denoising loop (spec 4).

Before the model call of each of the first ``max_index_step`` steps, :class:`LayoutGuidance` moves the
latents of every guided video down the box energy of its conditional branch's cross-attention maps:
up to ``max_iter`` calls of `generation.guidance.guidance_step`, each a forward pass with the recorder on
(`Backbone.recorded_forward`), the energy of :func:`make_layout_energy_fn`, its gradient and the update.
Each video of a batch keeps its own targets, token columns and stopping state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from generation.backbones.base import Backbone
from generation.config import ExecutionConfig, GuidanceConfig
from generation.energies import EnergyWeights, GuidanceTargets, compute_guidance_energy, prepare_guidance_targets
from generation.guidance import GuidanceRecord, GuidanceSchedule, guide_batch
from generation.loop import Step
from models.attention import AttentionRecorder
from utils.layout import LayoutCondition

logger = logging.getLogger(__name__)


@dataclass
class GuidedVideo:
    """One guided video of a batch: its stopping state, its energy targets and where its tokens sit
    among the recorded columns."""

    schedule: GuidanceSchedule
    targets: GuidanceTargets
    columns: torch.Tensor  # (J,) positions of this video's tokens among the recorded columns


def make_layout_energy_fn(backbone: Backbone, recorder: AttentionRecorder, cond: torch.Tensor,
                          timestep: torch.Tensor, videos: Sequence[GuidedVideo | None], weights: EnergyWeights,
                          num_map_frames: int, low_memory: bool = False
                          ) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """The guided energy: ``energy_fn(latents (A, ...), active video indices) -> (A,)`` energies L.

    ``cond``: (B, tokens, D) conditional text embeddings of the whole batch; a guided pass sees only the
    active videos' (spec 4.7: the conditional branch, no negative prompt, no GLIGEN objects).
    """
    def energy_fn(latents: torch.Tensor, active: list[int]) -> torch.Tensor:
        maps = backbone.recorded_forward(latents, timestep, cond[active], recorder, low_memory)
        energies = []
        for position, video in enumerate(active):
            state = videos[video]
            frames = slice(position * num_map_frames, (position + 1) * num_map_frames)  # batch-major rows
            video_maps = {name: m[frames].index_select(-1, state.columns) for name, m in maps.items()}
            energies.append(compute_guidance_energy(video_maps, state.targets, weights))
        return torch.stack(energies)

    return energy_fn


class LayoutGuidance:
    """The LVD control: a ``before_step`` that guides, and a lifetime that installs the recorder."""

    def __init__(self, backbone: Backbone, videos: Sequence[GuidedVideo | None], cond: torch.Tensor,
                 config: GuidanceConfig, execution: ExecutionConfig, step_sizes: torch.Tensor, num_map_frames: int):
        self.backbone = backbone
        self.videos = list(videos)
        self.cond = cond
        self.config = config
        self.execution = execution
        self.step_sizes = step_sizes
        self.num_map_frames = num_map_frames
        recorded = self._recorded_columns()
        for video in self.videos:
            if video is not None:
                video.columns = torch.tensor([recorded.index(int(i)) for i in video.targets.token_indices],
                                             device=backbone.device)
        self.recorder = AttentionRecorder(
            config.guided_layers,
            token_indices=torch.tensor(recorded, device=backbone.device) if execution.record_object_tokens_only
            else None,
            stop_when_complete=execution.stop_after_last_guided_layer)
        self._weights = config.energy_weights()
        self._recording = None

    def _recorded_columns(self) -> list[int]:
        if self.execution.record_object_tokens_only:
            return sorted({int(i) for video in self.videos if video for i in video.targets.token_indices})
        return list(range(self.cond.shape[1]))

    @property
    def schedules(self) -> list[GuidanceSchedule | None]:
        return [video.schedule if video else None for video in self.videos]

    def video_logs(self) -> list[list[GuidanceRecord]]:
        return [list(schedule.log) if schedule else [] for schedule in self.schedules]

    def __enter__(self) -> "LayoutGuidance":
        self._recording = self.backbone.recording(self.recorder)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._recording.__exit__(*exc_info)
        self._recording = None

    def before_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        if step.index >= self.config.max_index_step:
            return latents
        energy_fn = make_layout_energy_fn(self.backbone, self.recorder, self.cond, step.timestep, self.videos,
                                          self._weights, self.num_map_frames, self.execution.low_memory)
        return guide_batch(self.schedules, latents, step.index, int(step.timestep), energy_fn,
                           self.step_sizes[step.index], self.config.loss_scale)


def prepare_guided_video(backbone: Backbone, prompt: str, condition: LayoutCondition | None,
                         config: GuidanceConfig, num_frames: int, height: int, width: int,
                         num_tokens: int) -> GuidedVideo | None:
    """One video's guidance state, or None when it is not guided (with a warning where that is surprising)."""
    if condition is None:
        logger.warning("prompt %r: guidance is configured but no layout condition was given; "
                       "generating without guidance", prompt)
        return None
    if not condition.phrases:
        logger.warning("prompt %r: the layout has no objects; generating without guidance", prompt)
        return None
    if config.max_index_step <= 0:
        return None
    check_condition(condition, num_frames, num_tokens)
    boxes = condition.boxes_at(backbone.guided_num_frames(num_frames))
    targets = prepare_guidance_targets(boxes, condition.token_positions, backbone.attention_map_sizes(height, width),
                                       backbone.device)
    return GuidedVideo(schedule=GuidanceSchedule(config), targets=targets, columns=targets.token_indices)


def check_condition(condition: LayoutCondition, num_frames: int, num_tokens: int) -> None:
    """Guidance needs token positions inside the text embedding and one box per generated frame; say so
    instead of failing deep inside the energy (the reference has no such guard, spec 15.9)."""
    if condition.token_positions is None:
        raise ValueError(f"prompt {condition.prompt!r}: guidance needs the objects' token positions; build "
                         "the condition with the backbone (backbone.build_condition(layout, num_frames))")
    boxes_frames = condition.boxes_xyxy.shape[1]
    if boxes_frames != num_frames:
        raise ValueError(f"prompt {condition.prompt!r}: the layout has boxes for {boxes_frames} frames but "
                         f"{num_frames} frames are generated; build the condition with num_frames={num_frames}")
    for phrase, positions in zip(condition.phrases, condition.token_positions):
        if any(position >= num_tokens for position in positions):
            raise ValueError(f"prompt {condition.prompt!r}: object {phrase!r} has token positions "
                             f"{list(positions)}, past the {num_tokens}-token text embedding (the prompt is "
                             "truncated there); shorten the prompt or the phrase suffixes")


def build_layout_guidance(backbone: Backbone, prompts: Sequence[str], conditions: Sequence[LayoutCondition | None],
                          cond: torch.Tensor, config: GuidanceConfig, execution: ExecutionConfig, scheduler,
                          timesteps: torch.Tensor, num_frames: int, height: int, width: int) -> LayoutGuidance | None:
    """The hook for a batch, or None when no video of it is guided."""
    videos = [prepare_guided_video(backbone, prompt, condition, config, num_frames, height, width, cond.shape[1])
              for prompt, condition in zip(prompts, conditions)]
    if not any(videos):
        return None
    backbone.check_guided_layers(config.guided_layers)
    return LayoutGuidance(backbone, videos, cond, config, execution, backbone.guidance_step_sizes(scheduler, timesteps),
                          backbone.guided_num_frames(num_frames))
