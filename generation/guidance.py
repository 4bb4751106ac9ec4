"""Latent guidance: one gradient step on an energy, and the reference's schedule around it (spec 4.5).

:func:`guidance_step` is the whole method: forward with grad, energy, gradient with respect to the
latents, update ``x <- x - step_size * loss_scale * dE/dx``. :class:`GuidanceSchedule` holds one
video's stopping rule: guide for the first ``max_index_step`` denoising steps, up to ``max_iter`` times,
while the energy is above the threshold (the reference compares the energy carried from the previous
iteration and stops for good once it is below; ``stop_rule="per-step"`` recomputes it at every step
instead, spec 15.2). :func:`guide_batch` runs the iterations of one denoising step for a batch of
videos, each with its own schedule.

``loss_scale`` is applied once, in the update: the schedule and the log work with the energy itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from generation.config import INITIAL_LOSS, STOP_CARRIED, GuidanceConfig


class GuidanceError(RuntimeError):
    """The guidance energy is not finite."""


@dataclass(frozen=True)
class GuidanceRecord:
    step: int          # denoising step index (0-based)
    iteration: int     # guidance iteration within the step
    timestep: int
    energy: float      # L, before the update this iteration makes
    loss: float        # loss_scale * L, the reference's "loss"


def compute_step_sizes(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(steps,) float32 guidance step sizes ``sqrt(1 - alpha_bar_t)``, one per timestep (spec 4.5).

    Computed once per video on the CPU, so the loop never indexes the CPU table with a device timestep.
    """
    return torch.sqrt(1 - alphas_cumprod.to(torch.float32)[timesteps.cpu().long()])


def guidance_step(latents: torch.Tensor, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                  step_size: torch.Tensor | float, scale: float = 1.0,
                  update_if: Callable[[torch.Tensor], bool | torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents - step_size * d(scale * energy_fn(latents)) / d latents``; returns (new latents, energy).

    ``energy_fn`` returns a scalar, or one energy per video of a batch ``(B,)`` (videos are independent,
    so the gradient of the sum is each video's own gradient). ``update_if(energy)`` may veto the update
    after seeing the energy, for all videos (a bool) or per video (a ``(B,)`` bool tensor); vetoed
    latents are returned as they were. The energy is computed once either way.
    """
    leaf = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = energy_fn(leaf)
        update = torch.as_tensor(True if update_if is None else update_if(energy.detach()))
        if not bool(update.any()):
            return latents, energy.detach()
        (gradient,) = torch.autograd.grad((scale * energy).sum(), leaf)
    if update.ndim:  # per-video veto: a zero gradient leaves those latents exactly as they were
        gradient = gradient * update.to(gradient.device, gradient.dtype).view(-1, *[1] * (gradient.ndim - 1))
    return leaf.detach() - step_size * gradient, energy.detach()


@dataclass
class GuidanceSchedule:
    """One video's guidance state across denoising steps: the carried energy and the log.

    :meth:`wants_iteration` (before an iteration) and :meth:`record` (after its energy is known) hold
    the whole stopping rule; :func:`guide_batch` only loops over them.
    """

    config: GuidanceConfig
    carried_energy: float | None = None   # None: the sentinel, INITIAL_LOSS / loss_scale
    log: list[GuidanceRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.carried_energy is None:
            self.carried_energy = INITIAL_LOSS / self.config.loss_scale

    def wants_iteration(self, step_index: int, iteration: int) -> bool:
        """Whether guided iteration ``iteration`` of step ``step_index`` runs (before seeing its energy)."""
        if step_index >= self.config.max_index_step or iteration >= self.config.iterations_at(step_index):
            return False
        # The reference tests the energy carried from the previous iteration (or step); the per-step
        # rule decides after computing the fresh energy, in :meth:`record`.
        return self.config.stop_rule != STOP_CARRIED or self._above_threshold()

    def record(self, energy: torch.Tensor | float, step_index: int, iteration: int, timestep: int) -> bool:
        """Log an iteration's energy; returns whether the latents are updated with its gradient."""
        value = float(energy)
        if not math.isfinite(value):
            raise GuidanceError(f"the guidance energy is {value} at denoising step {step_index} "
                                f"(timestep {timestep}), iteration {iteration}")
        self.carried_energy = value
        self.log.append(GuidanceRecord(step_index, iteration, int(timestep), value, self.config.loss_scale * value))
        return self.config.stop_rule == STOP_CARRIED or self._above_threshold()

    def _above_threshold(self) -> bool:
        return self.carried_energy > self.config.loss_threshold


def guide_batch(schedules: Sequence[GuidanceSchedule | None], latents: torch.Tensor, step_index: int,
                timestep: int, energy_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
                step_size: torch.Tensor | float, scale: float) -> torch.Tensor:
    """The guided iterations of one denoising step for a batch of videos, each with its own schedule
    (None: unguided).

    Each iteration runs one forward over the videos that still want it: ``energy_fn(latents[active],
    active)`` returns their ``(A,)`` energies. Decisions are per video, exactly as for one video.
    """
    stopped = [schedule is None for schedule in schedules]
    iteration = 0
    while True:
        active = [b for b, schedule in enumerate(schedules)
                  if not stopped[b] and schedule.wants_iteration(step_index, iteration)]
        if not active:
            return latents

        def update_if(energies: torch.Tensor) -> torch.Tensor:
            decisions = [schedules[b].record(energies[a], step_index, iteration, timestep)
                         for a, b in enumerate(active)]
            for a, b in enumerate(active):
                stopped[b] = stopped[b] or not decisions[a]
            return torch.tensor(decisions)

        index = torch.tensor(active, device=latents.device)
        updated, _ = guidance_step(latents.index_select(0, index), lambda z: energy_fn(z, active), step_size,
                                   scale, update_if=update_if)
        latents = latents.index_copy(0, index, updated)
        iteration += 1
