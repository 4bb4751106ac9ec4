"""Schedulers: DPM-Solver++ built from a model's DDIM config, as the reference does (spec 5.1, 11), and Wan's
UniPC with its corrector optionally off on the first steps.

The configs below are verbatim copies of the hub files (``shared/model-configs`` is not available at
run time); they are used by the tiny models and the saved tiny folders. Real weights bring their own.
"""
from __future__ import annotations

import os
import types
from typing import Any, Mapping

from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from models.wan_configs import WAN_SCHEDULER_CONFIG, _config_dict

# damo-vilab/text-to-video-ms-1.7b scheduler/scheduler_config.json, verbatim (shared/model-configs is
# not available at run time). Zeroscope v2 576w's differs only in "_diffusers_version".
MODELSCOPE_DDIM_SCHEDULER_CONFIG = types.MappingProxyType({
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.15.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "trained_betas": None,
})

# cerspense/zeroscope_v2_XL scheduler/scheduler_config.json (shared/model-configs/SOURCES.md: the 576w
# DDIM config plus rescale_betas_zero_snr and timestep_spacing "leading"). Only the tiny model and
# `save_tiny_zeroscope_xl` use this copy; real weights bring their own file.
ZEROSCOPE_XL_DDIM_SCHEDULER_CONFIG = types.MappingProxyType({
    **MODELSCOPE_DDIM_SCHEDULER_CONFIG,
    "_diffusers_version": "0.18.0.dev0",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
})


def build_dpm_scheduler(ddim_config: dict[str, Any] | types.MappingProxyType | None = None
                        ) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) from a DDIM config, as the reference does (spec 5.1); default: ModelScope's."""
    config = dict(MODELSCOPE_DDIM_SCHEDULER_CONFIG if ddim_config is None else ddim_config)
    return DPMSolverMultistepScheduler.from_config(config)


def load_dpm_scheduler(folder: str | os.PathLike) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ built from the model's own (DDIM) scheduler config (spec 5.1).

    DDIM keys DPM does not know are dropped; keys the file lacks (timestep_spacing) take DPM's defaults.
    """
    config = DPMSolverMultistepScheduler.load_config(str(folder), subfolder="scheduler")
    return DPMSolverMultistepScheduler.from_config(config)


def build_zeroscope_xl_scheduler(ddim_config=None) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ from the XL DDIM config (default: `ZEROSCOPE_XL_DDIM_SCHEDULER_CONFIG`): leading spacing."""
    return DPMSolverMultistepScheduler.from_config(dict(ZEROSCOPE_XL_DDIM_SCHEDULER_CONFIG if ddim_config is None
                                                        else ddim_config))


def build_wan_scheduler(config: Mapping[str, Any] | None = None, corrector_off_steps: int = 0
                        ) -> UniPCMultistepScheduler:
    """UniPC from a Wan scheduler config (default `WAN_SCHEDULER_CONFIG`), with its corrector switched off on
    the first ``corrector_off_steps`` steps.

    UniPC's corrector at step i rebuilds x_i from x_{i-1} and the new model output, so most of an edit made to
    x_i before step i (LVD's guidance) is undone; with the corrector off there, x_i is used as it is. Step i's
    corrector is keyed by i - 1 in UniPC's ``disable_corrector`` (step 0 has none), hence ``range(K - 1)``.
    0 is the stock sampler (`WanPipeline`).
    """
    if corrector_off_steps < 0:
        raise ValueError(f"corrector_off_steps must be >= 0, got {corrector_off_steps}")
    base = _config_dict(WAN_SCHEDULER_CONFIG if config is None else config)
    base["disable_corrector"] = list(range(max(corrector_off_steps - 1, 0)))
    return UniPCMultistepScheduler.from_config(base)


def corrector_off_steps_of(scheduler) -> int:
    """The ``corrector_off_steps`` a scheduler was built with (inverse of `build_wan_scheduler`)."""
    disabled = sorted(getattr(scheduler.config, "disable_corrector", None) or [])
    if not disabled:
        return 0
    if disabled != list(range(len(disabled))):
        raise ValueError(f"the scheduler disables the corrector on steps {disabled}, not on the first steps")
    return len(disabled) + 1
