"""Dynamic scene layouts (DSLs): the one place that parses, validates, resamples and serialises them.

An LLM reply in the v0.1 grammar (reference spec 2.3) looks like::

    Reasoning: <free text>
    Frame 1: [{'id': 0, 'name': 'bear', 'box': [0, 256, 100, 100]}]
    ...
    Frame 6: [...]
    Background keyword: forest

Boxes are pixel xywh on a 512x512 canvas. Everything downstream takes a :class:`SceneLayout`
(keyframes as normalised xyxy boxes) or a :class:`LayoutCondition` (boxes resampled to the video's
frame count, the diffusion prompt and the CLIP token positions of every phrase), never a raw dict.

Faithfulness notes (reference spec 14): the parser reproduces the reference's segmentation,
including tolerance of ``# comments`` and ``" - "`` suffixes; boxes outside the canvas and empty
boxes are kept as they are (the published caches contain them, and masks clip them later);
keyframe resampling, prompt construction and token positions follow spec 3.2-3.4 exactly.
"""
from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CANVAS_SIZE = 512
NUM_KEYFRAMES = 6
FRAME_LABELS = tuple(f"Frame {i}" for i in range(1, NUM_KEYFRAMES + 1))
BACKGROUND_LABEL = "Background keyword"
CLIP_MAX_TOKENS = 77
SNIPPET_CHARS = 160
# Characters stripped around each section of a reply (spec 2.3).
_SECTION_STRIP = " \t\n`"
# Characters stripped from phrase ends for refinement and evaluation (spec 3.2, 3.5).
_PHRASE_END_STRIP = "0123456789 "
# How far a box may reach beyond the canvas, in canvas sizes (normalised units). The published caches
# stay within [-0.08, 1.3]; a box far outside means nothing to the guidance, and huge values break
# rasterisation (int64 corners) and fp16 GLIGEN inputs.
MAX_BOX_OVERHANG = 1.0
# An object name is a short noun phrase; the published caches' longest is 13 characters.
MAX_PHRASE_CHARS = 100
# Unicode categories a name must not contain: control, format (zero-width, bidi), surrogate, private use,
# unassigned, line and paragraph separators. The diffusion prompt cannot locate such a name's tokens.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


# --------------------------------------------------------------------------------------------
# Errors


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LayoutError(ValueError):
    """A layout could not be built. The message names the prompt, the place and the text."""

    def __init__(self, problem: str, *, prompt: str | None = None, where: str | None = None,
                 text: str | None = None):
        self.problem = problem
        self.prompt = prompt
        self.where = where
        self.text = text
        parts = []
        if prompt is not None:
            parts.append(f"prompt {prompt!r}")
        if where:
            parts.append(where)
        message = (": ".join([", ".join(parts), problem]) if parts else problem)
        if text is not None:
            message += f" (text: {_snippet(text)!r})"
        super().__init__(message)


class LayoutParseError(LayoutError):
    """The LLM text does not follow the reply grammar (missing label, not a Python literal, ...)."""


class LayoutValidationError(LayoutError):
    """The text parses, but the layout is wrong (bad box, bad id, phrase not in the prompt, ...)."""


# --------------------------------------------------------------------------------------------
# Typed layout


