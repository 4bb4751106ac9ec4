"""The videos of a generation run: which file of which prompt folder is evaluated, or why none is.

A run directory looks like what ``generate.py`` and ``scripts/upsample.py`` write::

    <run>/config.json                          resolved run config, with its "prompt_type"
    <run>/<ind + run_start_ind>/video_<k>.joblib|.mp4|.gif     repeat k of entry ind (spec 8.1)
    <run>/<ind + run_start_ind>/video_<k>_<variant>.joblib     an upsampled copy: zsxl, sdxl, zsxl_s0.5, ...
    <run>/<ind + run_start_ind>/video_<k>_annotated.gif        boxes drawn on the video (not evaluated)
    <run>/<ind + run_start_ind>/layout.json                    {"prompt", "layout": layout_to_dict(...)}

`collect_eval_items` lists the entries of a window of the prompt list, each with its video or with a
:class:`Skip` that says why it cannot be evaluated. Upsampled copies are never taken for repeats:
only files of the selected variant (the generated video by default) are counted.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from utils.cache import select_window
from utils.eval.config import RunSelection
from utils.layout import LayoutError, SceneLayout, layout_from_dict, normalize_prompt
from utils.predicates import Check

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"
LAYOUT_FILE = "layout.json"
NO_TASK = "demo"  # the task name of prompts without a benchmark check (adherence only)
# video_<repeat>[_<variant>].<format>; repeat is the repeat index (or seed<seed>, spec 8.1).
VIDEO_NAME = re.compile(r"video_(?P<repeat>\d+|seed\d+)(?:_(?P<variant>.+?))?\.(?P<format>joblib|mp4|gif)")
ANNOTATED_SUFFIX = "annotated"  # generate.py's video_<k>_annotated.gif: a drawing, not a video to judge

# Why an entry is skipped (Skip.kind): short labels, counted in the summary.
SKIP_NO_RUN = "no run directory"
SKIP_PROMPT_TYPE = "run of another prompt type"
SKIP_NO_FOLDER = "no prompt folder"
SKIP_NOT_GENERATED = "never generated"  # no folder, and outside every window the run's config.json records
SKIP_NO_VIDEO = "no video file"
SKIP_REPEATS = "several repeats"
SKIP_UNREADABLE = "unreadable video"
SKIP_TOO_SHORT = "too few frames"
SKIP_TOO_SMALL = "frames too small"
# Smallest frame side evaluation judges: OWL-ViT sees 32-pixel patches, so a smaller frame holds no object.
MIN_FRAME_SIDE = 32
SKIP_OTHER_PROMPT = "layout of another prompt"
SKIP_NOTHING_TO_JUDGE = "no check and no layout"
SKIP_FAILED = "unexpected error"


@dataclass(frozen=True)
class Skip:
    """Why an entry was not evaluated: a short ``kind`` (one of the SKIP_* labels) and the full message."""

    kind: str
    message: str


class EvalInputError(ValueError):
    """One video cannot be evaluated (missing, unreadable, too short, or from another prompt list)."""

    def __init__(self, message: str, kind: str = SKIP_UNREADABLE):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class EvalItem:
    """One video to evaluate: benchmark index ``index``, stored in ``folder``."""

    index: int
    folder: Path
    prompt: str
    check: Check | None                 # None for prompt types without a benchmark (adherence only)
    video_path: Path | None = None
    skip: Skip | None = None
    other_variants: tuple[str, ...] = ()  # upsampled variants also in the folder (not evaluated)

    @property
    def task(self) -> str:
        return self.check.task if self.check is not None else NO_TASK


@dataclass(frozen=True)
class VideoFile:
    """One video of a prompt folder in every format it was saved in."""

    repeat: str                  # "0", "1", ... (or "seed<seed>")
    variant: str                 # "" for the generated video, else the upsampler suffix
    paths: dict[str, Path]       # format -> file

    @property
    def name(self) -> str:
        return f"video_{self.repeat}" + (f"_{self.variant}" if self.variant else "")


def _find_key(data: Any, key: str) -> Any:
    """The first value of ``key`` in nested dicts (breadth first), or None."""
    queue = [data]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node[key]
            queue.extend(node.values())
    return None


def read_run_prompt_type(run_base_path: str | Path) -> str | None:
    """The ``prompt_type`` recorded in the run's config.json; None if there is none (reference runs)."""
    path = Path(run_base_path) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        value = _find_key(json.loads(path.read_text(encoding="utf-8")), "prompt_type")
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable run config (%s); the prompt type is not checked", path, error)
        return None
    return value if isinstance(value, str) else None


