"""Schedulers: DPM-Solver++ built from a model's DDIM config, as the reference does (spec 5.1, 11).

The configs below are verbatim copies of the hub files (``shared/model-configs`` is not available at
run time); they are used by the tiny models and the saved tiny folders. Real weights bring their own.
"""
from __future__ import annotations

import os
import types
from typing import Any

from diffusers import DPMSolverMultistepScheduler

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