@dataclass(frozen=True)
class Box:
    """A box in normalised ``[x_min, y_min, x_max, y_max]`` coordinates (may leave [0, 1])."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @classmethod
    def from_xywh_px(cls, box_xywh_px: Sequence[float],
                     canvas_size: int | tuple[int, int] = CANVAS_SIZE) -> "Box":
        """Pixel xywh -> normalised xyxy; ``canvas_size`` is a side or ``(width, height)``."""
        width, height = (canvas_size, canvas_size) if isinstance(canvas_size, int) else canvas_size
        x, y, w, h = (float(v) for v in box_xywh_px)
        # The reference adds the normalised size to the normalised origin (spec 3.1); computing
        # (x + w) / size instead can differ in the last bit.
        return cls(x / width, y / height, x / width + w / width, y / height + h / height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x_min, self.y_min, self.x_max, self.y_max)


@dataclass(frozen=True)
class ObjectTrack:
    """One object across the keyframes. ``keyframes[k]`` is None where the object is absent."""

    id: int
    phrase: str
    keyframes: tuple[Box | None, ...]

    @property
    def keyframe_indices(self) -> tuple[int, ...]:
        return tuple(i for i, box in enumerate(self.keyframes) if box is not None)


@dataclass(frozen=True)
class SceneLayout:
    """A dynamic scene layout: the caption, a background keyword and object tracks over keyframes."""

    prompt: str
    background: str
    tracks: tuple[ObjectTrack, ...]
    num_keyframes: int = NUM_KEYFRAMES
    reasoning: str = ""

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(track.phrase for track in self.tracks)


@dataclass(frozen=True)
class LayoutCondition:
    """What the generator and the predicates consume (spec 3.5)."""

    prompt: str                     # the diffusion prompt P, background and "| phrase" suffixes included
    boxes_xyxy: np.ndarray          # (tracks, frames, 4) float64, exact zeros where absent
    phrases: tuple[str, ...]
    token_positions: tuple[tuple[int, ...], ...] | None  # CLIP token indices per phrase (BOS = 0)
    token_map: tuple[str, ...] | None                   # BPE tokens of the prompt, BOS/EOS included
    layout: SceneLayout | None = None                   # the keyframes the boxes were resampled from

    @property
    def num_frames(self) -> int:
        return int(self.boxes_xyxy.shape[1])

    def boxes_at(self, num_frames: int) -> np.ndarray:
        """(tracks, num_frames, 4) boxes: these, or the keyframes resampled to another frame count (e.g. the
        latent frames of a backbone whose VAE compresses time)."""
        if num_frames == self.num_frames:
            return self.boxes_xyxy
        if self.layout is None:
            raise ValueError(f"prompt {self.prompt!r}: boxes for {num_frames} frames are needed but the condition "
                             f"has {self.num_frames} and no keyframes to resample; build it with build_condition")
        return resample_boxes(self.layout, num_frames)


def normalize_prompt(prompt: str) -> str:
    """The key every stage uses for a prompt: surrounding whitespace and trailing periods removed."""
    return prompt.strip().rstrip(".")


# --------------------------------------------------------------------------------------------
# Parsing


_LITERAL_NODE_TYPES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.UnaryOp,
                       ast.BinOp, ast.UAdd, ast.USub, ast.Add, ast.Sub, ast.Load)


def _describe_literal_error(content: str, error: BaseException) -> str:
    """Why ``ast.literal_eval`` failed, in words: the syntax error and where, or the first non-literal."""
    reason = type(error).__name__
    if isinstance(error, SyntaxError):
        where = f" at line {error.lineno}, column {error.offset}" if error.lineno and error.offset else ""
        return f"{reason}: {error.msg or 'invalid syntax'}{where}"
    if isinstance(error, (MemoryError, RecursionError)):
        return f"{reason}: it is nested too deeply"
    if isinstance(error, ValueError) and str(error).startswith("malformed node"):
        try:
            tree = ast.parse(content, mode="eval")
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if not isinstance(node, _LITERAL_NODE_TYPES):
                segment = ast.get_source_segment(content, node) or type(node).__name__
                return (f"{reason}: {_snippet(segment, 40)!r} is not a literal (names must be quoted strings "
                        f"and boxes plain numbers)")
        return f"{reason}: it holds something other than strings, numbers, lists and dicts"
    return f"{reason}: {_snippet(str(error), 120)}"


def _eval_frame_literal(content: str, *, prompt: str, label: str) -> Any:
    """A frame section -> Python value, with the reference's tolerances (spec 2.3)."""
    content = content.split(" - ")[0]
    if content.startswith("-"):
        content = content[1:].strip()
    try:
        return ast.literal_eval(content)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise LayoutParseError(f"{label} is not a Python list of dicts: {_describe_literal_error(content, error)}",
                               prompt=prompt, where=label, text=content) from None


def split_reply_sections(text: str, *, prompt: str = "",
                         frame_labels: Sequence[str] = FRAME_LABELS) -> tuple[str, list[str], str]:
    """Split a reply into (leading text, frame section strings, background text).

    Follows the reference segmentation: the text after the first ``Frame 1:`` and before any
    second one is scanned for the labels in order; each section is stripped of whitespace and
    backticks. Without a ``Frame 1:`` label the whole text is scanned, as in the reference (the
    first frame is then whatever precedes ``Frame 2:``). Raises :class:`LayoutParseError` naming
    the first label that is missing.
    """
    first = f"{frame_labels[0]}:"
    if first not in text:
        leading, remainder = "", text
        pieces = [leading, remainder]
    else:
        pieces = text.split(first)
        leading, remainder = pieces[0], pieces[1]
    if len(pieces) > 2:
        # Faithful: the reference keeps only the text between the first two occurrences.
        logger.warning("prompt %r: '%s' occurs %d times; text after the second one is ignored",
                       prompt, first, len(pieces) - 1)
    labels = list(frame_labels) + [BACKGROUND_LABEL]
    sections = []
    for label, next_label in zip(labels, labels[1:] + [None]):
        if next_label is None:
            sections.append(remainder.strip(_SECTION_STRIP))
            break
        marker = f"{next_label}:"
        if marker not in remainder:
            raise LayoutParseError(f"reply is incomplete: no '{marker}' label after '{label}:'",
                                   prompt=prompt, where=label, text=remainder)
        content, remainder = remainder.split(marker, 1)
        sections.append(content.strip(_SECTION_STRIP))
    return leading.strip(), sections[:-1], sections[-1]


