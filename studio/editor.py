"""The box editor's state: a JSON-ready dict that the page's widget edits, and its conversions.

State (what ``studio/static/editor.js`` reads and sends back)::

    {"version": 1, "prompt": str, "background": str, "reasoning": str, "num_keyframes": 6,
     "width": 576, "height": 320,              # the video's size: the canvas has its aspect ratio
     "palette": ["#rrggbb", ...],              # track i is drawn in palette[i] (utils.visualize colours)
     "objects": [{"id": 0, "phrase": "bear",
                  "boxes": [[x_min, y_min, x_max, y_max] or null, ...]}]}   # one per keyframe

Boxes are the layout model's normalised xyxy floats, unchanged, so ``layout -> state -> layout`` is
exact. The widget snaps what it moves to the 1/512 grid of the LLM's canvas: such boxes also survive
the reply grammar (pixel xywh) exactly, so a saved cache reply parses back to the same layout.

The layout model (``SceneLayout``) stays the judge of what is a valid layout; this module only checks
the shape of the state and turns it into one, with messages that name the object and the keyframe.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

from studio.backend import (CANVAS_SIZE, MAX_OBJECTS, MAX_PROMPT_CHARS, NUM_KEYFRAMES, Box, ObjectTrack, SceneLayout,
                            validate_layout)

STATE_VERSION = 1
MAX_KEYFRAMES = 64  # the layout model's keyframes (the LLM gives 6)
# A new object starts as a centred box of a quarter of the canvas side, in every keyframe.
DEFAULT_NEW_BOX = (192 / CANVAS_SIZE, 192 / CANVAS_SIZE, 320 / CANVAS_SIZE, 320 / CANVAS_SIZE)


class EditorStateError(ValueError):
    """The editor's state is not a usable layout; the message says where and what."""


def snap_to_canvas(value: float, canvas_size: int = CANVAS_SIZE) -> float:
    """The nearest multiple of 1 / canvas_size (what the widget does to a moved box coordinate)."""
    return round(value * canvas_size) / canvas_size


def layout_to_state(layout: SceneLayout, *, width: int, height: int, palette: Sequence[str] = ()) -> dict:
    """A layout as the editor's state, on a canvas of ``width`` x ``height`` (the video's size)."""
    return {
        "version": STATE_VERSION,
        "prompt": layout.prompt,
        "background": layout.background,
        "reasoning": layout.reasoning,
        "num_keyframes": layout.num_keyframes,
        "width": int(width),
        "height": int(height),
        "palette": list(palette),
        "objects": [{"id": track.id, "phrase": track.phrase,
                     "boxes": [None if box is None else list(box.as_tuple()) for box in track.keyframes]}
                    for track in layout.tracks],
    }


def _where(index: int, obj: Mapping[str, Any]) -> str:
    phrase = obj.get("phrase") if isinstance(obj, Mapping) else None
    object_id = obj.get("id", index) if isinstance(obj, Mapping) else index
    return f"object {_snippet(object_id)}" + (f" ({_snippet(phrase)})" if isinstance(phrase, str) and phrase else "")


def _snippet(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message never echoes a huge input)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EditorStateError(f"{what} must be a finite number, found {_snippet(value)}")
    return float(value)


