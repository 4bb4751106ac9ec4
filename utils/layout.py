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
import re
from dataclasses import dataclass
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


def _eval_frame_literal(content: str, *, prompt: str, label: str) -> Any:
    """A frame section -> Python value, with the reference's tolerances (spec 2.3)."""
    content = content.split(" - ")[0]
    if content.startswith("-"):
        content = content[1:].strip()
    try:
        return ast.literal_eval(content)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        reason = type(error).__name__
        if isinstance(error, SyntaxError) and error.msg:
            reason += f" ({error.msg})"
        raise LayoutParseError(f"{label} is not a Python list of dicts: {reason}",
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
    return build_layout_from_frames(frames, prompt=prompt, background=background, reasoning=leading)


def _check_number(value: Any, *, what: str, prompt: str, where: str, text: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayoutValidationError(f"{what} must be a number, found {value!r}", prompt=prompt, where=where,
                                    text=text)
    if not math.isfinite(value):
        raise LayoutValidationError(f"{what} must be finite, found {value!r}", prompt=prompt, where=where,
                                    text=text)
    return float(value)


def build_layout_from_frames(frames: Sequence[Any], *, prompt: str, background: str | None = "",
                             reasoning: str = "",
                             canvas_size: int | tuple[int, int] = CANVAS_SIZE) -> SceneLayout:
    """Frames of ``{id, name, box}`` dicts (pixel xywh) -> a validated :class:`SceneLayout`.

    Shared by the LLM parser and the detector's pseudo-layouts (stage 2), so both stages build
    tracks the same way: by id in order of first appearance, the phrase of the first appearance
    (``keyword`` if ``name`` is missing), the later box when an id repeats within a frame (spec 2.5).
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
                    raise LayoutValidationError(f"object needs a non-empty 'name', found {name!r}",
                                                prompt=prompt, where=obj_where, text=repr(obj))
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
            keyframes[object_id][frame_index] = Box.from_xywh_px((x, y, w, h), canvas_size)
    tracks = tuple(ObjectTrack(object_id, phrases[object_id], tuple(keyframes[object_id]))
                   for object_id in phrases)
    layout = SceneLayout(prompt=prompt, background=background or "",
                         tracks=tracks, num_keyframes=num_keyframes, reasoning=reasoning)
    validate_layout(layout)
    return layout


def validate_layout(layout: SceneLayout) -> None:
    """Raise :class:`LayoutValidationError` if the layout is not usable.

    Boxes partly or wholly outside the canvas and zero-size boxes are accepted, as in the reference:
    the published caches contain them and rasterisation clips them (spec 4.3).
    """
    if layout.num_keyframes < 1:
        raise LayoutValidationError("a layout needs at least one keyframe", prompt=layout.prompt)
    ids = [track.id for track in layout.tracks]
    if len(set(ids)) != len(ids):
        raise LayoutValidationError(f"track ids repeat: {ids}", prompt=layout.prompt)
    for track in layout.tracks:
        where = f"object {track.id} ({track.phrase!r})"
        if not track.phrase.strip():
            raise LayoutValidationError("object has an empty phrase", prompt=layout.prompt, where=where)
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
            raise LayoutValidationError(f"phrase {phrase!r} does not occur in the diffusion prompt",
                                        prompt=prompt)
        phrase_tokens = tokenizer.convert_ids_to_tokens(tokenizer(refined).input_ids)[1:-1]
        if not phrase_tokens:
            # The reference went on with an empty position list, which breaks the energy later.
            raise LayoutValidationError(f"phrase {phrase!r} refines to {refined!r}, which has no tokens to "
                                        "guide; use a name with letters in it", prompt=prompt)
        phrase_str = " ".join(phrase_tokens)
        index = token_map_str.find(phrase_str)
        if index < 0:
            raise LayoutValidationError(f"the tokens of phrase {phrase!r} ({phrase_str!r}) are not in "
                                        "the prompt's tokens", prompt=prompt)
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


def layout_from_dict(data: Mapping[str, Any]) -> SceneLayout:
    """Inverse of :func:`layout_to_dict`, validated."""
    prompt = data.get("prompt") if isinstance(data, Mapping) else None
    try:
        num_keyframes = int(data["num_keyframes"])
        tracks = []
        for obj in data["objects"]:
            keyframes = tuple(None if box is None else Box(*(float(v) for v in box))
                              for box in obj["keyframes_xyxy"])
            tracks.append(ObjectTrack(int(obj["id"]), str(obj["phrase"]), keyframes))
        layout = SceneLayout(prompt=str(data["prompt"]), background=str(data.get("background") or ""),
                             tracks=tuple(tracks), num_keyframes=num_keyframes,
                             reasoning=str(data.get("reasoning", "")))
    except (KeyError, TypeError, ValueError) as error:
        raise LayoutValidationError(f"not a serialised layout: {type(error).__name__}: {error}",
                                    prompt=prompt, text=json.dumps(data, default=str)) from None
    validate_layout(layout)
    return layout


def layout_to_json(layout: SceneLayout) -> str:
    return json.dumps(layout_to_dict(layout), indent=2)


def layout_from_json(text: str) -> SceneLayout:
    return layout_from_dict(json.loads(text))


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
