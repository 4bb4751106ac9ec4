"""A rule-based planner for the shapes world: a caption in `shapes.world`'s grammar -> its layout, as the
published LLM reply text (stage 1 without an LLM).

`parse_caption` reads a caption into a :class:`CaptionPlan` (task, object kinds, motion words, background);
`plan_scene` lays it out the way `shapes.world` draws its training videos (the same box sizes, paths,
corners and keyframes, from the world's own path functions), deterministically: the random choices (sizes,
positions, jitter) come from a generator seeded by the caption and the occurrence. Unlike the training
scenes, planned objects never overlap and never leave the frame, so a perfect video of the plan passes
its check. `format_reply` writes the plan in the v0.1 reply grammar (integer pixel xywh on the 512
canvas), which `utils.layout.parse_layout` reads back.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from shapes import world
from shapes.world import (CORNERS, DIRECTIONS, NUMBER_WORDS, Scene, ShapeObject, _box_at,
                          _clamp_centre, _jitter, _line, _mix, _place_apart, _random_size, _static)
from utils.layout import CANVAS_SIZE, Box, SceneLayout, format_layout_text, normalize_prompt
from utils.predicates import (LEFT_TO_RIGHT, RIGHT_TO_LEFT, AttributionCheck, Check, DynamicSpatialCheck,
                              NumeracyCheck, SequentialCheck, VisibilityCheck)

PLANNER_NAME = "rule-based"   # the --model name of its cache: cache_shapes_v0.1_rule-based.json

_COLOUR = "(" + "|".join(world.COLOURS) + ")"
_SHAPE = "(" + "|".join(world.SHAPES) + ")"
_CORNER = "(" + "|".join(CORNERS) + ")"
_DIRECTION_WORDS = "(" + "|".join(sorted({w for pair in DIRECTIONS for w in pair}, key=len, reverse=True)) + ")"
_BACKGROUND_SUFFIX = re.compile(r"^(?P<caption>.+) on a (?P<background>" + "|".join(world.BACKGROUNDS)
                                + r") background$")
_PATTERNS = {
    "numeracy": re.compile(rf"^(a|{'|'.join(NUMBER_WORDS[1:])}) {_COLOUR} {_SHAPE}(s?)$"),
    "attribution": re.compile(rf"^a {_COLOUR} {_SHAPE} and a {_COLOUR} {_SHAPE}$"),
    "visibility": re.compile(rf"^a {_COLOUR} {_SHAPE} that (appears|disappears) halfway through$"),
    "passing": re.compile(rf"^a {_COLOUR} {_SHAPE} moving from the (left|right) of a {_COLOUR} {_SHAPE} "
                          r"to its (left|right)$"),
    "motion": re.compile(rf"^a {_COLOUR} {_SHAPE} moving from the {_DIRECTION_WORDS} to the {_DIRECTION_WORDS}$"),
    "sequential": re.compile(rf"^a {_COLOUR} {_SHAPE} moving from the {_CORNER} to the {_CORNER}, "
                             rf"then to the {_CORNER}$"),
}
_TASK_OF_PATTERN = {"numeracy": "numeracy", "attribution": "attribution", "visibility": "visibility",
                    "passing": "dynamic_spatial", "motion": "dynamic_spatial", "sequential": "sequential"}


class CaptionParseError(ValueError):
    """The caption is not in the shapes world's grammar (`shapes.world.CAPTION_TEMPLATES`)."""


@dataclass(frozen=True)
class CaptionPlan:
    """What a caption asks for. ``kinds`` are (colour, shape) per object, in caption order."""

    caption: str
    task: str
    kind: str                               # the caption family: a key of _PATTERNS
    kinds: tuple[tuple[str, str], ...]
    background: str | None                  # named in the caption, else None
    appears: bool | None = None             # visibility
    motion: tuple[str, str] | None = None   # motion / passing: (start words, end words)
    corners: tuple[str, str, str] | None = None  # sequential


