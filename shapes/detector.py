"""A detector for the shapes world (`shapes.world`): colour segmentation, connected components and a shape
fit, behind the stage-2 evaluation's detector interface (``scripts/eval_owl_vit.py --detector shapes``).

Per frame:

1. **Background.** The frame's median colour, then a local estimate: pixels that no palette colour explains
   are averaged over a window (normalised convolution), so a textured or uneven background is followed.
2. **Colour.** Each pixel is a mix ``background + alpha * (colour - background)`` of the background and one
   palette colour (`shapes.world.COLOURS`); per colour, ``alpha`` is the projection on that segment and the
   residual is the distance to it. A pixel belongs to the colour with the smallest residual if its alpha is
   at least ``min_alpha`` and its residual at most ``max_residual`` grey levels: tolerant of blur (partial
   alpha), texture and the off-colour, low-contrast pixels of generated videos.
3. **Components.** ``scipy.ndimage.label`` per colour. A component's alpha is divided by its own strength
   (the 90th percentile inside it), so a faded object weighs like a vivid one; below ``min_area_px`` it is
   noise. Its colour beliefs come from the hue of its inner pixels (hue survives fading, desaturation and
   mixing with a grey background), compared with the palette's hues.
4. **Shape.** The alpha-weighted moments of a component (area, centroid, variances) give, for each shape
   and each input blur tried, the box that shape would need (square: side ``sqrt(12 var)``, circle:
   ``4 sd``, triangle: width ``sqrt(24 var_x)``, height ``sqrt(18 var_y)``, centroid 2/3 down; a blur adds
   its variance); each candidate is drawn with the world's own rasteriser and compared with the alpha map.
   The misfits give the shape probabilities (softmax with ``shape_temperature``) and the best one the box.
   A component that the frame border cuts is refitted (centre and side of a square box, the world's boxes
   being square); boxes are reported clipped to the frame, as a detector sees them.

Limits: objects of one colour that touch (or, blurred, nearly touch) merge into one component and one box.

Scores are OWL-like: per query, ``score = p(colour) * p(shape) * quality``, where a query's words name a
colour, a shape, both or neither ("a photo of a red circle", "circles", "red"); the box's label is the
best query and its score that query's. A query that names neither matches nothing (score 0).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage, optimize

from shapes.world import COLOURS, SHAPES, _shape_mask
from utils.eval.detector import DetectionRequest, VideoDetections

SHAPES_DETECTOR_KIND = "shapes"   # scripts/eval_owl_vit.py --detector shapes

# Moments of a shape inscribed in a w x h box: var_x = w^2 / k_x, var_y = h^2 / k_y, centroid at
# y0 + centroid_y * h (the triangle's apex is at the top, its base at the bottom).
_MOMENT_CONSTANTS = {"square": (12.0, 12.0, 0.5), "circle": (16.0, 16.0, 0.5), "triangle": (24.0, 18.0, 2 / 3)}
_PLURALS = {f"{shape}s": shape for shape in SHAPES}


@dataclass(frozen=True)
class ShapesDetectorConfig:
    """Tunables of the shapes detector (fixed by tests on the world's clean and degraded videos)."""

    min_alpha: float = 0.3            # a pixel is a shape's when at least this much of it is the colour
    max_residual: float = 70.0        # ... and it lies at most this far (RGB grey levels) off the mix line
    min_area_px: float = 8.0          # smaller components (alpha-weighted area) are noise
    background_window: int = 15       # pixels; the local background is averaged over this window
    hue_sigma_degrees: float = 12.0   # p(colour) = softmax(-(hue distance)^2 / (2 sigma^2)) over the palette
    shape_temperature: float = 0.02   # p(shape) = softmax(-misfit / temperature)
    support_dilation: int = 2         # pixels around a component whose partial alpha counts (edges, blur)
    fit_smoothing: float = 1.0        # pixels; Gaussian smoothing of alpha map and drawn shape before comparing
    blurs: tuple[float, ...] = (0.0, 0.8, 1.4)  # pixels; blurs of the input tried (generated videos are soft)


@dataclass(frozen=True)
class ShapeDetection:
    """One component of one frame: its box, colour and shape beliefs and fit quality."""

    box_xyxy_px: tuple[float, float, float, float]
    colour: str
    colour_probs: dict[str, float]
    shape: str
    shape_probs: dict[str, float]
    quality: float       # 1 - the best shape's misfit, in [0, 1]
    area_px: float       # alpha-weighted area

    def score(self, colour: str | None, shape: str | None) -> float:
        """How well this detection answers a query for ``colour`` and ``shape`` (None: any)."""
        p_colour = 1.0 if colour is None else self.colour_probs.get(colour, 0.0)
        p_shape = 1.0 if shape is None else self.shape_probs.get(shape, 0.0)
        return p_colour * p_shape * self.quality


def parse_query(query: str) -> tuple[str | None, str | None]:
    """(colour, shape) named by a query's words, None for "any": "a photo of a red circle" -> ("red", "circle"),
    "circles" -> (None, "circle"). Returns (None, None) if it names neither (it then matches nothing)."""
    colour = shape = None
    for word in re.findall(r"[a-z]+", query.lower()):
        if colour is None and word in COLOURS:
            colour = word
        if shape is None and (word in SHAPES or word in _PLURALS):
            shape = _PLURALS.get(word, word)
    return colour, shape


def score_queries(detection: ShapeDetection, queries: Sequence[str]) -> np.ndarray:
    """(queries,) scores of one detection; queries naming no colour and no shape score 0."""
    scores = []
    for query in queries:
        colour, shape = parse_query(query)
        scores.append(0.0 if colour is None and shape is None else detection.score(colour, shape))
    return np.asarray(scores, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Segmentation


_PALETTE = np.asarray([COLOURS[name] for name in COLOURS], dtype=np.float64)  # (colours, 3)
_COLOUR_NAMES = tuple(COLOURS)


def _hues(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue in degrees, chroma) of (..., 3) RGB values (the hexagonal hue of HSV)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = np.maximum(high - low, 1e-6)
    hue = np.where(high == r, ((g - b) / chroma) % 6, np.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return 60.0 * hue, high - low


def _mean_hue(rgb: np.ndarray) -> float:
    """The chroma-weighted circular mean hue of (n, 3) RGB pixels, in degrees."""
    hue, chroma = _hues(np.asarray(rgb, dtype=np.float64))
    angle = np.deg2rad(hue)
    return float(np.rad2deg(np.arctan2((chroma * np.sin(angle)).sum(), (chroma * np.cos(angle)).sum())) % 360.0)


_PALETTE_HUES = _hues(_PALETTE)[0]


def _mix_projection(frame: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per palette colour: alpha (colours, H, W) of the pixel on the background->colour segment, and the
    distance (colours, H, W) of the pixel to that segment."""
    offset = frame - background                                            # (H, W, 3)
    direction = _PALETTE[:, None, None, :] - background[None]               # (colours, H, W, 3)
    norm2 = np.maximum((direction ** 2).sum(-1), 1.0)
    alpha = (offset[None] * direction).sum(-1) / norm2
    closest = np.clip(alpha, 0.0, 1.0)[..., None] * direction
    residual = np.sqrt(((offset[None] - closest) ** 2).sum(-1))
    return alpha, residual


def estimate_background(frame: np.ndarray, config: ShapesDetectorConfig) -> np.ndarray:
    """(H, W, 3) float background colour: the median, then a local mean of the pixels it explains."""
    height, width = frame.shape[:2]
    median = np.median(frame.reshape(-1, 3), axis=0)
    alpha, residual = _mix_projection(frame, np.broadcast_to(median, frame.shape))
    foreground = ((alpha >= 0.2) & (residual <= config.max_residual)).any(axis=0)
    is_background = ndimage.binary_dilation(foreground, iterations=1, border_value=0) == 0
    weight = ndimage.uniform_filter(is_background.astype(np.float64), config.background_window, mode="nearest")
    local = np.stack([ndimage.uniform_filter(frame[..., c] * is_background, config.background_window,
                                             mode="nearest") for c in range(3)], axis=-1)
    # Where the window holds few background pixels, lean on the median.
    blend = np.clip(weight / 0.25, 0.0, 1.0)[..., None]
    local = np.where(weight[..., None] > 1e-6, local / np.maximum(weight[..., None], 1e-6), median)
    return blend * local + (1 - blend) * median


def _render(shape: str, box: np.ndarray, origin: tuple[int, int], size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) coverage of ``shape`` in pixel box ``box`` (xyxy), drawn on the crop at ``origin`` (y, x)."""
    (oy, ox), (h, w) = origin, size_hw
    local = np.asarray([(box[0] - ox) / w, (box[1] - oy) / h, (box[2] - ox) / w, (box[3] - oy) / h])
    return _shape_mask(shape, local, h, w)


def _moment_box(shape: str, area: float, cx: float, cy: float, var_x: float, var_y: float) -> np.ndarray:
    k_x, k_y, centroid_y = _MOMENT_CONSTANTS[shape]
    w = np.sqrt(max(k_x * var_x, 1e-6))
    h = np.sqrt(max(k_y * var_y, 1e-6))
    y0 = cy - centroid_y * h
    return np.asarray([cx - w / 2, y0, cx + w / 2, y0 + h])


def _misfit(shape: str, box: np.ndarray, weights: np.ndarray, origin, size_hw, smoothing: float = 0.0,
            blur: float = 0.0) -> float:
    """L1 distance between the alpha map and the drawn shape (blurred by ``blur`` pixels, as the input may
    be), over the alpha mass; both are smoothed first (``smoothing`` pixels), which averages out pixel noise."""
    drawn = _render(shape, box, origin, size_hw)
    if smoothing > 0:
        weights = ndimage.gaussian_filter(weights, smoothing, mode="constant")
    if smoothing > 0 or blur > 0:
        drawn = ndimage.gaussian_filter(drawn, float(np.hypot(smoothing, blur)), mode="constant")
    return float(np.abs(weights - drawn).sum() / max(weights.sum(), 1e-6))


def _refit_square_box(shape: str, box: np.ndarray, weights: np.ndarray, origin, size_hw, smoothing: float,
                      blur: float) -> tuple[np.ndarray, float]:
    """Fit centre and side of a square box to the alpha map (for components cut by the frame border)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(box[2] - box[0], box[3] - box[1])

    def to_box(params):
        x, y, s = params
        s = abs(s)
        return np.asarray([x - s / 2, y - s / 2, x + s / 2, y + s / 2])

    result = optimize.minimize(lambda p: _misfit(shape, to_box(p), weights, origin, size_hw, smoothing, blur),
                               x0=[cx, cy, side], method="Nelder-Mead",
                               options=dict(xatol=0.02, fatol=1e-4, maxiter=200,
                                            initial_simplex=[[cx, cy, side], [cx + 2, cy, side],
                                                             [cx, cy + 2, side], [cx, cy, side + 3]]))
    return to_box(result.x), float(result.fun)


def _fit_shape(shape: str, area: float, moments: tuple[float, float, float, float], crop: np.ndarray, origin,
               on_border: bool, frame_hw: tuple[int, int], config: "ShapesDetectorConfig") -> tuple[np.ndarray, float]:
    """The box of ``shape`` that best explains the alpha map, and its misfit, over the blurs tried."""
    cx, cy, var_x, var_y = moments
    best = None
    for blur in config.blurs:
        # A Gaussian blur adds its variance to the shape's.
        box = _moment_box(shape, area, cx, cy, max(var_x - blur ** 2, 1.0), max(var_y - blur ** 2, 1.0))
        misfit = _misfit(shape, box, crop, origin, crop.shape, config.fit_smoothing, blur)
        if best is None or misfit < best[1]:
            best = (box, misfit, blur)
    box, misfit, blur = best
    if on_border and _looks_cut(box, frame_hw):  # the moments of a cut shape are biased: fit its box directly
        box, misfit = _refit_square_box(shape, box, crop, origin, crop.shape, config.fit_smoothing, blur)
    return box, misfit


def _looks_cut(box: np.ndarray, frame_hw: tuple[int, int], tolerance: float = 0.03) -> bool:
    """A shape at the border is cut by it when its moment box is not square (the world's boxes are) or
    reaches past the frame; a shape that only touches the border keeps its moment box."""
    width, height = box[2] - box[0], box[3] - box[1]
    outside = box[0] < -0.5 or box[1] < -0.5 or box[2] > frame_hw[1] + 0.5 or box[3] > frame_hw[0] + 0.5
    return outside or abs(np.log(max(width, 1e-6) / max(height, 1e-6))) > tolerance


def detect_frame(frame: np.ndarray, config: ShapesDetectorConfig = ShapesDetectorConfig()) -> list[ShapeDetection]:
    """Every coloured shape in one (H, W, 3) uint8 frame."""
    frame = np.asarray(frame, dtype=np.float64)
    height, width = frame.shape[:2]
    background = estimate_background(frame, config)
    alpha, residual = _mix_projection(frame, background)
    # Residual to the segment, but a pixel far past the colour (alpha > 1) is still that colour's.
    best = np.argmin(residual, axis=0)
    best_alpha = np.take_along_axis(alpha, best[None], 0)[0]
    best_residual = np.take_along_axis(residual, best[None], 0)[0]
    core = (best_alpha >= config.min_alpha) & (best_residual <= config.max_residual)
    labels_per_colour = []
    for index in range(len(_COLOUR_NAMES)):
        labelled, count = ndimage.label(core & (best == index), structure=np.ones((3, 3)))
        labels_per_colour.append((labelled, count))
    all_cores = core.copy()
    detections = []
    for index, name in enumerate(_COLOUR_NAMES):
        labelled, count = labels_per_colour[index]
        if count == 0:
            continue
        weights_full = np.clip(alpha[index], 0.0, 1.0) * (residual[index] <= 2 * config.max_residual)
        for component in range(1, count + 1):
            mask = labelled == component
            support = ndimage.binary_dilation(mask, iterations=config.support_dilation)
            # Other objects' cores (any colour) are not this one's partial pixels.
            support &= ~(all_cores & ~mask)
            # A washed-out object (generated videos) shows only part of its palette colour: its alpha is
            # measured against its own strength, the upper alpha of its core.
            strength = float(np.clip(np.percentile(alpha[index][mask], 90), config.min_alpha, 1.0))
            weights = np.clip(weights_full * support / strength, 0.0, 1.0)
            area = float(weights.sum())
            if area < config.min_area_px:
                continue
            detection = _describe_component(name, mask, weights, frame, background, area, config, (height, width))
            if detection is not None:
                detections.append(detection)
    return detections


def _describe_component(name: str, mask: np.ndarray, weights: np.ndarray, frame: np.ndarray, background: np.ndarray,
                        area: float, config: ShapesDetectorConfig, size_hw: tuple[int, int]) -> ShapeDetection | None:
    height, width = size_hw
    ys, xs = np.nonzero(weights > 0)
    y_lo, y_hi = max(int(ys.min()) - 3, 0), min(int(ys.max()) + 4, height)
    x_lo, x_hi = max(int(xs.min()) - 3, 0), min(int(xs.max()) + 4, width)
    crop = weights[y_lo:y_hi, x_lo:x_hi]
    origin, crop_hw = (y_lo, x_lo), crop.shape
    grid_y, grid_x = np.mgrid[y_lo:y_hi, x_lo:x_hi] + 0.5   # pixel centres
    cx = float((crop * grid_x).sum() / area)
    cy = float((crop * grid_y).sum() / area)
    var_x = float((crop * (grid_x - cx) ** 2).sum() / area)
    var_y = float((crop * (grid_y - cy) ** 2).sum() / area)
    on_border = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    boxes, misfits = {}, {}
    for shape in SHAPES:
        boxes[shape], misfits[shape] = _fit_shape(shape, area, (cx, cy, var_x, var_y), crop, origin, on_border,
                                                  size_hw, config)
    misfit_values = np.asarray([misfits[s] for s in SHAPES])
    shape_probs = _softmax(-misfit_values / config.shape_temperature)
    best_shape = SHAPES[int(np.argmin(misfit_values))]
    # The object's colour: the hue of its inner pixels against the palette's hues. Hue survives fading and
    # desaturation (generated videos) and mixing with a grey background (blur).
    inner = mask & (weights >= 0.8)
    hue = _mean_hue(frame[inner if inner.any() else mask])
    distance = np.abs((_PALETTE_HUES - hue + 180.0) % 360.0 - 180.0)
    colour_probs = _softmax(-distance ** 2 / (2 * config.hue_sigma_degrees ** 2))
    quality = float(np.clip(1.0 - misfits[best_shape], 0.0, 1.0))
    # What is visible, as an object detector reports it: a shape cut by the border ends at the border.
    box = np.clip(boxes[best_shape], 0.0, [width, height, width, height])
    return ShapeDetection(box_xyxy_px=tuple(float(v) for v in box), colour=name,
                          colour_probs=dict(zip(_COLOUR_NAMES, (float(p) for p in colour_probs))),
                          shape=best_shape, shape_probs=dict(zip(SHAPES, (float(p) for p in shape_probs))),
                          quality=quality, area_px=area)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


# --------------------------------------------------------------------------------------------
# The stage-2 detector interface


@dataclass(frozen=True)
class ShapesDetector:
    """The shapes detector with the attributes the stage-2 evaluation reads from an OWL detector."""

    config: ShapesDetectorConfig = field(default_factory=ShapesDetectorConfig)
    batch_size: int = 32
    kind: str = SHAPES_DETECTOR_KIND
    random_weights: bool = False
    device: str = "cpu"

    @property
    def identity(self) -> str:
        """Names the algorithm and its settings, for the detection cache."""
        settings = json.dumps(asdict(self.config), sort_keys=True)
        return f"shapes-detector-v1#{hashlib.sha1(settings.encode()).hexdigest()[:12]}"

    def detect(self, requests: Sequence[DetectionRequest]) -> list[list[VideoDetections]]:
        """What ``utils.eval.detector.run_detector`` returns for an OWL detector (it calls this)."""
        return run_shapes_detector(self, requests)


def build_shapes_detector(batch_size: int = 32, config: ShapesDetectorConfig | None = None) -> ShapesDetector:
    return ShapesDetector(config=config or ShapesDetectorConfig(), batch_size=batch_size)


def run_shapes_detector(detector: ShapesDetector,
                        requests: Sequence[DetectionRequest]) -> list[list[VideoDetections]]:
    """``utils.eval.detector.run_detector`` for the shapes detector: ``result[i][j]`` is request i,
    query set j (every component, unthresholded; frames with fewer components are padded with
    zero-score, zero-size boxes, which no threshold above 0 keeps)."""
    outputs = []
    for request in requests:
        per_frame = [detect_frame(frame, detector.config) for frame in request.frames]
        height, width = request.frames.shape[1:3]
        most = max((len(d) for d in per_frame), default=0) or 1
        video_outputs = []
        for queries in request.query_sets:
            boxes = np.zeros((len(per_frame), most, 4), dtype=np.float32)
            scores = np.zeros((len(per_frame), most), dtype=np.float32)
            labels = np.zeros((len(per_frame), most), dtype=np.int64)
            for f, detections in enumerate(per_frame):
                for i, detection in enumerate(detections):
                    query_scores = score_queries(detection, queries)
                    labels[f, i] = int(np.argmax(query_scores))
                    scores[f, i] = float(query_scores[labels[f, i]])
                    boxes[f, i] = detection.box_xyxy_px
            video_outputs.append(VideoDetections(
                queries=tuple(queries), frame_indices=tuple(request.frame_indices), num_frames=request.num_frames,
                height=int(height), width=int(width), boxes_xyxy_px=boxes, scores=scores, labels=labels))
        outputs.append(video_outputs)
    return outputs