def read_generated_windows(run_base_path: str | Path) -> list[tuple[int, int | None]] | None:
    """The prompt-index windows ``[start, end)`` (end None: to the end) that generate.py was asked to make in
    this run, from the invocations of its config.json; None when that is unknown (no file, or a record
    without a window)."""
    path = Path(run_base_path) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        invocations = json.loads(path.read_text(encoding="utf-8")).get("invocations")
    except (OSError, ValueError, AttributeError):
        return None
    windows = []
    for record in invocations if isinstance(invocations, list) and invocations else [None]:
        window = record.get("window") if isinstance(record, dict) else None
        args = record.get("args") if isinstance(record, dict) else None
        if not (isinstance(window, list) and len(window) == 2 and isinstance(window[0], int)
                and (window[1] is None or isinstance(window[1], int))):
            return None
        if isinstance(args, dict) and args.get("regenerate", 1) != 1:
            window = [0, None]  # the passes count the index on past one list: do not guess where it ends
        windows.append((window[0], window[1]))
    return windows


def _repeat_sort_key(repeat: str) -> tuple[int, str]:
    return (int(repeat), "") if repeat.isdigit() else (1 << 30, repeat)


def list_prompt_videos(folder: Path) -> list[VideoFile]:
    """Every video of a prompt folder (annotated GIFs excluded), by repeat, then variant."""
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        match = VIDEO_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        variant = match["variant"] or ""
        if variant == ANNOTATED_SUFFIX or variant.endswith("_" + ANNOTATED_SUFFIX):
            continue
        found.setdefault((match["repeat"], variant), {})[match["format"]] = path
    return [VideoFile(repeat, variant, paths)
            for (repeat, variant), paths in sorted(found.items(), key=lambda kv: (_repeat_sort_key(kv[0][0]),
                                                                                 kv[0][1]))]


def _pattern(variant: str) -> str:
    return "video_<k>" + (f"_{variant}" if variant else "")


def select_prompt_videos(folder: Path, variant: str, formats: Sequence[str],
                         all_repeats: bool) -> tuple[list[Path], Skip | None, tuple[str, ...]]:
    """The video files of ``variant`` to evaluate in ``folder`` (the first of ``formats`` that each repeat
    has), or a :class:`Skip`; plus the other variants present (upsampled copies, never repeats)."""
    videos = list_prompt_videos(folder)
    others = tuple(dict.fromkeys(v.variant for v in videos if v.variant != variant and v.variant))
    chosen = [v for v in videos if v.variant == variant]
    usable = [(v, next((v.paths[f] for f in formats if f in v.paths), None)) for v in chosen]
    paths = [path for _, path in usable if path is not None]
    wanted = f"{_pattern(variant)}." + " or .".join(formats)
    if not paths:
        notes = []
        unusable = [f"{v.name}.{fmt}" for v, path in usable if path is None for fmt in v.paths]
        if unusable:
            gif = any(name.endswith(".gif") for name in unusable)
            notes.append(f"found only {', '.join(unusable)}" + (
                " (GIF is palette-limited and merges identical frames; add gif to --video-formats to "
                "evaluate it anyway)" if gif and "gif" not in formats else ""))
        if variant == "" and others:
            notes.append(f"upsampled variants here: {', '.join(others)} (--video-variant selects one)")
        elif variant and videos:
            notes.append("it holds " + ", ".join(dict.fromkeys(_pattern(v.variant) for v in videos)))
        message = f"no {wanted} in {folder}" + (f"; {'; '.join(notes)}" if notes else "")
        return [], Skip(SKIP_NO_VIDEO, message), others
    if len(paths) > 1 and not all_repeats:
        names = ", ".join(p.name for p in paths)
        extra = f"; upsampled copies ({', '.join(others)}) are not counted" if others else ""
        return [], Skip(SKIP_REPEATS, f"{len(paths)} videos in {folder} ({names}); expected exactly one "
                                      f"(pass --all-repeats to evaluate each){extra}"), others
    return paths, None, others