def parse_caption(caption: str) -> CaptionPlan:
    """Read a caption of the shapes grammar; raises :class:`CaptionParseError` for anything else."""
    text = normalize_prompt(caption)
    background = None
    match = _BACKGROUND_SUFFIX.match(text)
    if match:
        text, background = match["caption"], match["background"]
    for kind, pattern in _PATTERNS.items():
        found = pattern.match(text)
        if found is None:
            continue
        groups = found.groups()
        task = _TASK_OF_PATTERN[kind]
        if kind == "numeracy":
            word, colour, shape, plural = groups
            count = 1 if word == "a" else NUMBER_WORDS.index(word)
            if (count == 1) != (plural == ""):
                break
            return CaptionPlan(caption, task, kind, ((colour, shape),) * count, background)
        if kind == "attribution":
            return CaptionPlan(caption, task, kind, ((groups[0], groups[1]), (groups[2], groups[3])), background)
        if kind == "visibility":
            return CaptionPlan(caption, task, kind, ((groups[0], groups[1]),), background,
                               appears=groups[2] == "appears")
        if kind == "passing":
            start, end = groups[2], groups[5]
            if start == end:
                break
            return CaptionPlan(caption, task, kind, ((groups[0], groups[1]), (groups[3], groups[4])), background,
                               motion=(start, end))
        if kind == "motion":
            if (groups[2], groups[3]) not in DIRECTIONS:
                break
            return CaptionPlan(caption, task, kind, ((groups[0], groups[1]),), background,
                               motion=(groups[2], groups[3]))
        if kind == "sequential":
            return CaptionPlan(caption, task, kind, ((groups[0], groups[1]),), background,
                               corners=(groups[2], groups[3], groups[4]))
    raise CaptionParseError(f"caption {caption!r} is not in the shapes grammar; expected e.g. 'three red circles', "
                            "'a red circle and a blue square', 'a green square that appears halfway through', "
                            "'a yellow triangle moving from the left to the right', 'a blue circle moving from "
                            "the lower left to the lower right, then to the upper right', optionally followed "
                            "by 'on a <white|black|gray|beige> background'")


def detector_query(colour: str, shape: str) -> str:
    """The benchmark's detector query for a kind, in the LVD benchmark's form: 'a photo of a red circle'."""
    return f"a photo of {world.a_phrase(colour, shape)}"


def build_check(caption: str) -> Check | None:
    """The benchmark check of a caption, from the LVD check families; None for vertical and diagonal motion,
    which no check judges (they judge left/right only)."""
    plan = parse_caption(caption)
    names = tuple(f"{colour} {shape}" for colour, shape in plan.kinds)
    queries = tuple(dict.fromkeys(detector_query(*kind) for kind in plan.kinds))
    if plan.kind == "numeracy":
        return NumeracyCheck(names[0], len(names), queries)
    if plan.kind == "attribution":
        return AttributionCheck(names, queries)
    if plan.kind == "visibility":
        return VisibilityCheck(names[0], plan.appears, queries)
    if plan.kind in ("motion", "passing"):
        direction = {("left", "right"): LEFT_TO_RIGHT, ("right", "left"): RIGHT_TO_LEFT}.get(plan.motion)
        return None if direction is None else DynamicSpatialCheck(names, direction, queries)
    return SequentialCheck(names[0], plan.corners, queries)


def plan_rng(caption: str, occurrence: int = 0) -> np.random.Generator:
    """The planner's generator for one (caption, occurrence): the same caption always gets the same plan."""
    return np.random.default_rng([zlib.crc32(normalize_prompt(caption).encode("utf-8")), occurrence])


def _apart(a: tuple[float, float], size_a: float, b: tuple[float, float], size_b: float, margin: float = 0.02) -> bool:
    return (abs(a[0] - b[0]) > (size_a + size_b) / 2 + margin) or (abs(a[1] - b[1]) > (size_a + size_b) / 2 + margin)


def _objects(plan: CaptionPlan, rng: np.random.Generator) -> list[ShapeObject]:
    """Keyframes per object, drawn like shapes.world's samplers of the caption's family."""
    kinds = plan.kinds
    if plan.kind in ("numeracy", "attribution"):
        scale = 0.85 if len(kinds) > 2 else 1.0
        sizes = [_random_size(rng) * scale for _ in kinds]
        centres = _place_apart(rng, sizes)
        return [ShapeObject(shape, colour, _static(c, s)) for (colour, shape), c, s in zip(kinds, centres, sizes)]
    if plan.kind == "visibility":
        (colour, shape), = kinds
        size = _random_size(rng)
        centre = (float(rng.uniform(size / 2, 1 - size / 2)), float(rng.uniform(size / 2, 1 - size / 2)))
        drift = (_jitter(rng, 0.06), _jitter(rng, 0.06))
        end = (_clamp_centre(centre[0] + drift[0], size), _clamp_centre(centre[1] + drift[1], size))
        boxes = _line(centre, end, size)
        half = len(boxes) // 2
        keyframes = tuple(box if (index >= half) == plan.appears else None for index, box in enumerate(boxes))
        return [ShapeObject(shape, colour, keyframes)]
    if plan.kind == "motion":
        (colour, shape), = kinds
        start, end = DIRECTIONS[plan.motion]
        size = _random_size(rng)
        free = float(rng.uniform(size / 2 + 0.05, 1 - size / 2 - 0.05))
        start = tuple(free if v is None else _clamp_centre(v + _jitter(rng, 0.04), size) for v in start)
        end = tuple(_clamp_centre(free + _jitter(rng, 0.05), size) if v is None
                    else _clamp_centre(v + _jitter(rng, 0.04), size) for v in end)
        return [ShapeObject(shape, colour, _line(start, end, size))]
    if plan.kind == "passing":
        mover, other = kinds
        sizes = [_random_size(rng), _random_size(rng)]
        # Lanes as the world's, but far enough apart that the two never touch when they pass.
        while True:
            lane_y = [float(rng.uniform(0.2, 0.45)), float(rng.uniform(0.55, 0.8))]
            if lane_y[1] - lane_y[0] > (sizes[0] + sizes[1]) / 2 + 0.02:
                break
        if rng.integers(2):
            lane_y.reverse()
        x_start, x_end = (0.15, 0.85) if plan.motion == ("left", "right") else (0.85, 0.15)
        x_start, x_end = _clamp_centre(x_start, sizes[0]), _clamp_centre(x_end, sizes[0])
        other_x = 0.5 + _jitter(rng, 0.08)
        other_end = other_x - (x_end - x_start) * float(rng.uniform(0.0, 0.25))
        return [ShapeObject(mover[1], mover[0], _line((x_start, lane_y[0]), (x_end, lane_y[0]), sizes[0])),
                ShapeObject(other[1], other[0], _line((other_x, lane_y[1]), (other_end, lane_y[1]), sizes[1]))]
    if plan.kind == "sequential":
        (colour, shape), = kinds
        size = _random_size(rng)
        points = [tuple(_clamp_centre(v + _jitter(rng, 0.04), size) for v in CORNERS[name]) for name in plan.corners]
        # As the world: keyframe 0 at the first corner, 3 at the second (the check's middle frame), 5 at the third.
        path = [points[0], _mix(points[0], points[1], 1 / 3), _mix(points[0], points[1], 2 / 3),
                points[1], _mix(points[1], points[2], 0.5), points[2]]
        return [ShapeObject(shape, colour, tuple(_box_at(x, y, size) for x, y in path))]
    raise AssertionError(f"unhandled caption family {plan.kind}")


