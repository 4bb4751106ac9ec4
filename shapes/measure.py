"""Per-video measurements on the shapes world, against the planned scene of a caption: prompt following and
layout adherence (the stage-2 evaluation's `score_adherence` on every frame, with the shapes detector).

Used by `scripts/bench_shapes.py` and the tests; the benchmark tables themselves come from the stage-2
evaluation (`scripts/eval_owl_vit.py --detector shapes`).
"""
from __future__ import annotations

import numpy as np

from shapes.detector import ShapeDetection, detect_frame
from shapes.planner import detector_query
from shapes.world import Scene, scene_boxes
from utils.eval.metrics import VideoAdherence, score_adherence

# A detection counts for a query when its score (colour prob x shape prob x fit quality) reaches this.
MIN_SCORE = 0.3


def detect_video(frames: np.ndarray) -> list[list[ShapeDetection]]:
    """The shapes detector on every frame of (F, H, W, 3) uint8."""
    return [detect_frame(frame) for frame in frames]


def follows_prompt(scene: Scene, detections: list[list[ShapeDetection]], *, colour: bool = True,
                   shape: bool = True, main: bool = False) -> bool:
    """Every requested (colour, shape) is detected in at least half of the frames where the plan has it.

    ``main``: only each frame's largest detections count, as many as the plan has objects in that frame, so the
    objects a video mainly shows must be the requested ones. Without it, a cluttered video, whose dozens of
    coloured specks include the requested kind by chance, follows every prompt. ``colour=False`` or
    ``shape=False`` leaves that attribute out of the query (any colour / any shape): which of the two a model
    misses, when it misses the prompt."""
    planned = scene_boxes(scene, len(detections)).any(axis=-1)                    # (objects, F)
    if main:
        detections = [sorted(frame, key=lambda d: d.area_px, reverse=True)[:int(planned[:, index].sum())]
                      for index, frame in enumerate(detections)]
    first_of_kind = {}
    for index, obj in enumerate(scene.objects):
        first_of_kind.setdefault((obj.colour if colour else None, obj.shape if shape else None), index)
    for (wanted_colour, wanted_shape), index in first_of_kind.items():
        frames = np.nonzero(planned[index])[0]
        hits = sum(any(d.score(wanted_colour, wanted_shape) >= MIN_SCORE for d in detections[f]) for f in frames)
        if hits * 2 < len(frames):
            return False
    return True


def main_colour(scene: Scene, detections: list[list[ShapeDetection]]) -> str:
    """The colour a one-object video mainly shows: that of each frame's largest detection, the most frequent one
    over the frames where the plan has the object ("none" where a frame has no detection). What a one-object
    prompt's colour turns into, when the main object has the wrong one."""
    if len(scene.objects) != 1:
        raise ValueError(f"main_colour is defined for one-object scenes; this one has {len(scene.objects)} objects")
    frames = np.nonzero(scene_boxes(scene, len(detections))[0].any(axis=-1))[0]
    colours = [max(detections[f], key=lambda d: d.area_px).colour if detections[f] else "none" for f in frames]
    return max(dict.fromkeys(colours), key=colours.count) if colours else "none"


def score_video_adherence(scene: Scene, detections: list[list[ShapeDetection]], height: int,
                          width: int) -> VideoAdherence:
    """mIoU, coverage, CD and AP50 of one video against ``scene``'s boxes, over every frame."""
    boxes = scene_boxes(scene, len(detections))
    queries = list(dict.fromkeys(detector_query(obj.colour, obj.shape) for obj in scene.objects))
    labels = [queries.index(detector_query(obj.colour, obj.shape)) for obj in scene.objects]
    scale = np.asarray([width, height, width, height], dtype=np.float64)
    frame_detections = []
    for per_frame in detections:
        kept = [(d, [d.score(*_kind(q)) for q in queries]) for d in per_frame]
        kept = [(d, s) for d, s in kept if max(s) >= MIN_SCORE]
        frame_detections.append((
            np.asarray([np.asarray(d.box_xyxy_px) / scale for d, _ in kept]).reshape(-1, 4),
            np.asarray([max(s) for _, s in kept], dtype=np.float64),
            np.asarray([int(np.argmax(s)) for _, s in kept], dtype=np.int64)))
    return score_adherence(boxes, list(range(len(scene.objects))), [o.phrase for o in scene.objects], labels,
                           queries, frame_detections)


def _kind(query: str) -> tuple[str | None, str | None]:
    from shapes.detector import parse_query

    return parse_query(query)


# A pixel is salient when its colour is this far (L1, 0..765) from the frame's median colour (the background).
SALIENCY_MIN_DISTANCE = 90


def compute_salient_boxes(frames: np.ndarray, min_distance: float = SALIENCY_MIN_DISTANCE) -> np.ndarray:
    """(F, 4) normalised xyxy box of the largest salient component of each frame (zeros where none).

    A colour- and shape-agnostic object finder: it sees where *something* was drawn even when a partly trained
    model draws it in the wrong colour, which the shapes detector rightly refuses to name.
    """
    from scipy import ndimage

    num_frames, height, width, _ = frames.shape
    boxes = np.zeros((num_frames, 4))
    for index, frame in enumerate(frames.astype(np.int64)):
        background = np.median(frame.reshape(-1, 3), axis=0)
        salient = np.abs(frame - background).sum(-1) > min_distance
        labels, count = ndimage.label(salient)
        if not count:
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(salient, labels, range(1, count + 1))))
        ys, xs = np.nonzero(labels == largest)
        boxes[index] = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
    return boxes


def compute_salient_miou(scene: Scene, frames: np.ndarray) -> float:
    """Mean IoU, over the frames where the plan has its first object, between that object's box and the
    largest salient component (0 where there is none): layout adherence of a one-object scene, colour-blind."""
    from utils.eval.metrics import compute_iou_matrix

    planned = scene_boxes(scene, frames.shape[0])[0]
    found = compute_salient_boxes(frames)
    present = planned.any(axis=-1)
    ious = [compute_iou_matrix(planned[f][None], found[f][None])[0, 0] if found[f].any() else 0.0
            for f in np.nonzero(present)[0]]
    return float(np.mean(ious)) if ious else 0.0


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of the paired differences ``b - a`` and its standard error (the per-pair differences' sample
    standard deviation over sqrt(n); nan below two pairs): the one paired statistic of the shapes benchmark."""
    differences = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if differences.size < 2:
        return (float(differences.mean()) if differences.size else float("nan")), float("nan")
    return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(differences.size))


def reconstruct_video(vae, frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 through a VAE (the posterior's mean, then the decoder): the best video any sampler over
    that VAE's latents can give, so what the detector makes of it bounds every arm. ``AutoencoderKLWan`` takes
    the clip at once (F = 4k + 1); an image VAE (``AutoencoderKL``) takes the frames as a batch."""
    import torch

    pixels = torch.from_numpy(frames).to(vae.device, vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1
    video_vae = type(vae).__name__ == "AutoencoderKLWan"
    with torch.no_grad():
        inputs = pixels.permute(1, 0, 2, 3)[None] if video_vae else pixels
        decoded = vae.decode(vae.encode(inputs).latent_dist.mode()).sample
    decoded = decoded[0].permute(1, 0, 2, 3) if video_vae else decoded
    return ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
