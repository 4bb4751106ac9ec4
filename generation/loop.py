"""The denoising loop, shared by every backbone and method (k-diffusion's shape: the loop knows nothing
of guidance; guidance wraps it through hooks).

Each step, in this order:
1. every model-kwargs provider gives its keyword arguments for this step's model call (GLIGEN: the
   grounding inputs, fusers on or off by scheduled sampling);
2. every ``before_step`` hook may move the latents (LVD: energy guidance on the cross-attention maps);
3. the backbone's classifier-free guided model call and scheduler step, without gradients;
4. the progress callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from generation.backbones.base import Backbone, TextConditioning

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass(frozen=True)
class Step:
    """Where the loop is: the 0-based step index, its timestep and the number of steps."""

    index: int
    timestep: torch.Tensor
    num_steps: int


class StepHook(Protocol):
    def before_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """The latents the step's model call sees (return them unchanged to do nothing)."""


class ModelKwargsProvider(Protocol):
    def model_kwargs(self, step: Step) -> dict | None:
        """Keyword arguments for this step's model call, or None."""


def denoise(backbone: Backbone, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, text: TextConditioning,
            guidance_scale: float, *, hooks: Sequence[StepHook] = (),
            kwargs_providers: Sequence[ModelKwargsProvider] = (),
            step_callback: StepCallback | None = None) -> torch.Tensor:
    """Run ``timesteps`` of ``scheduler`` from ``latents``; returns the final latents."""
    for index, timestep in enumerate(timesteps):
        step = Step(index, timestep, len(timesteps))
        model_kwargs: dict = {}
        for provider in kwargs_providers:
            model_kwargs.update(provider.model_kwargs(step) or {})
        for hook in hooks:
            latents = hook.before_step(step, latents)
        with torch.no_grad():
            output = backbone.predict(scheduler, latents, timestep, text, guidance_scale, model_kwargs or None)
            latents = backbone.step(scheduler, output, timestep, latents)
        if step_callback is not None:
            step_callback(index, len(timesteps))
    return latents
