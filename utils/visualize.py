"""Drawing layouts and boxes with PIL: the layout GIF (spec 2.6) and annotated videos (spec 8.2).

Boxes are normalised xyxy; they map onto a frame by fraction (spec 3.1), so a square layout is
stretched onto a 576x320 frame exactly as the generator sees it.

Legibility (beyond the reference's thin pastel lines): every box outline in a track colour has a
1-pixel black rim on both sides, and every label a black border, so boxes read on dark, light and
busy frames alike. Objects that share a phrase are labelled ``phrase #id``. Corners are clipped to
just outside the image, so no finite box (however large) can overflow the drawing code.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.layout import CANVAS_SIZE, SceneLayout, resample_boxes
from utils.video_io import validate_frames, write_gif

LAYOUT_GIF_FRAMES = 24       # spec 2.6: boxes are shown at the default condition length
LAYOUT_MARGIN_PX = 2         # spec 2.6: a 516x516 white image around the 512x512 frame
LAYOUT_LINE_PX = 3
LAYOUT_FONT_PX = 14
TEXT_PANEL_ALPHA = 200       # the prompt panel is drawn over the boxes (as in the reference) but see-through
DETECTION_DASH_PX = 4
RIM_COLOR = (0, 0, 0)        # the rim around track outlines and labels
# Box corners are clipped this many pixels outside the image: far enough that a clipped edge (rim
# included) stays invisible, near enough for the drawing code's integer coordinates.
_CLIP_MARGIN_PX = 64

Color = tuple[int, int, int]


def track_color(index: int) -> Color:
    """Stable RGB colour of track ``index``: ``0.4 + 0.6 * U``, U the first draw of default_rng(index) (spec 2.6)."""
    rgb = 0.4 + 0.6 * np.random.default_rng(index).random((1, 3))[0]
    return tuple(int(round(255 * channel)) for channel in rgb)


@functools.lru_cache(maxsize=8)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: scalable where FreeType is available, else the fixed bitmap font.
    return ImageFont.load_default(size=size_px)


def _wrap_text(text: str, font, max_width_px: float) -> list[str]:
    """Greedy word wrap so each line fits ``max_width_px`` (a single over-long word stays whole)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > max_width_px:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _box_to_pixels(box_xyxy: Sequence[float], width: int, height: int,
                   offset_px: int = 0) -> tuple[int, int, int, int] | None:
    """Inclusive pixel corners of a normalised box on a (height, width) area, or None if it is empty.

    A box [0.25, 0.75] on 64 pixels covers pixels 16..47: the right/bottom edge is exclusive.
    Corners beyond the area are clipped to :data:`_CLIP_MARGIN_PX` outside it (the drawing looks the
    same: those edges are off-image either way); a non-finite box is not drawn.
    """
    x_min, y_min, x_max, y_max = (float(value) for value in box_xyxy)
    if not all(np.isfinite((x_min, y_min, x_max, y_max))):
        return None
    if not (x_max > x_min and y_max > y_min):  # absent (all zeros) or degenerate: not drawn (spec 2.6)
        return None

    def to_px(value: float, size: int) -> float:
        return min(max(value * size, -_CLIP_MARGIN_PX), size + _CLIP_MARGIN_PX)

    left, right = round(to_px(x_min, width)), round(to_px(x_max, width)) - 1
    top, bottom = round(to_px(y_min, height)), round(to_px(y_max, height)) - 1
    return (offset_px + left, offset_px + top, offset_px + max(left, right), offset_px + max(top, bottom))


def compute_track_labels(phrases: Sequence[str], ids: Sequence[int] | None = None) -> list[str]:
    """The label of each track: its phrase, plus ``#id`` when another track has the same phrase.

    ``ids`` are the tracks' object ids (default: their index, which is the id order of a layout).
    """
    ids = list(range(len(phrases))) if ids is None else list(ids)
    if len(ids) != len(phrases):
        raise ValueError(f"expected one id per phrase: {len(phrases)} phrases, {len(ids)} ids")
    counts: dict[str, int] = {}
    for phrase in phrases:
        counts[phrase] = counts.get(phrase, 0) + 1
    return [f"{phrase} #{object_id}" if phrase and counts[phrase] > 1 else phrase
            for phrase, object_id in zip(phrases, ids)]


