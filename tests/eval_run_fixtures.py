"""Tiny synthetic generation runs and hand-made detections for the stage-2 evaluation tests (no
generator, no weights).

A run looks like what ``generate.py`` writes: ``<run>/config.json`` with the prompt type, and per
benchmark index ``<run>/<ind>/video_0.joblib`` (uint8 (F, H, W, 3)) plus ``layout.json``; optionally
the same video as .gif / .mp4 (``formats``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np

from prompt import get_benchmark
from utils.eval.detector import VideoDetections
from utils.layout import build_layout_from_frames, layout_to_dict

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A script of scripts/ as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                        with_layout: bool = True, video_name: str = "video_0.joblib",
                        formats: Sequence[str] = ("joblib",), fps: float = 8.0) -> Path:
    """``video_name`` names the joblib file; the other ``formats`` get the same stem."""
    from utils.video_io import save_video

    folder = run / str(index)
    folder.mkdir(parents=True, exist_ok=True)
    if frames is not None:
        stem = folder / Path(video_name).stem
        if "joblib" in formats:
            joblib.dump(frames, stem.with_name(stem.name + ".joblib"), compress=("bz2", 3))
        others = [f for f in formats if f != "joblib"]
        if others:
            save_video(frames, stem, formats=others, fps=fps)
    if with_layout and prompt is not None:
        layout = moving_layout(prompt)
        (folder / "layout.json").write_text(json.dumps(
            {"prompt": prompt, "prompt_index": index, "layout": layout_to_dict(layout)}))
    return folder


def write_run(run: Path, indices: Sequence[int], prompt_type: str = "lvd", *, num_frames: int = 16,
              height: int = 64, width: int = 64, with_layout: bool = True,
              formats: Sequence[str] = ("joblib",), fps: float = 8.0) -> Path:
    """A run directory with one drawn video (and its layout) per benchmark index."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"prompt_type": prompt_type, "num_frames": num_frames}))
    benchmark = get_benchmark(prompt_type)
    for index in indices:
        write_prompt_folder(run, index, draw_video(num_frames, height, width, seed=index),
                            benchmark[index].prompt, with_layout=with_layout, formats=formats, fps=fps)
    return run


def make_detections(queries: Sequence[str], frame_indices: Sequence[int], width: int, height: int,
                    frames: Sequence[Sequence[tuple[Sequence[float], float, int]]],
                    num_frames: int | None = None) -> VideoDetections:
    """Hand-made detections: ``frames[f]`` = [(box_xyxy_px, score, label), ...].

    Frames with fewer boxes are padded with zero-score boxes (never kept by a threshold > 0).
    """
    most = max((len(f) for f in frames), default=0) or 1
    boxes = np.zeros((len(frames), most, 4), dtype=np.float32)
    scores = np.zeros((len(frames), most), dtype=np.float32)
    labels = np.zeros((len(frames), most), dtype=np.int64)
    for f, objects in enumerate(frames):
        for i, (box, score, label) in enumerate(objects):
            boxes[f, i], scores[f, i], labels[f, i] = box, score, label
    return VideoDetections(tuple(queries), tuple(frame_indices),
                           num_frames if num_frames is not None else max(frame_indices) + 1,
                           height, width, boxes, scores, labels)


def inject_detections(run: Path, index: int, detector_identity: str, frames, *, num_frames: int = 16,
                      size: tuple[int, int] = (64, 64), prompt_type: str = "lvd") -> None:
    """Write cached detections (``frames`` as for :func:`make_detections`) for the benchmark queries of
    entry ``index``, as if the detector had run on its six evaluated frames."""
    from utils.eval.config import CACHE_DIR_NAME
    from utils.eval.detection_cache import build_cache_key, cache_file_path, compute_file_digest, save_cached_detections
    from utils.eval.verdicts import select_frame_indices

    item = get_benchmark(prompt_type)[index]
    video = run / str(index) / "video_0.joblib"
    key = build_cache_key(compute_file_digest(video), detector_identity, "eval6", item.check.queries)
    width, height = size
    detections = make_detections(item.check.queries, select_frame_indices(num_frames, 6), width, height, frames,
                                 num_frames=num_frames)
    save_cached_detections(cache_file_path(run / str(index) / CACHE_DIR_NAME, video, key), key, detections)