def parse_layout(text: str, prompt: str, *, frame_labels: Sequence[str] = FRAME_LABELS) -> SceneLayout:
    """Parse an LLM reply (template v0.1 grammar) into a validated :class:`SceneLayout`."""
    prompt = normalize_prompt(prompt)
    if not isinstance(text, str) or not text.strip():
        raise LayoutParseError("the reply is empty", prompt=prompt, text=str(text))
    try:
        leading, frame_sections, background = split_reply_sections(
            text, prompt=prompt, frame_labels=frame_labels)
        frames = [_eval_frame_literal(section, prompt=prompt, label=label)
                  for label, section in zip(frame_labels, frame_sections)]
    except LayoutParseError:
        first = f"{frame_labels[0]}:"
        if first in text:
            raise
        # The reference also reads a reply without the first label (spec 2.3, step 1); when
        # that fails, the missing label is the error worth reporting.
        raise LayoutParseError(f"no '{first}' label found", prompt=prompt, text=text) from None
    return build_layout_from_frames(frames, prompt=prompt, background=background, reasoning=leading,
                                    max_box_overhang=MAX_BOX_OVERHANG)


def _check_number(value: Any, *, what: str, prompt: str, where: str, text: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayoutValidationError(f"{what} must be a number, found {_snippet(repr(value), 60)}", prompt=prompt,
                                    where=where, text=text)
    try:
        number = float(value)
    except OverflowError:  # an int with hundreds of digits
        raise LayoutValidationError(f"{what} is too large: an integer of {len(str(abs(value)))} digits",
                                    prompt=prompt, where=where, text=text) from None
    if not math.isfinite(number):
        raise LayoutValidationError(f"{what} must be finite, found {value!r}", prompt=prompt, where=where,
                                    text=text)
    return number


def _check_box_extent(box: Box, max_overhang: float | None, *, prompt: str | None, where: str,
                      text: str | None = None, canvas_size: int | tuple[int, int] = CANVAS_SIZE) -> None:
    """Reject a box that reaches more than ``max_overhang`` canvases beyond the canvas (None: no limit)."""
    if max_overhang is None:
        return
    low, high = -max_overhang, 1.0 + max_overhang
    if all(low <= value <= high for value in box.as_tuple()):
        return
    width, height = (canvas_size, canvas_size) if isinstance(canvas_size, int) else canvas_size
    xyxy = ", ".join(f"{v:.6g}" for v in box.as_tuple())
    raise LayoutValidationError(
        f"box reaches too far outside the canvas: normalised xyxy ({xyxy}); each edge must lie within "
        f"{max_overhang:g} canvas size(s) of it ([{low * width:g}, {high * width:g}] px across, [{low * height:g}, "
        f"{high * height:g}] px down on the {width}x{height} canvas)", prompt=prompt, where=where, text=text)


def _check_phrase(phrase: Any, *, prompt: str | None, where: str, text: str | None = None) -> None:
    """A name stage 2 can put in the diffusion prompt and locate: short, visible characters only."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutValidationError(f"object needs a non-empty name, found {_snippet(repr(phrase), 60)}",
                                    prompt=prompt, where=where, text=text)
    if len(phrase) > MAX_PHRASE_CHARS:
        raise LayoutValidationError(f"the name is {len(phrase)} characters long ({_snippet(phrase, 40)!r}); an "
                                    f"object name is a short noun phrase of at most {MAX_PHRASE_CHARS} characters",
                                    prompt=prompt, where=where, text=text)
    for char in phrase:
        if unicodedata.category(char) in _INVISIBLE_CATEGORIES:
            raise LayoutValidationError(
                f"the name {phrase!r} contains the invisible or control character U+{ord(char):04X} "
                f"{unicodedata.name(char, '(unnamed)')}", prompt=prompt, where=where, text=text)


def build_layout_from_frames(frames: Sequence[Any], *, prompt: str, background: str | None = "",
                             reasoning: str = "", canvas_size: int | tuple[int, int] = CANVAS_SIZE,
                             max_box_overhang: float | None = None) -> SceneLayout:
    """Frames of ``{id, name, box}`` dicts (pixel xywh) -> a validated :class:`SceneLayout`.

    Shared by the LLM parser and the detector's pseudo-layouts (stage 2), so both stages build
    tracks the same way: by id in order of first appearance, the phrase of the first appearance
    (``keyword`` if ``name`` is missing), the later box when an id repeats within a frame (spec 2.5).
    ``max_box_overhang`` bounds how far a box may reach outside the canvas, in canvas sizes: LLM
    replies use :data:`MAX_BOX_OVERHANG`; detections (boxes of a padded image) have no bound.
    """
    num_keyframes = len(frames)
    phrases: dict[int, str] = {}
    keyframes: dict[int, list[Box | None]] = {}
    for frame_index, objects in enumerate(frames):
        where = f"frame {frame_index + 1}"
        if not isinstance(objects, (list, tuple)):
            raise LayoutValidationError(f"expected a list of objects, found {type(objects).__name__}",
                                        prompt=prompt, where=where, text=repr(objects))
        seen_in_frame: set[int] = set()
        for position, obj in enumerate(objects):
            obj_where = f"{where}, object #{position}"
            if not isinstance(obj, Mapping):
                raise LayoutValidationError(f"expected a dict with 'id', 'name' and 'box', found "
                                            f"{type(obj).__name__}", prompt=prompt, where=obj_where,
                                            text=repr(obj))
            if "id" not in obj or "box" not in obj:
                missing = [key for key in ("id", "box") if key not in obj]
                raise LayoutValidationError(f"object has no {' or '.join(repr(k) for k in missing)}",
                                            prompt=prompt, where=obj_where, text=repr(obj))
            object_id = obj["id"]
            if isinstance(object_id, bool) or not isinstance(object_id, int):
                raise LayoutValidationError(f"'id' must be an integer, found {object_id!r}",
                                            prompt=prompt, where=obj_where, text=repr(obj))
            obj_where = f"{where}, object {object_id}"
            name = obj.get("name", obj.get("keyword"))
            if object_id not in phrases:
                if not isinstance(name, str) or not name.strip():
                    raise LayoutValidationError(f"object needs a non-empty 'name', found {_snippet(repr(name), 60)}",
                                                prompt=prompt, where=obj_where, text=repr(obj))
                _check_phrase(name, prompt=prompt, where=obj_where, text=repr(obj))
                phrases[object_id] = name
                keyframes[object_id] = [None] * num_keyframes
            obj_where = f"{where}, object {object_id} ({phrases[object_id]!r})"
            box = obj["box"]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise LayoutValidationError(f"'box' must be [x, y, width, height], found {box!r}",
                                            prompt=prompt, where=obj_where, text=repr(obj))
            x, y, w, h = (_check_number(v, what="box value", prompt=prompt, where=obj_where, text=repr(obj))
                          for v in box)
            if w < 0 or h < 0:
                raise LayoutValidationError(f"box has a negative size: [x, y, w, h] = {list(box)}",
                                            prompt=prompt, where=obj_where, text=repr(obj))
            if object_id in seen_in_frame:
                logger.warning("prompt %r, %s: id %d appears twice; the later box is used",
                               prompt, where, object_id)
            seen_in_frame.add(object_id)
            box_xyxy = Box.from_xywh_px((x, y, w, h), canvas_size)
            _check_box_extent(box_xyxy, max_box_overhang, prompt=prompt, where=obj_where, text=repr(obj),
                              canvas_size=canvas_size)
            keyframes[object_id][frame_index] = box_xyxy
    tracks = tuple(ObjectTrack(object_id, phrases[object_id], tuple(keyframes[object_id]))
                   for object_id in phrases)
    layout = SceneLayout(prompt=prompt, background=background or "",
                         tracks=tracks, num_keyframes=num_keyframes, reasoning=reasoning)
    validate_layout(layout, max_box_overhang=max_box_overhang)
    return layout


def validate_layout(layout: SceneLayout, *, max_box_overhang: float | None = MAX_BOX_OVERHANG) -> None:
    """Raise :class:`LayoutValidationError` if the layout is not usable.

    Boxes partly outside the canvas and zero-size boxes are accepted, as in the reference: the
    published caches contain them and rasterisation clips them (spec 4.3). Rejected, beyond the
    reference (which crashed later or drew garbage): non-finite boxes, boxes reaching more than
    ``max_box_overhang`` canvases beyond the canvas (None: no bound, for detections), names longer
    than :data:`MAX_PHRASE_CHARS` or with invisible/control characters. Every reply of the published
    caches passes.
    """
    if not isinstance(layout.prompt, str) or not layout.prompt.strip():
        raise LayoutValidationError(f"a layout needs a non-empty prompt, found {layout.prompt!r}")
    if not isinstance(layout.num_keyframes, int) or layout.num_keyframes < 1:
        raise LayoutValidationError(f"a layout needs at least one keyframe, found {layout.num_keyframes!r}",
                                    prompt=layout.prompt)
    ids = [track.id for track in layout.tracks]
    if len(set(ids)) != len(ids):
        raise LayoutValidationError(f"track ids repeat: {ids}", prompt=layout.prompt)
    for track in layout.tracks:
        where = f"object {track.id} ({_snippet(repr(track.phrase), 60)})"
        if not isinstance(track.phrase, str) or not track.phrase.strip():
            raise LayoutValidationError("object has an empty phrase", prompt=layout.prompt, where=where)
        _check_phrase(track.phrase, prompt=layout.prompt, where=where)
        if len(track.keyframes) != layout.num_keyframes:
            raise LayoutValidationError(f"expected {layout.num_keyframes} keyframes, found "
                                        f"{len(track.keyframes)}", prompt=layout.prompt, where=where)
        if not track.keyframe_indices:
            raise LayoutValidationError("object has a box in no frame", prompt=layout.prompt, where=where,
                                        text=repr(track.keyframes))
        for frame_index, box in enumerate(track.keyframes):
            if box is None:
                continue
            values = box.as_tuple()
            if not all(math.isfinite(v) for v in values):
                raise LayoutValidationError(f"box is not finite: {values}", prompt=layout.prompt,
                                            where=f"frame {frame_index + 1}, {where}")
            if box.x_max < box.x_min or box.y_max < box.y_min:
                raise LayoutValidationError(f"box has a negative size: xyxy {values}",
                                            prompt=layout.prompt, where=f"frame {frame_index + 1}, {where}")
            _check_box_extent(box, max_box_overhang, prompt=layout.prompt, where=f"frame {frame_index + 1}, {where}")


def validate_layout_for_generation(layout: SceneLayout, tokenizer) -> None:
    """Raise :class:`LayoutValidationError` unless stage 2 can build its condition from ``layout``.

    Stage 2 calls :func:`build_condition` with the CLIP tokenizer; this does the same, so a layout
    that passes here (stage 1 saves only those) generates: every phrase is found in the diffusion
    prompt and its tokens sit inside the 77-token limit.
    """
    validate_layout(layout)
    diffusion_prompt = build_diffusion_prompt(layout.prompt, layout.background, layout.phrases)
    for track in layout.tracks:  # one phrase at a time, so that the error names the object
        try:
            compute_token_positions(diffusion_prompt, [track.phrase], tokenizer)
        except LayoutValidationError as error:
            raise LayoutValidationError(f"{error.problem}; diffusion prompt: {_snippet(diffusion_prompt, 100)!r}",
                                        prompt=layout.prompt,
                                        where=f"object {track.id} ({_snippet(repr(track.phrase), 60)})") from None
    build_condition(layout, layout.num_keyframes, tokenizer)


# --------------------------------------------------------------------------------------------
# Keyframes -> video frames


def resample_keyframes(keyframes: Sequence[Box | None], num_frames: int) -> np.ndarray:
    """Resample one track's keyframes to ``num_frames`` boxes, exactly as spec 3.4.

    Positions use ``k / (n_in - 1)`` but presence uses ``floor(q * n_in)`` bins (a reference
    quirk); absent frames are exact zeros; gaps and ends are linearly interpolated / clamped.
    Returns ``(num_frames, 4)`` float64.
    """
    num_keyframes = len(keyframes)
    present = [i for i, box in enumerate(keyframes) if box is not None]
    if not present:
        return np.zeros((num_frames, 4))
    present_indices = np.asarray(present)
    source_positions = present_indices / max(num_keyframes - 1, 1)
    values = np.asarray([keyframes[i].as_tuple() for i in present], dtype=np.float64)
    queries = np.linspace(0, 1 - 1e-5, num_frames)
    is_present = np.isin(np.floor((queries % 1) * num_keyframes), present_indices)
    columns = [np.interp(queries, source_positions, values[:, c]) * is_present for c in range(4)]
    return np.stack(columns, axis=-1)


def resample_boxes(layout: SceneLayout, num_frames: int) -> np.ndarray:
    """All tracks resampled: ``(tracks, num_frames, 4)`` float64 normalised xyxy."""
    if not layout.tracks:
        return np.zeros((0, num_frames, 4))
    return np.stack([resample_keyframes(track.keyframes, num_frames) for track in layout.tracks])


# --------------------------------------------------------------------------------------------
# Prompt and token positions


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    import inflect

    return inflect.engine()


def _contains_word(phrase: str, text: str) -> bool:
    # Faithful: the reference does not escape the phrase. Where that is not a valid pattern the
    # reference crashed; we fall back to a literal match instead.
    try:
        return re.search(rf"\b{phrase}\b", text) is not None
    except re.error:
        return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def strip_phrase(phrase: str) -> str:
    """Leading and trailing digits and spaces removed (spec 3.2 test 2, and evaluation)."""
    return phrase.strip(_PHRASE_END_STRIP)


def refine_phrase(phrase: str, prompt: str) -> str | None:
    """The first of (phrase, stripped, last word, its plural) that occurs as a word in ``prompt``.

    Faithful: an empty candidate (a phrase of only digits and spaces) is tested like any other, and
    ``\\b\\b`` matches any prompt with a word in it, so such a phrase refines to ``""``.
    """
    stripped = strip_phrase(phrase)
    last_word = stripped.split(" ")[-1]
    for candidate in (phrase, stripped, last_word):
        if _contains_word(candidate, prompt):
            return candidate
    # inflect rejects the empty string; the plural is only needed when the tests above failed.
    plural = _inflect_engine().plural(last_word) if last_word else ""
    if _contains_word(plural, prompt):
        return plural
    return None


def build_diffusion_prompt(prompt: str, background: str, phrases: Iterable[str]) -> str:
    """Caption + ``", <bg> background"`` + ``"| <phrase>"`` for each phrase not found (spec 3.2)."""
    full_prompt = prompt
    if background:
        full_prompt += f", {background} background"
    for phrase in phrases:
        if refine_phrase(phrase, full_prompt) is None:
            full_prompt += "| " + phrase
    return full_prompt


def compute_token_positions(prompt: str, phrases: Sequence[str], tokenizer,
                            max_tokens: int = CLIP_MAX_TOKENS) -> tuple[tuple[tuple[int, ...], ...],
                                                                          tuple[str, ...]]:
    """CLIP token positions of every phrase in ``prompt`` (spec 3.3), and the prompt's token map.

    Each phrase is refined against the prompt, tokenised without BOS/EOS, and located by the first
    substring match of its space-joined tokens in the prompt's space-joined tokens; the position is
    the number of space-separated pieces before the match (BOS is index 0). Positions past the
    text encoder's ``max_tokens`` raise :class:`LayoutValidationError` (the reference crashed later).
    """
    token_map = tuple(tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids))
    token_map_str = " ".join(token_map)
    positions = []
    for phrase in phrases:
        refined = refine_phrase(phrase, prompt)
        if refined is None:
            raise LayoutValidationError(f"phrase {phrase!r} does not occur as a word in the diffusion prompt "
                                        "(a name that starts or ends with punctuation or a symbol is never "
                                        "found; use plain words)", prompt=prompt)
        phrase_tokens = tokenizer.convert_ids_to_tokens(tokenizer(refined).input_ids)[1:-1]
        if not phrase_tokens:
            # The reference went on with an empty position list, which breaks the energy later.
            raise LayoutValidationError(f"phrase {phrase!r} refines to {refined!r}, which has no tokens to "
                                        "guide; use a name with letters in it", prompt=prompt)
        phrase_str = " ".join(phrase_tokens)
        index = token_map_str.find(phrase_str)
        if index < 0:
            raise LayoutValidationError(f"the tokens of phrase {phrase!r} ({phrase_str!r}) are not in the "
                                        "prompt's tokens (punctuation in a name tokenises differently inside "
                                        "the prompt; use plain words)", prompt=prompt)
        start = len(token_map_str[:index].rstrip(" ").split(" "))
        span = tuple(range(start, start + len(phrase_tokens)))
        if span[-1] >= max_tokens:
            raise LayoutValidationError(
                f"phrase {phrase!r} sits at token positions {list(span)}, past the text encoder's "
                f"{max_tokens}-token limit; shorten the prompt", prompt=prompt)
        if span[-1] == max_tokens - 1:
            # Kept for faithfulness: truncation puts EOS in the last slot, so this token is not the phrase's.
            logger.warning("prompt %r: phrase %r reaches token position %d, which holds EOS once the prompt "
                           "is truncated to %d tokens", prompt, phrase, span[-1], max_tokens)
        positions.append(span)
    return tuple(positions), token_map


def check_phrases_fit(layout: SceneLayout, tokenizer, max_tokens: int = CLIP_MAX_TOKENS) -> None:
    """Raise :class:`LayoutValidationError` naming the first object whose phrase has no room in the text
    encoder's ``max_tokens`` tokens.

    The reference appends ``"| <phrase>"`` only for a phrase it cannot find in the prompt so far, and finds
    a phrase by its last word too. So an object whose words occur only in another object's appended phrase
    (``"a big dog toy"`` after ``"| a big cat toy"``) is guided by that object's tokens, and 30 such objects
    all share the first one's: the condition silently drops 29 of them. That quirk is kept while the layout
    fits; when spelling out each such object's own phrase (objects that only differ by digits are one kind
    and share tokens, as the reference intends) would pass the token limit, the layout cannot be generated
    as written and is rejected here, as a phrase past the limit already is.
    """
    caption = layout.prompt + (f", {layout.background} background" if layout.background else "")
    spelled = caption
    appended_kinds: set[str] = set()
    for track in layout.tracks:
        kind = strip_phrase(track.phrase)
        # Found in the caption or background, or the same kind as an object already spelled out: no words needed.
        if refine_phrase(track.phrase, caption) is not None or kind in appended_kinds:
            continue
        appended_kinds.add(kind)
        spelled += "| " + track.phrase
        last_position = len(tokenizer(spelled).input_ids) - 2  # BOS is position 0; EOS is not the phrase's
        if last_position >= max_tokens:
            raise LayoutValidationError(
                f"its phrase does not fit in the text encoder's {max_tokens} tokens: spelled out after the caption, "
                f"the background and the objects before it, it would end at token position {last_position} (the "
                f"reference would silently guide it with another object's tokens); use fewer objects or shorter "
                f"names", prompt=layout.prompt, where=f"object {track.id} ({_snippet(repr(track.phrase), 60)})")


def build_condition(layout: SceneLayout, num_frames: int, tokenizer=None, *,
                    strip_phrases: bool = False) -> LayoutCondition:
    """Layout -> :class:`LayoutCondition` for ``num_frames`` video frames.

    With a tokenizer, token positions are computed (generation); without, they are None
    (evaluation, which also strips digits and spaces from the phrase ends).
    """
    phrases = layout.phrases
    prompt = build_diffusion_prompt(layout.prompt, layout.background, phrases)
    positions = token_map = None
    if tokenizer is not None:
        positions, token_map = compute_token_positions(prompt, phrases, tokenizer)
        check_phrases_fit(layout, tokenizer)
    if strip_phrases:
        phrases = tuple(strip_phrase(phrase) for phrase in phrases)
    return LayoutCondition(prompt=prompt, boxes_xyxy=resample_boxes(layout, num_frames),
                           phrases=phrases, token_positions=positions, token_map=token_map, layout=layout)


# --------------------------------------------------------------------------------------------
# Serialisation


def layout_to_dict(layout: SceneLayout) -> dict[str, Any]:
    """A JSON-ready dict; boxes are normalised xyxy (exact float round trip), null where absent."""
    return {
        "prompt": layout.prompt,
        "background": layout.background,
        "num_keyframes": layout.num_keyframes,
        "reasoning": layout.reasoning,
        "objects": [
            {"id": track.id, "phrase": track.phrase,
             "keyframes_xyxy": [None if box is None else list(box.as_tuple()) for box in track.keyframes]}
            for track in layout.tracks
        ],
    }


def _rewhere(error: LayoutError, prefix: str) -> LayoutError:
    """The same error with ``prefix`` (e.g. the file) in front of its place."""
    where = f"{prefix}, {error.where}" if error.where else prefix
    return type(error)(error.problem, prompt=error.prompt, where=where, text=error.text)


def layout_from_dict(data: Mapping[str, Any]) -> SceneLayout:
    """Inverse of :func:`layout_to_dict`, checked field by field and validated like an LLM reply."""
    snippet = json.dumps(data, default=str) if isinstance(data, (Mapping, list)) else repr(data)
    if not isinstance(data, Mapping):
        raise LayoutValidationError(f"not a serialised layout: expected a JSON object, found {type(data).__name__}",
                                    text=snippet)
    prompt = data.get("prompt")
    prompt = prompt if isinstance(prompt, str) else None

    def fail(problem: str, where: str | None = None) -> LayoutValidationError:
        return LayoutValidationError(problem, prompt=prompt, where=where, text=snippet)

    missing = [key for key in ("prompt", "num_keyframes", "objects") if key not in data]
    if missing:
        raise fail(f"not a serialised layout: no {', '.join(repr(k) for k in missing)} "
                   f"(expected the keys of layout_to_dict: prompt, background, num_keyframes, objects)")
    if prompt is None or not prompt.strip():
        raise fail(f"'prompt' must be a non-empty string, found {_snippet(repr(data['prompt']), 60)}")
    num_keyframes = data["num_keyframes"]
    if isinstance(num_keyframes, bool) or not isinstance(num_keyframes, int) or num_keyframes < 1:
        raise fail(f"'num_keyframes' must be an integer >= 1, found {num_keyframes!r}")
    background = data.get("background") or ""
    reasoning = data.get("reasoning") or ""
    for key, value in (("background", background), ("reasoning", reasoning)):
        if not isinstance(value, str):
            raise fail(f"{key!r} must be a string, found {_snippet(repr(value), 60)}")
    if not isinstance(data["objects"], list):
        raise fail(f"'objects' must be a list, found {type(data['objects']).__name__}")
    tracks = []
    for position, obj in enumerate(data["objects"]):
        where = f"object #{position}"
        if not isinstance(obj, Mapping) or any(key not in obj for key in ("id", "phrase", "keyframes_xyxy")):
            found = _snippet(json.dumps(obj, default=str), 80)
            raise fail("expected {'id', 'phrase', 'keyframes_xyxy'}, found " + found, where)
        object_id, phrase, boxes = obj["id"], obj["phrase"], obj["keyframes_xyxy"]
        if isinstance(object_id, bool) or not isinstance(object_id, int):
            raise fail(f"'id' must be an integer, found {object_id!r}", where)
        where = f"object {object_id}"
        _check_phrase(phrase, prompt=prompt, where=where, text=snippet)
        where = f"object {object_id} ({_snippet(repr(phrase), 60)})"
        if not isinstance(boxes, list) or len(boxes) != num_keyframes:
            raise fail(f"'keyframes_xyxy' must be a list of {num_keyframes} boxes (null where absent), found "
                       f"{_snippet(json.dumps(boxes, default=str), 80)}", where)
        keyframes = []
        for frame_index, box in enumerate(boxes):
            box_where = f"keyframe {frame_index + 1}, {where}"
            if box is None:
                keyframes.append(None)
                continue
            if not isinstance(box, list) or len(box) != 4:
                raise fail(f"a box must be [x_min, y_min, x_max, y_max] or null, found "
                           f"{_snippet(json.dumps(box, default=str), 80)}", box_where)
            keyframes.append(Box(*(_check_number(v, what="box value", prompt=prompt, where=box_where, text=snippet)
                                   for v in box)))
        tracks.append(ObjectTrack(object_id, phrase, tuple(keyframes)))
    layout = SceneLayout(prompt=prompt, background=background, tracks=tuple(tracks), num_keyframes=num_keyframes,
                         reasoning=reasoning)
    try:
        validate_layout(layout)
    except LayoutError as error:
        if error.text is not None:
            raise
        raise type(error)(error.problem, prompt=error.prompt, where=error.where, text=snippet) from None
    return layout


def layout_to_json(layout: SceneLayout) -> str:
    return json.dumps(layout_to_dict(layout), indent=2)


def parse_layout_json(text: str, *, source: str | None = None, prompt: str | None = None) -> SceneLayout:
    """A layout from JSON text: the ``layout.json`` that ``generate.py`` writes (its ``"layout"`` key holds
    :func:`layout_to_dict`) or a bare :func:`layout_to_dict` object, validated like an LLM reply.

    ``source`` (a file name) starts the place of every error. With ``prompt``, the layout must be for
    that prompt (compared after :func:`normalize_prompt`).
    """
    try:
        data = json.loads(text)
    except ValueError as error:
        raise LayoutParseError(f"not valid JSON ({error})", where=source, text=text) from None
    if isinstance(data, Mapping) and isinstance(data.get("layout"), Mapping):
        data = data["layout"]  # generate.py's layout.json: the layout plus its diffusion condition
    try:
        layout = layout_from_dict(data)
    except LayoutError as error:
        if source is None:
            raise
        raise _rewhere(error, source) from None
    if prompt is not None and normalize_prompt(prompt) != layout.prompt:
        raise LayoutValidationError(f"the layout is for prompt {layout.prompt!r}, not for {normalize_prompt(prompt)!r}",
                                    prompt=normalize_prompt(prompt), where=source)
    return layout


def parse_layout_file(path: str | os.PathLike, prompt: str | None = None) -> SceneLayout:
    """:func:`parse_layout_json` of a file; every error (unreadable, not JSON, invalid) names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise LayoutParseError(f"cannot read the layout file: {reason}", where=str(path)) from None
    return parse_layout_json(text, source=str(path), prompt=prompt)


def layout_from_json(text: str) -> SceneLayout:
    return parse_layout_json(text)


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_layout_text(layout: SceneLayout, canvas_size: int = CANVAS_SIZE) -> str:
    """Write a layout in the v0.1 reply grammar (pixel xywh), e.g. to compose a cache entry."""
    lines = [layout.reasoning, ""] if layout.reasoning else []
    for frame_index, label in enumerate(f"Frame {i}" for i in range(1, layout.num_keyframes + 1)):
        objects = []
        for track in layout.tracks:
            box = track.keyframes[frame_index]
            if box is None:
                continue
            xywh = (box.x_min * canvas_size, box.y_min * canvas_size,
                    (box.x_max - box.x_min) * canvas_size, (box.y_max - box.y_min) * canvas_size)
            box_text = ", ".join(_format_number(round(v, 6)) for v in xywh)
            objects.append(f"{{'id': {track.id}, 'name': {track.phrase!r}, 'box': [{box_text}]}}")
        lines.append(f"{label}: [{', '.join(objects)}]")
    lines.append(f"{BACKGROUND_LABEL}: {layout.background}")
    return "\n".join(lines)