def _draw_label(draw: ImageDraw.ImageDraw, text: str, anchor_xy: tuple[int, int], font,
                fill: Color, text_fill: Color, above: bool, border: Color | None = None) -> None:
    """A filled label whose left edge is at ``anchor_xy``; above or below the anchor's y."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    label_w, label_h = right - left + 4, bottom - top + 4
    x, y = anchor_xy
    if above:
        y -= label_h
    draw.rectangle((x, y, x + label_w - 1, y + label_h - 1), fill=fill, outline=border)
    draw.text((x + 2 - left, y + 2 - top), text, font=font, fill=text_fill)


def _draw_track_box(draw: ImageDraw.ImageDraw, corners_px: tuple[int, int, int, int], color: Color,
                    phrase: str, font, line_px: int, min_y_px: int = 0) -> None:
    """Outline in the track colour with a black rim on both sides; phrase at the top-left corner (above
    it where there is room), on a label in the track colour with a black border."""
    left, top, right, bottom = corners_px
    # The rim: one black pixel outside the colour band and one inside it (the band is drawn over it).
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), outline=RIM_COLOR, width=line_px + 2)
    draw.rectangle(corners_px, outline=color, width=line_px)
    if phrase:
        label_h = font.getbbox(phrase)[3] + 4
        draw_above = top - 1 - label_h >= min_y_px
        anchor_y = top - 1 if draw_above else top + line_px + 1
        _draw_label(draw, phrase, (left - 1, anchor_y), font, color, (0, 0, 0), above=draw_above,
                    border=RIM_COLOR)


def _draw_dashed_box(draw: ImageDraw.ImageDraw, corners_px: tuple[int, int, int, int], line_px: int) -> None:
    """Dashed outline alternating white and black, visible on any background (detections)."""
    left, top, right, bottom = corners_px
    dash = DETECTION_DASH_PX
    for index, start in enumerate(range(left, right + 1, dash)):
        color = (255, 255, 255) if index % 2 == 0 else (0, 0, 0)
        end = min(start + dash - 1, right)
        draw.rectangle((start, top, end, top + line_px - 1), fill=color)
        draw.rectangle((start, bottom - line_px + 1, end, bottom), fill=color)
    for index, start in enumerate(range(top, bottom + 1, dash)):
        color = (255, 255, 255) if index % 2 == 0 else (0, 0, 0)
        end = min(start + dash - 1, bottom)
        draw.rectangle((left, start, left + line_px - 1, end), fill=color)
        draw.rectangle((right - line_px + 1, start, right, end), fill=color)


def _check_boxes(boxes_xyxy: np.ndarray, phrases: Sequence[str], num_frames: int | None = None) -> np.ndarray:
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes_xyxy.ndim != 3 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"boxes_xyxy: expected shape (tracks, frames, 4), got {boxes_xyxy.shape}")
    if len(phrases) != boxes_xyxy.shape[0]:
        raise ValueError(f"expected one phrase per track: {boxes_xyxy.shape[0]} tracks, {len(phrases)} phrases")
    if num_frames is not None and boxes_xyxy.shape[1] != num_frames:
        raise ValueError(f"boxes_xyxy has {boxes_xyxy.shape[1]} frames, the video has {num_frames}")
    return boxes_xyxy


# --------------------------------------------------------------------------------------------
# Layout GIF (spec 2.6)


def _prompt_panel(prompt: str, background: str, width_px: int) -> Image.Image:
    """RGBA panel with the wrapped prompt (and background keyword) in a see-through white box."""
    font = _font(LAYOUT_FONT_PX)
    text = prompt if not background else f"{prompt}\nBackground: {background}"
    lines = _wrap_text(text, font, width_px - 12)
    line_h = LAYOUT_FONT_PX + 4
    panel_w = min(width_px, int(max(font.getlength(line) for line in lines)) + 12)
    panel = Image.new("RGBA", (panel_w, line_h * len(lines) + 8), (255, 255, 255, TEXT_PANEL_ALPHA))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, 0, panel.width - 1, panel.height - 1), outline=(0, 0, 0, 255))
    for row, line in enumerate(lines):
        draw.text((6, 4 + row * line_h), line, font=font, fill=(0, 0, 0, 255))
    return panel


def render_layout_frames(boxes_xyxy: np.ndarray, phrases: Sequence[str], prompt: str,
                         background: str = "", size: int = CANVAS_SIZE, *,
                         ids: Sequence[int] | None = None) -> np.ndarray:
    """Layout drawn per frame: ``(F, size + 4, size + 4, 3)`` uint8 from ``(tracks, F, 4)`` normalised boxes.

    White image with a 2 px margin, a black frame around the ``size`` x ``size`` canvas, each present
    box as an outline in its track colour with its label (:func:`compute_track_labels` of the phrases
    and object ``ids``), and the wrapped prompt on top.
    """
    boxes_xyxy = _check_boxes(boxes_xyxy, phrases)
    side_px = size + 2 * LAYOUT_MARGIN_PX
    base = Image.new("RGB", (side_px, side_px), (255, 255, 255))
    ImageDraw.Draw(base).rectangle(
        (LAYOUT_MARGIN_PX - 1, LAYOUT_MARGIN_PX - 1, side_px - LAYOUT_MARGIN_PX, side_px - LAYOUT_MARGIN_PX),
        outline=(0, 0, 0))
    panel = _prompt_panel(prompt, background, size)
    colors = [track_color(index) for index in range(len(phrases))]
    labels = compute_track_labels(phrases, ids)
    font = _font(LAYOUT_FONT_PX - 1)

    frames = []
    for frame_index in range(boxes_xyxy.shape[1]):
        image = base.copy()
        draw = ImageDraw.Draw(image)
        for track_index, label in enumerate(labels):
            corners = _box_to_pixels(boxes_xyxy[track_index, frame_index], size, size, LAYOUT_MARGIN_PX)
            if corners is not None:
                _draw_track_box(draw, corners, colors[track_index], label, font, LAYOUT_LINE_PX)
        image.paste(panel, (LAYOUT_MARGIN_PX, LAYOUT_MARGIN_PX), panel)
        frames.append(np.asarray(image))
    if not frames:
        return np.zeros((0, side_px, side_px, 3), dtype=np.uint8)
    return np.stack(frames)


def save_layout_gif(layout: SceneLayout, path: str | os.PathLike, num_frames: int = LAYOUT_GIF_FRAMES) -> None:
    """The layout resampled to ``num_frames`` and saved as a looping GIF, 125 ms per frame (atomic)."""
    boxes_xyxy = resample_boxes(layout, num_frames)  # (tracks, num_frames, 4)
    frames = render_layout_frames(boxes_xyxy, layout.phrases, layout.prompt, layout.background,
                                  ids=[track.id for track in layout.tracks])
    write_gif(frames, path, fps=8.0)


# --------------------------------------------------------------------------------------------
# Annotated videos (spec 8.2, working version)

Detection = tuple[Sequence[float], str, float]  # (normalised xyxy, label, score)


def annotate_video(frames: np.ndarray, boxes_xyxy: np.ndarray, phrases: Sequence[str],
                   detections: Sequence[Sequence[Detection]] | None = None,
                   line_px: int | None = None, *, ids: Sequence[int] | None = None) -> np.ndarray:
    """A copy of ``frames`` (F, H, W, 3) uint8 with layout boxes (tracks, F, 4) and optional detections drawn.

    Layout boxes: outlines in the stable track colours with a black rim, labelled as
    :func:`compute_track_labels` (object ``ids``, default the track index). Detections (one list
    per frame of (xyxy, label, score)): dashed black/white outlines with "label score" inside.
    ``line_px`` defaults to ``max(2, min(H, W) // 128)``.
    """
    validate_frames(frames)
    num_frames, height, width, _ = frames.shape
    boxes_xyxy = _check_boxes(boxes_xyxy, phrases, num_frames)
    if detections is not None and len(detections) != num_frames:
        raise ValueError(f"detections: expected one list per frame ({num_frames}), got {len(detections)}")
    line_px = line_px or max(2, min(height, width) // 128)
    font = _font(max(8, min(height, width) // 24))
    colors = [track_color(index) for index in range(len(phrases))]
    labels = compute_track_labels(phrases, ids)

    annotated = np.empty_like(frames)
    for frame_index in range(num_frames):
        image = Image.fromarray(frames[frame_index])
        draw = ImageDraw.Draw(image)
        for track_index, label in enumerate(labels):
            corners = _box_to_pixels(boxes_xyxy[track_index, frame_index], width, height)
            if corners is not None:
                _draw_track_box(draw, corners, colors[track_index], label, font, line_px)
        for box_xyxy, label, score in (detections[frame_index] if detections is not None else ()):
            corners = _box_to_pixels(box_xyxy, width, height)
            if corners is not None:
                _draw_dashed_box(draw, corners, line_px)
                _draw_label(draw, f"{label} {score:.2f}", (corners[0] + line_px, corners[3] - line_px + 1),
                            font, (0, 0, 0), (255, 255, 255), above=True)
        annotated[frame_index] = np.asarray(image)
    return annotated


COMPARISON_MIN_SIDE_PX = 256   # small videos are enlarged (nearest neighbour) so that a comparison reads
COMPARISON_TITLE_PX = 22


def comparison_scale(height: int, width: int) -> int:
    """The integer factor that enlarges a ``height x width`` video to at least `COMPARISON_MIN_SIDE_PX`."""
    return max(1, -(-COMPARISON_MIN_SIDE_PX // min(height, width)))


def compose_comparison(panels: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Videos side by side, each under its title: ``panels`` of (title, (F, H, W, 3) uint8).

    Every panel is enlarged by an integer factor (nearest neighbour) to the size of the largest one, which
    is itself enlarged to at least `COMPARISON_MIN_SIDE_PX`. Returns (F, title + H', n * W', 3) uint8.
    """
    for _, frames in panels:
        validate_frames(frames)
    num_frames = {frames.shape[0] for _, frames in panels}
    if len(num_frames) != 1:
        raise ValueError(f"comparison panels must have one frame count, found {sorted(num_frames)}")
    largest = max((frames.shape[1:3] for _, frames in panels), key=lambda hw: hw[0] * hw[1])
    target_h, target_w = (side * comparison_scale(*largest) for side in largest)
    font = _font(COMPARISON_TITLE_PX - 8)
    columns = []
    for title, frames in panels:
        factor = target_h // frames.shape[1]
        if frames.shape[1] * factor != target_h or frames.shape[2] * factor != target_w:
            raise ValueError(f"panel {title!r} of {frames.shape[2]}x{frames.shape[1]} does not enlarge to "
                             f"{target_w}x{target_h} by an integer factor")
        big = frames.repeat(factor, axis=1).repeat(factor, axis=2)
        header = Image.new("RGB", (target_w, COMPARISON_TITLE_PX), "white")
        ImageDraw.Draw(header).text((6, 4), title, fill=(0, 0, 0), font=font)
        header_px = np.broadcast_to(np.asarray(header), (frames.shape[0], COMPARISON_TITLE_PX, target_w, 3))
        columns.append(np.concatenate([header_px, big], axis=1))
    return np.ascontiguousarray(np.concatenate(columns, axis=2))


def draw_layout_video(boxes_xyxy: np.ndarray, phrases: Sequence[str], num_frames: int, height: int,
                      width: int) -> np.ndarray:
    """The layout alone: boxes on a white video of the given size (the third panel of a comparison)."""
    blank = np.full((num_frames, height, width, 3), 255, dtype=np.uint8)
    return annotate_video(blank, boxes_xyxy, phrases)