def collect_eval_items(run_base_path: str | Path, prompt_type: str, entries: Sequence[tuple[str, Check | None]],
                       selection: RunSelection = RunSelection(), variant: str = "") -> list[EvalItem]:
    """The videos of the entries in the window ``[skip_first_prompts, skip_first_prompts + num_prompts)``.

    ``entries`` are the (prompt, check) pairs of ``prompt_type`` (``prompt.get_prompt_entries``). Entry
    ``ind`` lives in ``<run>/<ind + run_start_ind>/`` (spec 10.2 step 1). Like the reference, a folder with
    no video or with several repeats is skipped (``all_repeats`` evaluates each). Unusable entries come
    back with a :class:`Skip`; nothing here raises for bad input.
    """
    run = Path(run_base_path)
    window = select_window(len(entries), selection.skip_first_prompts, selection.num_prompts)
    run_type = read_run_prompt_type(run) if run.is_dir() else None
    generated = read_generated_windows(run) if run.is_dir() else None
    items = []
    for ind in window:
        prompt, check = entries[ind]
        folder = run / str(ind + selection.run_start_ind)
        base = dict(index=ind, folder=folder, prompt=prompt, check=check)
        if not run.is_dir():
            items.append(EvalItem(**base, skip=Skip(SKIP_NO_RUN, f"run directory {run} does not exist")))
            continue
        if run_type is not None and run_type != prompt_type:
            items.append(EvalItem(**base, skip=Skip(SKIP_PROMPT_TYPE, (
                f"{run / RUN_CONFIG_FILE} says the run was generated for prompt type {run_type!r}, not "
                f"{prompt_type!r} (pass --prompt-type {run_type}, or leave it out to use the run's)"))))
            continue
        if not folder.is_dir():
            number = ind + selection.run_start_ind
            if generated is not None and not any(start <= number and (end is None or number < end)
                                                 for start, end in generated):
                windows = ", ".join(f"[{start}, {'end' if end is None else end})" for start, end in generated)
                items.append(EvalItem(**base, skip=Skip(SKIP_NOT_GENERATED, (
                    f"prompt {ind} was never generated in this run (its config.json records the windows "
                    f"{windows})"))))
                continue
            items.append(EvalItem(**base, skip=Skip(SKIP_NO_FOLDER, f"no folder {folder} for prompt {ind}")))
            continue
        paths, skip, others = select_prompt_videos(folder, variant, selection.video_formats, selection.all_repeats)
        if skip is not None:
            items.append(EvalItem(**base, skip=skip, other_variants=others))
        else:
            items.extend(EvalItem(**base, video_path=path, other_variants=others) for path in paths)
    return items


def read_generation_layout(item: EvalItem) -> SceneLayout | None:
    """The layout the video was generated from (``layout.json``), None if the run has none.

    Raises :class:`EvalInputError` if layout.json names another prompt: the run was generated for
    another prompt list (or ``--run_start_ind`` is off). An unreadable layout only costs adherence.
    """
    path = item.folder / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s); no adherence for this video", path, error)
        return None
    recorded = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(recorded, str) and normalize_prompt(recorded) != item.prompt:
        raise EvalInputError(f"{path} was generated for {recorded!r}, but entry {item.index} of this prompt "
                             f"list is {item.prompt!r}: wrong --prompt-type or --run_start_ind?",
                             kind=SKIP_OTHER_PROMPT)
    try:
        return layout_from_dict(data["layout"])
    except (KeyError, TypeError, LayoutError) as error:
        logger.warning("%s: no usable layout (%s); no adherence for this video", path, error)
        return None
