"""GLIGEN grounding as a layout control (spec 6.1): a model-kwargs provider of the grounded UNet3D models."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from generation.loop import ControlBase, Step
from models.gligen import (GligenConfig, build_gligen_objects, count_grounded_steps, fuser_state_restored,
                           set_fusers_enabled)
from utils.layout import LayoutCondition

logger = logging.getLogger(__name__)


class GligenGrounding(ControlBase):
    """GLIGEN conditioning as a model-kwargs provider (spec 6.1): the CFG pass gets the layout's objects,
    ``(2 * B * F, max_objects, C)`` with the unconditional videos first; the fusers are on for the first
    ``int(beta * steps)`` steps (scheduled sampling) and their state is restored on exit."""

    def __init__(self, unet, objects: torch.Tensor, num_grounded_steps: int):
        self.unet = unet
        self.objects = objects
        self.num_grounded_steps = num_grounded_steps
        self._restore = None

    @classmethod
    def build(cls, model, prompts: Sequence[str], conditions: Sequence[LayoutCondition | None], num_frames: int,
              gligen: GligenConfig, num_steps: int) -> "GligenGrounding | None":
        per_video = [_video_gligen_objects(model, prompt, num_frames, condition, gligen)
                     for prompt, condition in zip(prompts, conditions)]
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
                          gligen: GligenConfig) -> torch.Tensor | None:
    """One video's ``(2 * F, max_objects, C)`` GLIGEN objects, or None (computed once per video: they
    depend only on the layout)."""
    if condition is None:
        logger.warning("prompt %r: GLIGEN is configured but no layout condition was given; generating without "
                       "GLIGEN objects", prompt)
        return None
    if condition.num_frames != num_frames:
        raise ValueError(f"prompt {condition.prompt!r}: the layout has boxes for {condition.num_frames} frames but "
                         f"{num_frames} frames are generated; build the condition with num_frames={num_frames}")
    return build_gligen_objects(model, condition.boxes_xyxy, condition.phrases, gligen.max_objects)
