"""Video files: uint8 frame arrays to joblib / GIF / mp4 and back, and latents to disk (spec 8.2, 11).

Frames are always a NumPy ``uint8`` array ``(frames, height, width, 3)``, RGB. Every file is written
atomically (``utils.io.atomic_path``), so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from utils.io import atomic_path

VIDEO_FORMATS = ("gif", "mp4", "joblib")
DEFAULT_FPS = 8.0                  # spec 8.2: GIF frames last 125 ms
JOBLIB_COMPRESS = ("bz2", 3)       # spec 8.2
MP4_CRF = 17                       # spec 8.2: libx264, yuv420p, crf 17


class VideoReadError(OSError):
    """A video or latent file is missing, unreadable, or does not hold a (F, H, W, 3) uint8 video."""


def validate_frames(frames: np.ndarray, *, where: str = "frames") -> None:
    """Raise ValueError unless ``frames`` is a uint8 ndarray ``(F, H, W, 3)`` with F, H, W >= 1."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{where}: expected a numpy uint8 array (F, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8, got {frames.dtype} (shape {frames.shape})")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{where}: expected shape (F, H, W, 3) RGB, got {frames.shape}")
    if 0 in frames.shape:
        raise ValueError(f"{where}: expected at least one frame of at least 1x1 pixels, got {frames.shape}")


# --------------------------------------------------------------------------------------------
# Writers, one per format. Each writes atomically.


def write_joblib(frames: np.ndarray, path: str | os.PathLike) -> Path:
    """``joblib.dump(frames, path, compress=("bz2", 3))`` like the reference: exact round trip."""
    import joblib

    validate_frames(frames)
    with atomic_path(path) as tmp_path:
        joblib.dump(frames, tmp_path, compress=JOBLIB_COMPRESS)
    return Path(path)


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Animated GIF that loops forever, ``1000 / fps`` ms per frame.

    GIF stores centiseconds, so 125 ms is written as 120 ms (Pillow truncates), as in the reference.
    Pillow also merges identical consecutive frames into one longer frame: playback time is kept
    but the frame count can drop. Use the joblib file for analysis.
    """
    import imageio

    validate_frames(frames)
    with atomic_path(path) as tmp_path:
        imageio.mimsave(tmp_path, list(frames), format="gif", loop=0, duration=1000.0 / fps)
    return Path(path)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """h264 mp4, yuv420p, crf 17, at ``fps`` (the upsampler passes 8.01, spec 11).

    yuv420p needs even sizes: an odd height or width is padded by one row or column that repeats the
    edge (never rescaled). Sizes that are not multiples of 16 are left alone (``macro_block_size=1``);
    h264 handles them itself.
    """
    import imageio_ffmpeg

    validate_frames(frames)
    num_frames, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    with atomic_path(path) as tmp_path:
        writer = imageio_ffmpeg.write_frames(
            str(tmp_path), (width + pad_w, height + pad_h), fps=fps, codec="libx264",
            pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
            output_params=["-crf", str(MP4_CRF)], ffmpeg_log_level="error")
        writer.send(None)  # start ffmpeg
        try:
            for frame in frames:
                if pad_h or pad_w:
                    frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
    return Path(path)


_WRITERS = {"gif": write_gif, "mp4": write_mp4}


def save_video(frames: np.ndarray, path_stem: str | os.PathLike,
               formats: Iterable[str] = ("gif", "joblib"), fps: float = DEFAULT_FPS) -> dict[str, Path]:
    """Write ``frames`` (F, H, W, 3) uint8 as ``<path_stem>.<format>`` for each format; return the paths.

    The joblib file is written last: resume logic treats it as the "finished" marker, so it only
    appears once every other requested file is complete.
    """
    validate_frames(frames)
    formats = tuple(dict.fromkeys(formats))  # unique, in the given order
    unknown = [fmt for fmt in formats if fmt not in VIDEO_FORMATS]
    if unknown:
        raise ValueError(f"unknown video format(s) {unknown}; supported: {list(VIDEO_FORMATS)}")
    path_stem = Path(path_stem)
    paths = {fmt: path_stem.with_name(f"{path_stem.name}.{fmt}") for fmt in formats}
    for fmt in formats:
        if fmt != "joblib":
            _WRITERS[fmt](frames, paths[fmt], fps=fps)
    if "joblib" in paths:
        write_joblib(frames, paths["joblib"])
    return paths


# --------------------------------------------------------------------------------------------
# Readers


def resolve_video_path(path: str | os.PathLike) -> Path:
    """The joblib file behind a video path: a ``.gif`` suffix becomes ``.joblib`` (spec 11)."""
    path = Path(path)
    return path.with_suffix(".joblib") if path.suffix == ".gif" else path


def _as_frames(data, path: Path) -> np.ndarray:
    # LVD-GLIGEN saved whatever the pipeline returned: possibly a list of frames (spec 8.2).
    if isinstance(data, (list, tuple)):
        try:
            data = np.stack([np.asarray(frame) for frame in data])
        except ValueError as error:
            raise VideoReadError(f"{path}: a list of frames that do not stack into one array ({error})") from error
    try:
        validate_frames(data, where=str(path))
    except ValueError as error:
        raise VideoReadError(str(error)) from error
    return data


def load_video(path: str | os.PathLike) -> np.ndarray:
    """Read a video as (F, H, W, 3) uint8 from .joblib (exact), or .gif / .mp4 (decoded, lossy).

    Raises VideoReadError for missing, unreadable or wrongly shaped files.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".joblib":
            import joblib

            data = joblib.load(path)
        elif suffix == ".gif":
            import imageio.v3 as iio

            data = iio.imread(path, index=None)[..., :3]  # (F, H, W, 3|4): drop any alpha
        elif suffix == ".mp4":
            import imageio.v3 as iio

            data = iio.imread(path, plugin="FFMPEG", index=None)
        else:
            raise VideoReadError(f"{path}: unsupported video file type {suffix!r}; expected .joblib, .gif or .mp4")
    except VideoReadError:
        raise
    except Exception as error:  # joblib/imageio raise many unrelated types for corrupt files
        raise VideoReadError(f"{path}: could not read video ({type(error).__name__}: {error})") from error
    return _as_frames(data, path)


# --------------------------------------------------------------------------------------------
# Latents


def save_latents(latents, path: str | os.PathLike) -> Path:
    """``torch.save`` a detached CPU copy of ``latents`` (any shape), atomically."""
    import torch

    with atomic_path(path) as tmp_path:
        # clone: torch.save of a view would store the whole underlying storage
        torch.save(latents.detach().to("cpu").clone(), tmp_path)
    return Path(path)


def load_latents(path: str | os.PathLike):
    """The tensor saved by ``save_latents``, on CPU. Raises VideoReadError if missing or unreadable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"latents file not found: {path}")
    try:
        latents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle / zip / runtime errors for bad files
        raise VideoReadError(f"{path}: could not read latents ({type(error).__name__}: {error})") from error
    if not isinstance(latents, torch.Tensor):
        raise VideoReadError(f"{path}: expected a saved torch.Tensor, found {type(latents).__name__}")
    return latents
