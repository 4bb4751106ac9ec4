"""Classifier-free guidance as one wrapper around a backbone's two predictions, with one rule.

The interface is diffusers' ``guiders`` one (``diffusers.guiders.ClassifierFreeGuidance``): ``num_conditions``
says how many predictions the step needs (1: the conditional one only, 2: also the unconditional one),
``forward(pred_cond, pred_uncond)`` combines them into a ``GuiderOutput``. `Backbone.predict` asks the
guider, runs the branches the backbone's own way (UNet3D: one call on ``[uncond; cond]``, Wan: two calls)
and hands them over, so a CFG variant is another guider (e.g. diffusers' ``ClassifierFreeZeroStarGuidance``
or ``TangentialClassifierFreeGuidance``, passed as they are), never an edit of a backbone.

The rule: the unconditional pass runs when a negative prompt is encoded, unless the backbone reproduces a
pipeline that skips it at ``guidance_scale <= 1`` (``WanPipeline``: ``do_classifier_free_guidance = scale >
1``); the reference's UNet3D pipeline never skips it. The combination is ``uncond + scale * (cond - uncond)``
(diffusers' formula and operation order, so outputs are bit-identical to the backbones' former inline CFG).

Variants, chosen by `SamplingConfig.cfg_variant` / ``--cfg`` (``standard``: the above, the default) and
``--cfg-rescale``:

- ``zero-star`` (CFG-Zero*, Fan et al. 2025, its optimised scale): the unconditional prediction is first
  projected on the conditional one, ``s* = <x_cond, x_uncond> / ||x_uncond||^2`` per video, and
  ``x = s* x_uncond + s (x_cond - s* x_uncond)``. (The paper's zero-init of the first steps is not applied.)
- ``guidance_rescale`` ``phi`` (Lin et al. 2023, "Common diffusion noise schedules ...", eq. 15-16): ``x`` is
  rescaled to the standard deviation of ``x_cond``, ``x <- phi x std(x_cond)/std(x) + (1 - phi) x``.
"""
from __future__ import annotations

from dataclasses import dataclass


import torch
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

from generation.config import CFG_STANDARD, CFG_VARIANTS, CFG_ZERO_STAR  # noqa: F401 (re-exported)


@dataclass
class ClassifierFreeGuidance:
    """``x = x_uncond + s (x_cond - x_uncond)`` (Ho & Salimans 2022, diffusers' formulation), optionally
    rescaled (``guidance_rescale``, Lin et al. 2023), with the backbone's rule for skipping the
    unconditional pass."""

    guidance_scale: float
    skip_at_or_below_one: bool = False   # the pipeline's rule (WanPipeline: True; the LVD UNet3D pipeline: False)
    guidance_rescale: float = 0.0
    enabled: bool = True
    zero_star: bool = False              # CFG-Zero*'s optimised scale on the unconditional prediction

    @property
    def num_conditions(self) -> int:
        skipped = not self.enabled or (self.skip_at_or_below_one and self.guidance_scale <= 1.0)
        return 1 if skipped else 2

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None or self.num_conditions == 1:
            pred = pred_cond
        else:
            if self.zero_star:
                pred_uncond = pred_uncond * zero_star_scale(pred_cond, pred_uncond)
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


def zero_star_scale(pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s ``s* = <x_cond, x_uncond> / ||x_uncond||^2``, one per video (diffusers' own function on the
    flattened predictions), shaped to broadcast."""
    scale = cfg_zero_star_scale(pred_cond.flatten(1), pred_uncond.flatten(1))
    return scale.view(-1, *[1] * (pred_uncond.dim() - 1))