def _snap(box: Box | None) -> Box | None:
    """The box on integer pixels of the reply's 512 canvas (what the reply text can say exactly)."""
    if box is None:
        return None
    x0, y0 = round(box.x_min * CANVAS_SIZE), round(box.y_min * CANVAS_SIZE)
    w, h = round((box.x_max - box.x_min) * CANVAS_SIZE), round((box.y_max - box.y_min) * CANVAS_SIZE)
    return Box.from_xywh_px((x0, y0, w, h), CANVAS_SIZE)


def plan_scene(caption: str, occurrence: int = 0) -> Scene:
    """The planned scene of a caption (boxes on the reply's pixel grid); raises :class:`CaptionParseError`."""
    plan = parse_caption(caption)
    rng = plan_rng(caption, occurrence)
    objects = _objects(plan, rng)
    background = plan.background or list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]
    objects = [ShapeObject(o.shape, o.colour, tuple(_snap(b) for b in o.keyframes)) for o in objects]
    return Scene(caption=normalize_prompt(caption), task=plan.task, background=background, objects=tuple(objects))


_REASONS = {
    "numeracy": "The caption asks for {n} of one kind; they stand still, apart from each other.",
    "attribution": "Two objects of different kinds stand still, apart from each other, each keeping its colour.",
    "visibility": "The object is absent in the first half and present in the second half.",
    "motion": "The object moves at a constant speed from the {start} to the {end} of the frame.",
    "passing": "The first object moves along its own lane from the {start} of the second object to its {end}; "
               "the second object stays near the middle.",
    "sequential": "The object is at the {first} first, reaches the {second} in the middle of the video and ends "
                  "at the {third}.",
}


def format_reply(scene: Scene) -> str:
    """The scene as an LLM reply in the v0.1 grammar: reasoning, Frame 1-6 (pixel xywh), background keyword."""
    plan = parse_caption(scene.caption)
    if plan.kind == "visibility" and not plan.appears:
        reason = "The object is present in the first half and absent in the second half."
    else:
        words = dict(n=NUMBER_WORDS[len(plan.kinds)])
        if plan.motion:
            words.update(start=plan.motion[0], end=plan.motion[1])
        if plan.corners:
            words.update(first=plan.corners[0], second=plan.corners[1], third=plan.corners[2])
        reason = _REASONS[plan.kind].format(**words)
    layout = scene.layout()
    layout = SceneLayout(prompt=layout.prompt, background=layout.background, tracks=layout.tracks,
                         num_keyframes=layout.num_keyframes,
                         reasoning=f"Reasoning: {reason} Each box is a square about a fifth to a third of the "
                                   "frame wide.")
    return format_layout_text(layout, CANVAS_SIZE)


def plan_reply(caption: str, occurrence: int = 0) -> str:
    """The planner's reply for one occurrence of a caption (what the shipped cache holds)."""
    return format_reply(plan_scene(caption, occurrence))


def build_planner_cache(prompts: list[str]) -> dict[str, list[str]]:
    """A published-format cache of the planner's replies: prompt -> one reply per occurrence in ``prompts``."""
    entries: dict[str, list[str]] = {}
    for prompt in prompts:
        replies = entries.setdefault(normalize_prompt(prompt), [])
        replies.append(plan_reply(prompt, occurrence=len(replies)))
    return entries
