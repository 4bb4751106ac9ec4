"""The open assembly of a generation run: layout controls as plug-ins of the denoising loop.

A *control family* is a frozen config type plus a builder: ``build(config, context) -> control | None`` for
one batch (None: nothing to do, e.g. zero strength, so the run is the baseline bit for bit). A *control* is
any object with the lifetime protocol of `generation.loop.Control` (a context manager entered around the
run; `generation.loop.ControlBase` has no-op defaults) and any of ``before_step`` / ``model_kwargs`` /
``video_logs``; attention-processor installers install
theirs through `Backbone.attention_processors` in ``__enter__`` (and restore them in ``__exit__``).

The families (`CONTROL_FAMILIES`, in the order their controls are built, entered and run):

- ``gligen``: GLIGEN grounding inputs, a model-kwargs provider (`models.gligen.GligenConfig`);
- ``energy``: LVD's energy guidance on the latents, a ``before_step`` hook (`generation.config.GuidanceConfig`);
- ``mask``: Peekaboo-style attention masking (`generation.attention_control.MaskingConfig`);
- ``modulate``: DenseDiffusion-style attention modulation (`generation.attention_control.ModulationConfig`).

A new family is a config type, a builder and one entry here; `generate_videos`, the loop and the backbones
stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from generation.attention_control import build_attention_control
from generation.grounding import GligenGrounding
from generation.loop import BatchContext
from generation.lvd import build_layout_guidance
from models.registry import CONTROL_FAMILY_NAMES


@dataclass(frozen=True)
class ControlFamily:
    name: str                                   # the --control name
    config_type: Callable[[], type]             # the frozen config type (imported lazily)
    build: Callable[[Any, BatchContext], Any]   # config, context -> control or None
    help: str


def _build_gligen(config, context: BatchContext):
    return GligenGrounding.build(context.model, context.prompts, context.conditions, context.sampling.num_frames,
                                 config, len(context.timesteps))


def _build_energy(config, context: BatchContext):
    return build_layout_guidance(context.backbone, list(context.prompts), list(context.conditions),
                                 context.text.cond, config, context.execution, context.scheduler, context.timesteps,
                                 context.sampling.num_frames, context.sampling.height, context.sampling.width)


def _build_attention(config, context: BatchContext):
    return build_attention_control(config, context)


def _config_type(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)
    return load


CONTROL_FAMILIES: dict[str, ControlFamily] = {family.name: family for family in (
    ControlFamily("gligen", _config_type("models.gligen", "GligenConfig"), _build_gligen,
                  "GLIGEN grounding inputs (grounded UNets only: lvd-gligen_*, lvd-plus_*)"),
    ControlFamily("energy", _config_type("generation.config", "GuidanceConfig"), _build_energy,
                  "LVD energy guidance on the latents (extra guided passes)"),
    ControlFamily("mask", _config_type("generation.attention_control", "MaskingConfig"), _build_attention,
                  "Peekaboo-style attention masking (no extra passes)"),
    ControlFamily("modulate", _config_type("generation.attention_control", "ModulationConfig"), _build_attention,
                  "DenseDiffusion-style attention modulation, a logit bias (no extra passes)"),
)}
CONTROL_NAMES = tuple(CONTROL_FAMILIES)
assert CONTROL_NAMES == CONTROL_FAMILY_NAMES, "models.registry names the same families, in this order"


def family_of(config) -> ControlFamily:
    """The family of a control config (raises TypeError for anything else)."""
    for family in CONTROL_FAMILIES.values():
        if isinstance(config, family.config_type()):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a control family; expected one of "
                    f"{[family.config_type().__name__ for family in CONTROL_FAMILIES.values()]}")


def sort_configs(configs: Sequence[Any]) -> list[Any]:
    """Configs in the order of `CONTROL_FAMILIES` (one per family; raises ValueError on a repeat)."""
    order = list(CONTROL_FAMILIES)
    named = [(family_of(config).name, config) for config in configs]
    names = [name for name, _ in named]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"one config per control family, found several for {repeated}")
    return [config for _, config in sorted(named, key=lambda item: order.index(item[0]))]


def build_controls(configs: Sequence[Any], context: BatchContext) -> list[Any]:
    """The controls of a batch (families without work for it give none)."""
    controls = []
    for config in sort_configs(configs):
        control = family_of(config).build(config, context)
        if control is not None:
            controls.append(control)
    return controls
