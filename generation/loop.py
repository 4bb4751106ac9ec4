"""The denoising loop, shared by every backbone and method (k-diffusion's shape: the loop knows nothing
of guidance; guidance wraps it through hooks).

Each step, in this order:
1. every control with ``model_kwargs`` gives its keyword arguments for this step's model call (GLIGEN: the
   grounding inputs, fusers on or off by scheduled sampling);
2. every control with ``before_step`` may move the latents (LVD: energy guidance on the cross-attention
   maps; attention masking / modulation: note the step their processors act on);
3. the backbone's classifier-free guided model call and scheduler step, without gradients;
4. the progress callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from generation.backbones.base import Backbone, TextConditioning

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass(frozen=True)
class Step:
    """Where the loop is: the 0-based step index, its timestep and the number of steps."""

    index: int
    timestep: torch.Tensor
    num_steps: int


class Control(Protocol):
    """A plug-in of a run (a layout control, a probe). Its lifetime is the run: the caller enters it before the
    first step and exits it after the last, whatever happens (that is where a control installs and restores
    attention processors or model state). Everything else is optional: a control has any of

    - ``before_step(step, latents) -> latents``: may move the latents before the step's model call
      (LVD's energy guidance);
    - ``model_kwargs(step) -> dict | None``: keyword arguments of the step's model call (GLIGEN's objects);
    - ``video_logs() -> list`` (one list of `generation.guidance.GuidanceRecord` per video of the batch).

    :class:`ControlBase` gives the no-op defaults.
    """

    def __enter__(self): ...

    def __exit__(self, *exc_info): ...


class ControlBase:
    """No-op defaults of the control protocol (`generation.loop.Control`)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def before_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def model_kwargs(self, step: Step) -> dict | None:
        return None

    def video_logs(self) -> list[list] | None:
        """One list of guidance records per video of the batch, or None (nothing to log)."""
        return None


@dataclass(frozen=True)
class BatchContext:
    """What a builder may use: the batch's backbone and model, prompts, layout conditions (None: a bare
    prompt), encoded text, scheduler and timesteps, and the run's sampling / execution configs."""

    model: Any
    backbone: Backbone
    prompts: tuple[str, ...]
    conditions: tuple[Any, ...]
    text: TextConditioning
    scheduler: Any
    timesteps: torch.Tensor
    sampling: Any
    execution: Any


def denoise(backbone: Backbone, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, text: TextConditioning,
            guidance, *, controls: Sequence[Control] = (), step_callback: StepCallback | None = None) -> torch.Tensor:
    """Run ``timesteps`` of ``scheduler`` from ``latents``; returns the final latents.

    ``guidance``: the CFG scale, or a guider with diffusers' interface (`generation.cfg`). ``controls`` must
    already be entered (their lifetime is the caller's).
    """
    providers = [control for control in controls if hasattr(control, "model_kwargs")]
    hooks = [control for control in controls if hasattr(control, "before_step")]
    for index, timestep in enumerate(timesteps):
        step = Step(index, timestep, len(timesteps))
        model_kwargs: dict = {}
        for provider in providers:
            model_kwargs.update(provider.model_kwargs(step) or {})
        for hook in hooks:
            latents = hook.before_step(step, latents)
        with torch.no_grad():
            output = backbone.predict(scheduler, latents, timestep, text, guidance, model_kwargs or None)
            latents = backbone.step(scheduler, output, timestep, latents)
        if step_callback is not None:
            step_callback(index, len(timesteps))
    return latents
