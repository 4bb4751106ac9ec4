"""`LVDPipeline`: a diffusers-style entry point (``from_pretrained``, then call it with a prompt and a layout).

Thin by design: the settings are generate.py's flags (``generation.settings``, keyword arguments named as the
flags' destinations: ``num_inference_steps``, ``loss_scale``, ``corrector_off_steps``...), the model is
``models.loading.load_video_model``'s and the video is ``generation.sampling.generate_video``'s, so a call
gives what ``generate.py`` gives for the same run-model, flags and seed (``--seed_offset`` of prompt 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from generation.backbones import backbone_for
from generation.guidance import GuidanceRecord
from generation.sampling import generate_video
from generation.settings import RunConfigs, configs_from_args, parse_settings_argv
from models.loading import load_video_model
from models.registry import LAYOUT_METHODS, RUN_MODELS, RunModelError, RunModelSpec, get_run_model
from utils.layout import LayoutCondition, SceneLayout, layout_from_dict, parse_layout_file

# Settings flags that are not per-call video settings (they choose or place the model).
_MODEL_FLAGS = ("run_model", "model_path", "device", "dtype", "offload_text_encoder", "seed_offset", "save_formats",
                "save_latents", "no_annotate")


@dataclass
class LVDPipelineOutput:
    frames: np.ndarray                      # (F, H, W, 3) uint8 RGB
    latents: torch.Tensor                   # (1, C, latent frames, h, w) final latents, on the CPU
    prompt: str                             # the prompt the model saw (with the background for layouts)
    condition: LayoutCondition | None       # boxes and token positions (layout methods)
    guidance_log: list[GuidanceRecord]      # one record per guided iteration
    configs: RunConfigs                     # what the call ran with


class LVDPipeline:
    """A run-model's loaded video model, called like a diffusers pipeline::

        pipe = LVDPipeline.from_pretrained("lvd_tiny")           # a run-model, a model id or a weights folder
        video = pipe(layout=layout, seed=3, num_inference_steps=12).frames   # (F, H, W, 3) uint8
    """

    def __init__(self, model, spec: RunModelSpec):
        self.model = model
        self.spec = spec

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, run_model: str | None = None,
                        device: str | None = None, dtype: str | None = None, offload_text_encoder: bool = False,
                        local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> "LVDPipeline":
        """Load a run-model's video model. ``name_or_path`` is a run-model name (``lvd_zeroscope``,
        ``lvd_wan_tiny``), a hub model id (its LVD run-model, e.g. ``cerspense/zeroscope_v2_576w``) or a local
        weights folder (then ``run_model`` says which run-model it is). Raises RunModelError or
        `models.hub.MissingWeightsError` (naming what to download)."""
        spec, model_path = _resolve(str(name_or_path), run_model)
        model = load_video_model(spec, model_path=model_path, device=device, dtype=dtype,
                                 local_files_only=local_files_only, cache_dir=cache_dir)
        if offload_text_encoder:
            model = model.with_text_encoder_offload(True)
        return cls(model, spec)

    def configs(self, **settings: Any) -> RunConfigs:
        """The configs generate.py builds for this run-model and these settings (flag names, None = default)."""
        args = parse_settings_argv(["--run-model", self.spec.name])
        known = sorted(set(vars(args)) - set(_MODEL_FLAGS))
        for name, value in settings.items():
            if name not in known:
                raise TypeError(f"unknown setting {name!r}; expected one of: {', '.join(known)}")
            setattr(args, name, value)
        return configs_from_args(args)

    def __call__(self, prompt: str | None = None, layout: SceneLayout | Mapping | str | os.PathLike | None = None, *,
                 seed: int = 0, step_callback=None, **settings: Any) -> LVDPipelineOutput:
        """One video. ``layout`` (layout methods): a `SceneLayout`, a ``layout_to_dict`` dict or a layout.json
        path; ``prompt`` defaults to the layout's. ``seed`` is the video's seed (generate.py's ``--seed_offset``
        for its first prompt). Other keywords are generate.py's settings flags (`configs`)."""
        configs = self.configs(**settings)
        layout = _as_layout(layout)
        uses_layout = self.spec.method in LAYOUT_METHODS
        if uses_layout and layout is None:
            raise ValueError(f"run-model {self.spec.name!r} ({self.spec.method}) needs a layout")
        if not uses_layout and layout is not None:
            raise ValueError(f"run-model {self.spec.name!r} is a baseline: it takes a prompt, not a layout")
        if prompt is None:
            if layout is None:
                raise ValueError("give a prompt, a layout, or both")
            prompt = layout.prompt
        condition = None
        if layout is not None:
            condition = backbone_for(self.model).build_condition(layout, configs.sampling.num_frames)
        result = generate_video(self.model, prompt, configs.sampling, seed, condition=condition,
                                guidance=configs.guidance, gligen=configs.gligen, execution=configs.execution,
                                step_callback=step_callback)
        return LVDPipelineOutput(frames=result.frames, latents=result.latents, prompt=result.prompt,
                                 condition=condition, guidance_log=result.guidance_log, configs=configs)


def _resolve(name: str, run_model: str | None) -> tuple[RunModelSpec, str | None]:
    """(run-model, local folder or None) of ``from_pretrained``'s first argument."""
    if Path(name).is_dir():
        if run_model is None:
            raise RunModelError(f"{name} is a local folder: say which run-model its weights are (run_model=...)")
        return get_run_model(run_model), name
    if run_model is not None:
        spec = get_run_model(run_model)
        if name not in (spec.name, spec.model_id):
            raise RunModelError(f"run_model {run_model!r} runs {spec.model_id!r}, not {name!r}")
        return spec, None
    by_id = [spec for spec in RUN_MODELS if spec.model_id == name and spec.method in LAYOUT_METHODS]
    if by_id:  # the plain LVD run-model of those weights first
        return sorted(by_id, key=lambda spec: spec.method != "lvd")[0], None
    return get_run_model(name), None  # a run-model name (RunModelError lists the choices otherwise)


def _as_layout(layout) -> SceneLayout | None:
    if layout is None or isinstance(layout, SceneLayout):
        return layout
    if isinstance(layout, Mapping):
        return layout_from_dict(layout)
    return parse_layout_file(layout)