def validate_state(state: Any) -> list[str]:
    """Check the editor state; raise EditorStateError at the first problem, else return warnings.

    Checked here: the shape (a dict with a prompt, keyframe count and objects), every object's id and
    phrase, one entry per keyframe, at least one box per object, four finite coordinates per box with
    x_min <= x_max and y_min <= y_max. Warnings (allowed, as the layout model allows them): empty boxes
    and boxes that leave the canvas (masks clip them).
    """
    if not isinstance(state, Mapping):
        raise EditorStateError(f"expected the editor state as a JSON object, found {type(state).__name__}; "
                               "plan a layout first")
    prompt = state.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EditorStateError(f"the layout needs a prompt, found {_snippet(prompt)}")
    num_keyframes = state.get("num_keyframes", NUM_KEYFRAMES)
    if isinstance(num_keyframes, bool) or not isinstance(num_keyframes, int) or not 1 <= num_keyframes <= \
            MAX_KEYFRAMES:
        raise EditorStateError(f"num_keyframes must be an integer from 1 to {MAX_KEYFRAMES}, found "
                               f"{_snippet(num_keyframes)}")
    for name in ("prompt", "background", "reasoning"):
        value = state.get(name, "")
        if not isinstance(value, str):
            raise EditorStateError(f"the {name} must be text, found {_snippet(value)}")
        if len(value) > MAX_PROMPT_CHARS:
            raise EditorStateError(f"the {name} has {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    objects = state.get("objects")
    if not isinstance(objects, list):
        raise EditorStateError(f"expected a list of objects, found {type(objects).__name__}")
    if len(objects) > MAX_OBJECTS:
        raise EditorStateError(f"the layout has {len(objects)} objects; at most {MAX_OBJECTS} are accepted")
    warnings = []
    seen_ids: set[int] = set()
    for index, obj in enumerate(objects):
        where = _where(index, obj)
        if not isinstance(obj, Mapping):
            raise EditorStateError(f"object #{index}: expected a dict with id, phrase and boxes, found {_snippet(obj)}")
        object_id = obj.get("id")
        if isinstance(object_id, bool) or not isinstance(object_id, int):
            raise EditorStateError(f"object #{index}: the id must be an integer, found {_snippet(object_id)}")
        if object_id in seen_ids:
            raise EditorStateError(f"{where}: the id {object_id} is used by another object")
        seen_ids.add(object_id)
        phrase = obj.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            raise EditorStateError(f"{where}: the phrase is empty; name the object (e.g. 'a brown bear')")
        if len(phrase) > MAX_PROMPT_CHARS:
            raise EditorStateError(f"object {object_id}: the phrase has {len(phrase)} characters; at most "
                                   f"{MAX_PROMPT_CHARS} are accepted")
        boxes = obj.get("boxes")
        if not isinstance(boxes, list) or len(boxes) != num_keyframes:
            found = len(boxes) if isinstance(boxes, list) else type(boxes).__name__
            raise EditorStateError(f"{where}: expected {num_keyframes} keyframe entries, found {found}")
        if all(box is None for box in boxes):
            raise EditorStateError(f"{where}: the object is in no keyframe; tick at least one or remove it")
        for frame, box in enumerate(boxes):
            if box is None:
                continue
            at = f"{where}, keyframe {frame + 1}"
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise EditorStateError(f"{at}: expected a box [x_min, y_min, x_max, y_max], found {_snippet(box)}")
            x_min, y_min, x_max, y_max = (_number(v, f"{at}: a box coordinate") for v in box)
            if x_max < x_min or y_max < y_min:
                raise EditorStateError(f"{at}: the box is inverted (x_max < x_min or y_max < y_min): xyxy "
                                       f"{[x_min, y_min, x_max, y_max]}")
            if x_max == x_min or y_max == y_min:
                # The layout model accepts empty boxes (published caches hold some); they guide nothing.
                warnings.append(f"{at}: the box is empty, so it guides nothing")
            if min(x_min, y_min) < 0 or max(x_max, y_max) > 1:
                warnings.append(f"{at}: the box leaves the canvas (it is clipped when the masks are made)")
    return warnings


def state_to_layout(state: Mapping[str, Any]) -> SceneLayout:
    """The editor's state as a validated ``SceneLayout`` (raises EditorStateError / LayoutValidationError)."""
    validate_state(state)
    tracks = tuple(
        ObjectTrack(id=obj["id"], phrase=obj["phrase"],
                    keyframes=tuple(None if box is None else Box(*(float(v) for v in box)) for box in obj["boxes"]))
        for obj in state["objects"])
    layout = SceneLayout(prompt=state["prompt"], background=state.get("background", ""), tracks=tracks,
                         num_keyframes=state.get("num_keyframes", NUM_KEYFRAMES),
                         reasoning=state.get("reasoning", "") or "")
    validate_layout(layout)
    return layout


def with_canvas(state: Mapping[str, Any], *, width: int, height: int) -> dict:
    """The same state on another canvas size (the run-model changed)."""
    new_state = copy.deepcopy(dict(state))
    new_state.update(width=int(width), height=int(height))
    return new_state


def _find(state: Mapping[str, Any], object_id: int) -> int:
    for index, obj in enumerate(state["objects"]):
        if obj["id"] == object_id:
            return index
    ids = [obj["id"] for obj in state["objects"]]
    raise EditorStateError(f"no object with id {object_id}; the ids are {ids}")


def set_box(state: Mapping[str, Any], object_id: int, keyframe: int,
            box_xyxy: Sequence[float] | None) -> dict:
    """A copy of the state with object ``object_id``'s box in ``keyframe`` (0-based) replaced."""
    new_state = copy.deepcopy(dict(state))
    obj = new_state["objects"][_find(new_state, object_id)]
    if not 0 <= keyframe < len(obj["boxes"]):
        raise EditorStateError(f"keyframe {keyframe} is out of range 0..{len(obj['boxes']) - 1}")
    obj["boxes"][keyframe] = None if box_xyxy is None else [float(v) for v in box_xyxy]
    return new_state


def move_box(state: Mapping[str, Any], object_id: int, keyframe: int, dx: float, dy: float) -> dict:
    """Shift a box by (dx, dy) canvas fractions, snapped to the 1/512 grid, as the widget's drag does."""
    obj = state["objects"][_find(state, object_id)]
    box = obj["boxes"][keyframe]
    if box is None:
        raise EditorStateError(f"object {object_id} has no box in keyframe {keyframe + 1}")
    dx, dy = snap_to_canvas(dx), snap_to_canvas(dy)
    return set_box(state, object_id, keyframe, [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy])


def add_object(state: Mapping[str, Any], phrase: str) -> dict:
    """A copy with a new object (the next free id) in a centred box in every keyframe."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise EditorStateError("a new object needs a phrase")
    new_state = copy.deepcopy(dict(state))
    next_id = max((obj["id"] for obj in new_state["objects"]), default=-1) + 1
    num_keyframes = new_state.get("num_keyframes", NUM_KEYFRAMES)
    new_state["objects"].append({"id": next_id, "phrase": phrase.strip(),
                                 "boxes": [list(DEFAULT_NEW_BOX) for _ in range(num_keyframes)]})
    return new_state


def remove_object(state: Mapping[str, Any], object_id: int) -> dict:
    new_state = copy.deepcopy(dict(state))
    del new_state["objects"][_find(new_state, object_id)]
    return new_state
