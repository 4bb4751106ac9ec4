"""The shapes world: seeded videos of coloured shapes with exact boxes, captions in the LVD tasks' wording,
and the layout of each video in the project's layout format.

A scene is planned as six keyframes per object (the keyframes of an LLM reply, spec 3.4); its video is
drawn from those keyframes resampled with `utils.layout.resample_keyframes`, so the boxes that guidance
would target are exactly where the shapes are drawn. Everything is a pure function of a
`numpy.random.Generator`: the same seed gives the same scene, video and caption.

Vocabulary: shapes {circle, square, triangle}, colours {red, green, blue, yellow}, backgrounds {white, black,
gray, beige (lightly textured)}. Captions (`CAPTION_TEMPLATES`), one family per LVD task:
numeracy "three red circles", attribution "a red circle and a blue square", visibility "a green square that
appears halfway through", dynamic spatial "a yellow triangle moving from the left to the right" (also
top/bottom, diagonal and "from the left of a blue square to its right"), sequential "a blue circle moving from
the lower left to the lower right, then to the upper right". A caption may end in "on a <bg> background".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from utils.layout import NUM_KEYFRAMES, Box, ObjectTrack, SceneLayout, resample_keyframes

HEIGHT = 64
WIDTH = 64
NUM_FRAMES = 16
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; far from each other and from every background, for the colour detector
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
}
BACKGROUNDS = {  # name -> (RGB, texture amplitude in grey levels)
    "white": ((250, 250, 250), 0),
    "black": ((15, 15, 15), 0),
    "gray": ((128, 128, 128), 0),
    "beige": ((222, 205, 170), 10),
}
TASKS = ("numeracy", "attribution", "visibility", "dynamic_spatial", "sequential")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
# Box side, as a fraction of the frame: 13 to 20 pixels at 64x64.
MIN_SIZE, MAX_SIZE = 0.2, 0.32
# Corners of the sequential task: (caption words, centre).
CORNERS = {
    "upper left": (0.27, 0.27), "upper right": (0.73, 0.27),
    "lower left": (0.27, 0.73), "lower right": (0.73, 0.73),
}
DIRECTIONS = {  # caption words -> (start centre, end centre), a coordinate None where it is drawn at random
    ("left", "right"): ((0.16, None), (0.84, None)),
    ("right", "left"): ((0.84, None), (0.16, None)),
    ("top", "bottom"): ((None, 0.16), (None, 0.84)),
    ("bottom", "top"): ((None, 0.84), (None, 0.16)),
    ("top left", "bottom right"): ((0.18, 0.18), (0.82, 0.82)),
    ("bottom right", "top left"): ((0.82, 0.82), (0.18, 0.18)),
    ("top right", "bottom left"): ((0.82, 0.18), (0.18, 0.82)),
    ("bottom left", "top right"): ((0.18, 0.82), (0.82, 0.18)),
}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object: its shape, colour and keyframe boxes (normalised xyxy; None where absent)."""

    shape: str
    colour: str
    keyframes: tuple[Box | None, ...]

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A caption, its task, a background and the objects that realise it."""

    caption: str
    task: str
    background: str
    objects: tuple[ShapeObject, ...]

    def layout(self) -> SceneLayout:
        """The scene as a layout (what a perfect planner would reply for ``caption``)."""
        tracks = tuple(ObjectTrack(index, obj.phrase, obj.keyframes) for index, obj in enumerate(self.objects))
        return SceneLayout(prompt=self.caption, background=self.background, tracks=tracks,
                           num_keyframes=NUM_KEYFRAMES)


# --------------------------------------------------------------------------------------------
# Captions


def a_phrase(colour: str, shape: str) -> str:
    """'a red circle' (every colour here takes 'a')."""
    return f"a {colour} {shape}"


def numeracy_caption(count: int, colour: str, shape: str) -> str:
    return a_phrase(colour, shape) if count == 1 else f"{NUMBER_WORDS[count]} {colour} {shape}s"


def attribution_caption(first: tuple[str, str], second: tuple[str, str]) -> str:
    return f"{a_phrase(*first)} and {a_phrase(*second)}"


def visibility_caption(colour: str, shape: str, appears: bool) -> str:
    return f"{a_phrase(colour, shape)} that {'appears' if appears else 'disappears'} halfway through"


def motion_caption(colour: str, shape: str, start: str, end: str) -> str:
    return f"{a_phrase(colour, shape)} moving from the {start} to the {end}"


def passing_caption(mover: tuple[str, str], other: tuple[str, str], start: str, end: str) -> str:
    return f"{a_phrase(*mover)} moving from the {start} of {a_phrase(*other)} to its {end}"


def sequential_caption(colour: str, shape: str, corners: Sequence[str]) -> str:
    first, second, third = corners
    return f"{a_phrase(colour, shape)} moving from the {first} to the {second}, then to the {third}"


def with_background(caption: str, background: str) -> str:
    return f"{caption} on a {background} background"


# --------------------------------------------------------------------------------------------
# Paths: keyframe boxes from centres


def _box_at(centre_x: float, centre_y: float, size: float) -> Box:
    half = size / 2
    return Box(centre_x - half, centre_y - half, centre_x + half, centre_y + half)


def _clamp_centre(value: float, size: float) -> float:
    return min(max(value, size / 2), 1 - size / 2)


def _line(start: tuple[float, float], end: tuple[float, float], size: float,
          num_keyframes: int = NUM_KEYFRAMES) -> tuple[Box, ...]:
    """Keyframes moving at constant speed from ``start`` to ``end`` (centres)."""
    return tuple(_box_at(start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t, size)
                 for t in np.linspace(0.0, 1.0, num_keyframes))


def _static(centre: tuple[float, float], size: float, drift: tuple[float, float] = (0.0, 0.0)) -> tuple[Box, ...]:
    return _line(centre, (centre[0] + drift[0], centre[1] + drift[1]), size)


def _jitter(rng: np.random.Generator, amount: float) -> float:
    return float(rng.uniform(-amount, amount))


def _random_size(rng: np.random.Generator) -> float:
    return float(rng.uniform(MIN_SIZE, MAX_SIZE))


def _place_apart(rng: np.random.Generator, sizes: Sequence[float], tries: int = 200) -> list[tuple[float, float]]:
    """Centres for boxes of ``sizes`` that do not overlap (up to 4 boxes of at most MAX_SIZE always fit)."""
    for _ in range(tries):
        centres = [(float(rng.uniform(s / 2, 1 - s / 2)), float(rng.uniform(s / 2, 1 - s / 2))) for s in sizes]
        if all(abs(a[0] - b[0]) > (sa + sb) / 2 + 0.02 or abs(a[1] - b[1]) > (sa + sb) / 2 + 0.02
               for i, (a, sa) in enumerate(zip(centres, sizes))
               for b, sb in zip(centres[i + 1:], sizes[i + 1:])):
            return centres
    # A grid of quadrants always fits (MAX_SIZE < 0.5).
    quadrants = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    order = rng.permutation(len(quadrants))
    return [quadrants[i] for i in order[:len(sizes)]]


# --------------------------------------------------------------------------------------------
# Scenes per task


def _random_kind(rng: np.random.Generator, exclude: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
    while True:
        kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if kind not in exclude:
            return kind


def _numeracy(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colour, shape = _random_kind(rng)
    sizes = [_random_size(rng) * (0.85 if count > 2 else 1.0) for _ in range(count)]
    centres = _place_apart(rng, sizes)
    objects = [ShapeObject(shape, colour, _static(c, s, (_jitter(rng, 0.04), _jitter(rng, 0.04))))
               for c, s in zip(centres, sizes)]
    return numeracy_caption(count, colour, shape), objects


def _attribution(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    first = _random_kind(rng)
    second = _random_kind(rng, exclude=[first])
    while second[0] == first[0] and second[1] == first[1]:
        second = _random_kind(rng, exclude=[first])
    sizes = [_random_size(rng), _random_size(rng)]
    centres = _place_apart(rng, sizes)
    objects = [ShapeObject(kind[1], kind[0], _static(c, s, (_jitter(rng, 0.05), _jitter(rng, 0.05))))
               for kind, c, s in zip((first, second), centres, sizes)]
    return attribution_caption(first, second), objects


def _visibility(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    colour, shape = _random_kind(rng)
    appears = bool(rng.integers(2))
    size = _random_size(rng)
    centre = (float(rng.uniform(size / 2, 1 - size / 2)), float(rng.uniform(size / 2, 1 - size / 2)))
    boxes = _static(centre, size, (_jitter(rng, 0.06), _jitter(rng, 0.06)))
    half = NUM_KEYFRAMES // 2
    keyframes = tuple(box if (index >= half) == appears else None for index, box in enumerate(boxes))
    return visibility_caption(colour, shape, appears), [ShapeObject(shape, colour, keyframes)]


def _motion(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    colour, shape = _random_kind(rng)
    (start_words, end_words), (start, end) = list(DIRECTIONS.items())[int(rng.integers(len(DIRECTIONS)))]
    size = _random_size(rng)
    free = float(rng.uniform(size / 2 + 0.05, 1 - size / 2 - 0.05))
    start = tuple(free if v is None else _clamp_centre(v + _jitter(rng, 0.04), size) for v in start)
    end = tuple(free + _jitter(rng, 0.05) if v is None else _clamp_centre(v + _jitter(rng, 0.04), size)
                for v in end)
    objects = [ShapeObject(shape, colour, _line(start, end, size))]
    return motion_caption(colour, shape, start_words, end_words), objects


def _passing(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    """One object passes another, which stands still or drifts the other way."""
    mover = _random_kind(rng)
    other = _random_kind(rng, exclude=[mover])
    left_to_right = bool(rng.integers(2))
    sizes = [_random_size(rng), _random_size(rng)]
    lane_y = [float(rng.uniform(0.2, 0.45)), float(rng.uniform(0.55, 0.8))]
    if rng.integers(2):
        lane_y.reverse()
    x_start, x_end = (0.15, 0.85) if left_to_right else (0.85, 0.15)
    other_x = 0.5 + _jitter(rng, 0.08)
    other_drift = -(x_end - x_start) * float(rng.uniform(0.0, 0.25))
    objects = [
        ShapeObject(mover[1], mover[0], _line((x_start, lane_y[0]), (x_end, lane_y[0]), sizes[0])),
        ShapeObject(other[1], other[0], _line((other_x, lane_y[1]), (other_x + other_drift, lane_y[1]), sizes[1])),
    ]
    start, end = ("left", "right") if left_to_right else ("right", "left")
    return passing_caption(mover, other, start, end), objects


def _sequential(rng: np.random.Generator) -> tuple[str, list[ShapeObject]]:
    colour, shape = _random_kind(rng)
    names = list(CORNERS)
    first = names[int(rng.integers(4))]
    # The second corner shares a side with the first; the third shares the other side with the second.
    neighbours = [n for n in names if n != first and len(set(n.split()) & set(first.split())) == 1]
    second = neighbours[int(rng.integers(2))]
    third = next(n for n in names if n not in (first, second) and len(set(n.split()) & set(second.split())) == 1)
    size = _random_size(rng)
    points = [tuple(_clamp_centre(v + _jitter(rng, 0.04), size) for v in CORNERS[name])
              for name in (first, second, third)]
    # Six keyframes: 0 at the first corner, 3 at the second (the predicate's middle frame), 5 at the third.
    path = [points[0], _mix(points[0], points[1], 1 / 3), _mix(points[0], points[1], 2 / 3),
            points[1], _mix(points[1], points[2], 0.5), points[2]]
    keyframes = tuple(_box_at(x, y, size) for x, y in path)
    return sequential_caption(colour, shape, (first, second, third)), [ShapeObject(shape, colour, keyframes)]


def _mix(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


_DYNAMIC_SPATIAL = (_motion, _passing)
_TASK_SAMPLERS = {
    "numeracy": (_numeracy,),
    "attribution": (_attribution,),
    "visibility": (_visibility,),
    "dynamic_spatial": _DYNAMIC_SPATIAL,
    "sequential": (_sequential,),
}


def sample_scene(rng: np.random.Generator, task: str | None = None, *, background: str | None = None,
                 background_in_caption: bool | None = None) -> Scene:
    """A random scene of ``task`` (None: uniform over `TASKS`) on ``background`` (None: uniform).

    ``background_in_caption`` appends "on a <bg> background" (None: with probability 1/2).
    """
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    if task not in _TASK_SAMPLERS:
        raise ValueError(f"unknown shapes task {task!r}; expected one of {', '.join(TASKS)}")
    samplers = _TASK_SAMPLERS[task]
    caption, objects = samplers[int(rng.integers(len(samplers)))](rng)
    if background is None:
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    elif background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {', '.join(BACKGROUNDS)}")
    if background_in_caption is None:
        background_in_caption = bool(rng.integers(2))
    if background_in_caption:
        caption = with_background(caption, background)
    return Scene(caption=caption, task=task, background=background, objects=tuple(objects))


# --------------------------------------------------------------------------------------------
# Rendering

SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth edges, sub-pixel motion


def scene_boxes(scene: Scene, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """(objects, num_frames, 4) normalised xyxy, zeros where absent: the layout's boxes at ``num_frames``."""
    if not scene.objects:
        return np.zeros((0, num_frames, 4))
    return np.stack([resample_keyframes(obj.keyframes, num_frames) for obj in scene.objects])


