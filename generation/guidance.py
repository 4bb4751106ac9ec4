"""Latent guidance: one gradient step on an energy, and the reference's schedule around it (spec 4.5).

:func:`guidance_step` is the whole method: forward with grad, energy, gradient with respect to the
latents, update. :class:`GuidanceSchedule` decides when to call it: for the first
``max_index_step`` denoising steps, up to ``max_iter`` times, while the energy is above the threshold
(the reference compares the loss carried from the previous iteration and stops for good once it is
below; ``stop_rule="per-step"`` recomputes it at every step instead, spec 15.2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from generation.config import STOP_CARRIED, GuidanceConfig

# The reference starts the carried loss at this sentinel (spec 4.5).
INITIAL_LOSS = 10000.0


class GuidanceError(RuntimeError):
    """The guidance energy is not finite."""


@dataclass(frozen=True)
class GuidanceRecord:
    step: int          # denoising step index (0-based)
    iteration: int     # guidance iteration within the step
    timestep: int
    energy: float      # L, before the update this iteration makes
    loss: float        # loss_scale * L, what the threshold is compared with (divided by loss_scale)


def compute_step_sizes(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(steps,) float32 guidance step sizes ``sqrt(1 - alpha_bar_t)``, one per timestep (spec 4.5).

    Computed once per video on the CPU, so the loop never indexes the CPU table with a device timestep.
    """
    return torch.sqrt(1 - alphas_cumprod.to(torch.float32)[timesteps.cpu().long()])


def guidance_step(latents: torch.Tensor, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                  step_size: torch.Tensor | float,
                  update_if: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents - step_size * d energy_fn(latents) / d latents``; returns (new latents, energy).

    ``update_if(energy)`` may veto the update after seeing the energy (the latents are returned as
    they were); the energy is computed once either way.
    """
    leaf = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = energy_fn(leaf)
        if update_if is not None and not update_if(energy.detach()):
            return latents, energy.detach()
        (gradient,) = torch.autograd.grad(energy, leaf)
    return leaf.detach() - step_size * gradient, energy.detach()


@dataclass
class GuidanceSchedule:
    """State of the guidance across denoising steps: the carried loss and the log."""

    config: GuidanceConfig
    carried_loss: float = INITIAL_LOSS
    log: list[GuidanceRecord] = field(default_factory=list)

    def guide(self, latents: torch.Tensor, step_index: int, timestep: int,
              energy_fn: Callable[[torch.Tensor], torch.Tensor], step_size: torch.Tensor) -> torch.Tensor:
        """Apply the guided iterations of one denoising step. ``energy_fn`` returns the scaled loss."""
        config = self.config
        if step_index >= config.max_index_step:
            return latents
        for iteration in range(config.iterations_at(step_index)):
            if config.stop_rule == STOP_CARRIED:
                # The reference tests the loss carried from the previous iteration (or step).
                if not self._above_threshold():
                    break
                latents, loss = guidance_step(latents, energy_fn, step_size)
                self._check_and_log(loss, step_index, iteration, timestep)
            else:
                def update_if(loss: torch.Tensor) -> bool:
                    self._check_and_log(loss, step_index, iteration, timestep)
                    return self._above_threshold()

                latents, _ = guidance_step(latents, energy_fn, step_size, update_if=update_if)
                if not self._above_threshold():
                    break
        return latents

    def _above_threshold(self) -> bool:
        return self.carried_loss / self.config.loss_scale > self.config.loss_threshold

    def _check_and_log(self, loss: torch.Tensor, step_index: int, iteration: int, timestep: int) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise GuidanceError(f"the guidance energy is {value} at denoising step {step_index} "
                                f"(timestep {timestep}), iteration {iteration}")
        self.carried_loss = value
        self.log.append(GuidanceRecord(step_index, iteration, int(timestep), value / self.config.loss_scale, value))

    def log_as_dicts(self) -> list[dict]:
        return [asdict(record) for record in self.log]
