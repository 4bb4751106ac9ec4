"""Tiny synthetic generation runs for the stage-2 evaluation tests (no generator, no weights).

A run looks like what ``generate.py`` writes: ``<run>/config.json`` with the prompt type, and per
benchmark index ``<run>/<ind>/video_0.joblib`` (uint8 (F, H, W, 3)) plus ``layout.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np

from prompt import get_benchmark
from utils.layout import build_layout_from_frames, layout_to_dict


def draw_video(num_frames: int = 16, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A (F, H, W, 3) uint8 video: a bright square moving left to right over noise."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 80, (num_frames, height, width, 3), dtype=np.uint8)
    side = max(4, min(height, width) // 4)
    for f in range(num_frames):
        x = int((width - side) * f / max(1, num_frames - 1))
        frames[f, height // 3: height // 3 + side, x: x + side] = (230, 200, 40)
    return frames


def moving_layout(prompt: str, phrase: str = "cat"):
    """A one-object layout (512 canvas) moving left to right."""
    frames = [[{"id": 0, "name": phrase, "box": [40 + 60 * k, 150, 128, 128]}] for k in range(6)]
    return build_layout_from_frames(frames, prompt=prompt, background="grass")


def write_prompt_folder(run: Path, index: int, frames: np.ndarray | None, prompt: str | None,
                        with_layout: bool = True, video_name: str = "video_0.joblib") -> Path:
    folder = run / str(index)
    folder.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        joblib.dump(frames, folder / video_name, compress=("bz2", 3))
    if with_layout and prompt is not None:
        layout = moving_layout(prompt)
        (folder / "layout.json").write_text(json.dumps(
            {"prompt": prompt, "prompt_index": index, "layout": layout_to_dict(layout)}))
    return folder


def write_run(run: Path, indices: Sequence[int], prompt_type: str = "lvd", *, num_frames: int = 16,
              height: int = 64, width: int = 64, with_layout: bool = True) -> Path:
    """A run directory with one drawn video (and its layout) per benchmark index."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"prompt_type": prompt_type, "num_frames": num_frames}))
    benchmark = get_benchmark(prompt_type)
    for index in indices:
        write_prompt_folder(run, index, draw_video(num_frames, height, width, seed=index),
                            benchmark[index].prompt, with_layout=with_layout)
    return run