def _shape_mask(shape: str, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width) float coverage of ``shape`` inscribed in ``box`` (normalised xyxy)."""
    big_h, big_w = height * SUPERSAMPLE, width * SUPERSAMPLE
    ys = (np.arange(big_h) + 0.5) / big_h
    xs = (np.arange(big_w) + 0.5) / big_w
    x0, y0, x1, y1 = box
    u = (xs[None, :] - x0) / max(x1 - x0, 1e-6)   # 0..1 across the box
    v = (ys[:, None] - y0) / max(y1 - y0, 1e-6)
    if shape == "square":
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    elif shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        inside = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def render_background(name: str, height: int, width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(height, width, 3) float background; textured ones draw their fixed texture from ``rng``."""
    rgb, amplitude = BACKGROUNDS[name]
    canvas = np.broadcast_to(np.asarray(rgb, dtype=np.float64), (height, width, 3)).copy()
    if amplitude:
        rng = rng if rng is not None else np.random.default_rng(0)
        # Low-frequency texture: noise on a coarse grid, upsampled by repetition, the same in every frame.
        coarse = rng.uniform(-amplitude, amplitude, size=(math.ceil(height / 4), math.ceil(width / 4), 1))
        canvas += np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:height, :width]
    return canvas


def render_video(scene: Scene, *, height: int = HEIGHT, width: int = WIDTH, num_frames: int = NUM_FRAMES,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene's video, (num_frames, height, width, 3) uint8; objects drawn in order (later on top)."""
    background = render_background(scene.background, height, width, rng)
    boxes = scene_boxes(scene, num_frames)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for frame_index in range(num_frames):
        canvas = background.copy()
        for obj, track in zip(scene.objects, boxes):
            box = track[frame_index]
            if not box.any():
                continue
            coverage = _shape_mask(obj.shape, box, height, width)[..., None]
            canvas = canvas * (1 - coverage) + np.asarray(COLOURS[obj.colour], dtype=np.float64) * coverage
        frames[frame_index] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames


def sample_video(seed: int, task: str | None = None, *, height: int = HEIGHT, width: int = WIDTH,
                 num_frames: int = NUM_FRAMES, **scene_options) -> tuple[Scene, np.ndarray]:
    """A scene and its video from one integer seed (the training set's item ``seed``); the scene does not depend
    on the video's size or length."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, task, **scene_options)
    return scene, render_video(scene, height=height, width=width, num_frames=num_frames, rng=rng)
