"""The detection cache: one ``.npz`` per (video content, detector, frames, queries).

What is cached is the detector's raw output (every box, before thresholding and NMS), so a rerun with
other thresholds, NMS settings or predicates reads it back instead of running the detector. A file
that is unreadable (truncated, corrupt) or was written for another key is ignored with one warning
naming it, and the caller recomputes and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.eval.detector import VideoDetections
from utils.io import atomic_path

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# What np.load of a damaged .npz raises: a broken zip directory, a truncated member, a bad deflate
# stream, a missing array, or a member that is not an array.
_UNREADABLE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def compute_file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_cache_key(video_digest: str, detector_identity: str, frames_mode: str,
                    queries: Sequence[str]) -> dict:
    """What a cached detection depends on. ``frames_mode`` is e.g. ``"eval6"`` or ``"all"``."""
    return {"format": CACHE_FORMAT_VERSION, "video_sha1": video_digest, "detector": detector_identity,
            "frames": frames_mode, "queries": list(queries)}


def cache_file_path(cache_dir: str | os.PathLike, video_path: str | os.PathLike, key: dict) -> Path:
    key_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(video_path).stem}__{key_hash}.npz"


def save_cached_detections(path: str | os.PathLike, key: dict, detections: VideoDetections) -> None:
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "wb") as handle:
            np.savez_compressed(
                handle, key=np.array(json.dumps(key, sort_keys=True)),
                queries=np.array(json.dumps(list(detections.queries))),
                frame_indices=np.asarray(detections.frame_indices, dtype=np.int64),
                shape=np.asarray([detections.num_frames, detections.height, detections.width], dtype=np.int64),
                boxes_xyxy_px=detections.boxes_xyxy_px, scores=detections.scores, labels=detections.labels)


def load_cached_detections(path: str | os.PathLike, key: dict) -> VideoDetections | None:
    """The cached detections if ``path`` exists and was written for exactly ``key``; else None.

    A damaged file (e.g. cut short by a full disk) is not an error of the video: it logs one warning
    naming the cache file and returns None, so the detections are recomputed and the file rewritten.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != json.loads(json.dumps(key, sort_keys=True)):
                logger.warning("detection cache %s was written for other settings; recomputing it", path)
                return None
            num_frames, height, width = (int(v) for v in data["shape"])
            return VideoDetections(
                queries=tuple(json.loads(str(data["queries"]))),
                frame_indices=tuple(int(i) for i in data["frame_indices"]),
                num_frames=num_frames, height=height, width=width,
                boxes_xyxy_px=data["boxes_xyxy_px"], scores=data["scores"], labels=data["labels"])
    except _UNREADABLE_ERRORS as error:
        # numpy's own text (e.g. advice about allow_pickle for bytes that are not a zip) is not about a cache file.
        logger.warning("detection cache %s is unreadable (%s: the file is damaged or not a detection cache); "
                       "recomputing it", path, type(error).__name__)
        return None
