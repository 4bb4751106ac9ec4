"""The studio's one door into the project: every call into layouts, caches, the LLM client, the
run-model registry, model loading, sampling and generate.py's output writers is made here.

The rest of ``studio/`` (the editor state, the command lines, the Gradio page) talks to this module
only, so when stage 2 is refactored only this file has to follow. Nothing here re-implements the
library: layouts are parsed and validated by ``utils.layout``, configs are built by
``generation.settings`` (generate.py's flags and their configs) from the very command line the page shows,
videos come from ``generation.sampling.generate_video`` and are written, with config.json's run record,
by ``generation.runs`` as generate.py writes them.

Heavy imports (torch, diffusers, openai) happen inside the functions that need them, so importing
this module for the layout types costs no more than ``utils.layout``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from models.registry import (CONTROL_FAMILY_NAMES, LAYOUT_METHODS, RUN_MODELS, WAN_FAMILY,
                             RunModelError, RunModelSpec, get_run_model)
from prompt import DEFAULT_TEMPLATE_VERSION
from utils.cache import CacheFormatError, LayoutCache, cache_file_name
from utils.io import atomic_write_json, atomic_write_text
from utils.layout import (CANVAS_SIZE, NUM_KEYFRAMES, Box, LayoutError, LayoutValidationError, ObjectTrack,
                          SceneLayout, format_layout_text, layout_from_dict, layout_to_dict,
                          normalize_prompt, parse_layout, resample_boxes, validate_layout)
from utils.visualize import track_color

from studio import commands

logger = logging.getLogger(__name__)

# Re-exported for the rest of the studio (it imports project names from here only).
__all__ = [
    "Box", "CANVAS_SIZE", "LayoutError", "LayoutValidationError", "NUM_KEYFRAMES", "ObjectTrack", "SceneLayout",
    "layout_from_dict", "layout_to_dict", "normalize_prompt", "validate_layout", "track_color",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDIO_PROMPT_TYPE = "studio"            # cache files the studio writes: cache_studio_<template>_<name>.json
STUDIO_CACHE_MODEL = "edited"
STUDIO_RUNS_DIR = "studio"                # <output dir>/studio/run<k>/
PREVIEWS_DIR = "previews"                 # <output dir>/studio/previews/: the page's scratch files
MAX_PREVIEW_FOLDERS = 32                  # newest scratch folders kept (two files per edit)
PREVIEW_LONG_SIDE_PX = 384                # the layout animation is drawn at this size, the video's aspect
PREVIEW_BACKGROUND = 232                  # light grey canvas
PALETTE_SIZE = 32                         # editor colours: track_color(0..31)
MAX_LOADED_MODELS = 2                     # an LVD run-model and its baseline can need two weight sets

# Bounds of what one request may ask (a request cannot hold the generator, or fill a cache, without end).
MAX_PROMPT_CHARS = 2000                   # prompt, phrase, background (CLIP keeps 77 tokens, umT5 512)
MAX_OBJECTS = PALETTE_SIZE                # objects of a layout (the editor has one colour per object)
MAX_STEPS = 200                           # denoising steps (the paper's 40, Wan's 50)
MAX_SEED = 2 ** 32 - 1                    # seeds of one run: seed + prompt index + 6789 * repeat stays an int64
MAX_REPLY_NUMBER = 10_000

PRESET_PAPER = "paper"
PRESET_WEAK = "README weak"
PRESET_SHAPES = "shapes tuned"
PRESET_CUSTOM = "custom"
GUIDANCE_PRESETS = (PRESET_PAPER, PRESET_WEAK, PRESET_SHAPES, PRESET_CUSTOM)
# The guidance flags the page exposes (generate.py flag names = GuidanceConfig fields).
GUIDANCE_FIELDS = ("loss_scale", "loss_threshold", "max_iter", "max_index_step", "fg_top_p", "bg_top_p",
                   "fg_weight", "bg_weight", "com_loss_scale")
INT_GUIDANCE_FIELDS = ("max_iter", "max_index_step")
# (low, high, low excluded) of each field: generate.py's flag ranges, with an upper end.
GUIDANCE_LIMITS = {
    "loss_scale": (0.0, 1e6, True), "loss_threshold": (-1e9, 1e9, False), "max_iter": (0, 20, False),
    "max_index_step": (0, MAX_STEPS, False), "fg_top_p": (0.0, 1.0, True), "bg_top_p": (0.0, 1.0, True),
    "fg_weight": (0.0, 1e6, False), "bg_weight": (0.0, 1e6, False), "com_loss_scale": (0.0, 1e6, False),
}


class StudioError(Exception):
    """A problem to show in the page: the message is complete and meant for the user."""


def whole_number(value: Any, what: str, low: int, high: int) -> int:
    """``value`` (a page number: int or float) as an int in [low, high]; StudioError saying what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise StudioError(f"the {what} must be a whole number, found {value!r}")
    if not low <= value <= high:
        raise StudioError(f"the {what} must be from {low} to {high}, found {value!r}")
    return int(value)


def check_text(text: Any, what: str) -> str:
    """Text of at most MAX_PROMPT_CHARS characters (StudioError otherwise)."""
    if not isinstance(text, str):
        raise StudioError(f"the {what} must be text, found {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise StudioError(f"the {what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return text


def check_layout_bounds(layout: SceneLayout) -> None:
    """A layout the studio takes: at most MAX_OBJECTS objects, prompt / background / phrases of bounded length."""
    check_text(layout.prompt, "prompt")
    check_text(layout.background, "background")
    if len(layout.tracks) > MAX_OBJECTS:
        raise StudioError(f"the layout has {len(layout.tracks)} objects; at most {MAX_OBJECTS} are accepted")
    for track in layout.tracks:
        check_text(track.phrase, f"phrase of object {track.id}")


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class LLMSettings:
    """The OpenAI-compatible endpoint, resolved from prompt_batch.py's flags (``utils.llm``)."""

    config: Any                      # utils.llm.LLMConfig
    api_key_file: str | None = None
    max_parse_attempts: int = 2
    parse_retry_delay_s: float = 1.0


@dataclass(frozen=True)
class StudioSettings:
    """Everything the studio's server needs; built once by app.py."""

    cache_dir: Path = Path("cache")
    output_dir: Path = Path("img_generations")
    template_version: str = DEFAULT_TEMPLATE_VERSION
    llm: LLMSettings | None = None
    device: str | None = None
    dtype: str | None = None
    model_paths: Mapping[str, str] = field(default_factory=dict)  # run-model name -> local folder
    threads: int | None = None  # torch CPU threads; None: models.devices.choose_cpu_threads (generate.py's rule)
    opening_run_model: str | None = None  # the run-model the page opens on; None: Studio.default_run_model's rule

    @property
    def studio_cache_path(self) -> Path:
        """The studio's own cache file (edited layouts); never a published one."""
        return Path(self.cache_dir) / cache_file_name(STUDIO_PROMPT_TYPE, self.template_version, STUDIO_CACHE_MODEL)


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """prompt_batch.py's LLM flags (``--llm-base-url``, ``--llm-api-key-file``, ...)."""
    from utils.llm import add_llm_arguments as add

    add(parser)


def build_llm_settings(args: argparse.Namespace) -> LLMSettings:
    """LLM settings from app.py's flags (``args.model`` is the LLM name, as for prompt_batch.py)."""
    from utils.llm import llm_config_from_args

    return LLMSettings(config=llm_config_from_args(args), api_key_file=args.llm_api_key_file,
                       max_parse_attempts=args.parse_attempts, parse_retry_delay_s=args.parse_retry_delay)


# --------------------------------------------------------------------------------------------
# Plan: layouts from a cache file or the LLM


@dataclass(frozen=True)
class Plan:
    layout: SceneLayout
    reply_text: str
    source: str                      # where the reply came from, for the page


def list_cache_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The cache files of ``cache_dir`` (the demo cache, published benchmark caches, the studio's own)."""
    return sorted(Path(cache_dir).glob("cache_*.json"))


def load_cache(path: str | os.PathLike) -> LayoutCache:
    if not Path(path).is_file():
        raise StudioError(f"no cache file at {path}")
    try:
        return LayoutCache.load(path)
    except CacheFormatError as error:
        raise StudioError(str(error)) from None
    except OSError as error:
        raise StudioError(f"cannot read the cache file {path}: {error.strerror or error}") from None


def list_cached_prompts(path: str | os.PathLike) -> list[str]:
    return list(load_cache(path).entries)


def plan_from_cache(path: str | os.PathLike, prompt: str, occurrence: int = 0) -> Plan:
    """Reply ``occurrence`` of ``prompt`` in the cache file, parsed by ``utils.layout.parse_layout``."""
    check_text(prompt, "prompt")
    occurrence = whole_number(occurrence, "reply number", 0, MAX_REPLY_NUMBER)
    cache = load_cache(path)
    key = prompt if prompt in cache.entries else next(
        (k for k in cache.entries if normalize_prompt(k) == normalize_prompt(prompt)), None)
    if key is None:
        raise StudioError(f"no reply for {normalize_prompt(prompt)!r} in {path} ({len(cache.entries)} prompts); "
                          "pick a cached prompt, or plan with the LLM endpoint")
    reply = cache.get(key, occurrence)
    if reply is None:
        raise StudioError(f"{path} has {cache.num_replies(key)} reply(s) for {key!r}; reply number {occurrence} "
                          f"does not exist (the first is 0)")
    try:
        layout = parse_layout(reply, key)
    except LayoutError as error:
        raise StudioError(str(error)) from None
    return Plan(layout=layout, reply_text=reply, source=f"{Path(path).name}, reply {occurrence}")


def plan_from_llm(settings: LLMSettings | None, prompt: str, model: str | None = None,
                  template_version: str = DEFAULT_TEMPLATE_VERSION) -> Plan:
    """Ask the configured endpoint (``utils.llm.query_layout``: retries, parse retries) for a layout."""
    from prompt import build_messages, load_template
    from utils.llm import LLMError, build_client, resolve_model_name

    if settings is None:
        raise StudioError("no LLM endpoint is configured; start the app with --llm-base-url / OPENAI_API_KEY")
    check_text(prompt, "prompt")
    if not normalize_prompt(prompt):
        raise StudioError("the prompt is empty")
    config = settings.config
    if model and resolve_model_name(model) != config.model:
        config = dataclasses.replace(config, model=resolve_model_name(model))
    try:
        template = load_template(template_version)
        client = build_client(config, settings.api_key_file)
        reply = _query_layout(client, build_messages(template, prompt), prompt, settings)
    except (LLMError, FileNotFoundError, ValueError) as error:
        raise StudioError(str(error)) from None
    where = config.base_url or "the OpenAI API"
    return Plan(layout=reply.layout, reply_text=reply.text,
                source=f"{config.model} at {where} (template {template_version})")


def _query_layout(client, messages, prompt: str, settings: LLMSettings):
    from utils.llm import query_layout

    return query_layout(client, messages, normalize_prompt(prompt), max_parse_attempts=settings.max_parse_attempts,
                        parse_retry_delay_s=settings.parse_retry_delay_s)


def save_layout_to_cache(layout: SceneLayout, settings: StudioSettings) -> tuple[Path, int]:
    """Append the layout, in the reply grammar, to the studio's own cache file; (path, reply number).

    The file is always ``cache_studio_<template>_edited.json``: a published cache is never written.
    """
    check_layout_bounds(layout)
    path = settings.studio_cache_path
    reply = format_layout_text(layout)
    # The grammar is the one every stage parses; a layout that does not survive it is not saved.
    try:
        parse_layout(reply, layout.prompt)
    except LayoutError as error:
        raise StudioError(f"the edited layout does not read back as a reply: {error}") from None
    return path, LayoutCache(path).append(layout.prompt, reply)


def write_layout_file(path: str | os.PathLike, layout: SceneLayout, condition=None) -> Path:
    """A ``layout.json`` that ``generate.py --layout-file`` reads: generate.py's own record
    (``generation.runs.write_layout_record``) with a condition, else just the prompt and the layout."""
    from generation.runs import LAYOUT_FILE, write_layout_record

    path = Path(path)
    if condition is None:
        atomic_write_json(path, {"prompt": layout.prompt, "layout": layout_to_dict(layout)})
        return path
    if path.name != LAYOUT_FILE:
        raise StudioError(f"a layout file with its condition is called {LAYOUT_FILE}, found {path.name}")
    return write_layout_record(path.parent, prompt=layout.prompt, index=0, occurrence=0, layout=layout,
                               condition=condition, source="studio (app.py)")


def read_layout_file(path: str | os.PathLike) -> SceneLayout:
    """A layout from a ``layout.json`` (generate.py's, or a bare ``layout_to_dict`` dict), read as
    ``generate.py --layout-file`` reads it (``utils.layout.parse_layout_file``)."""
    from utils.layout import parse_layout_file

    return parse_layout_file(path)


def editor_palette() -> list[str]:
    """The stable track colours of ``utils.visualize`` (track i is drawn in colour i) as #rrggbb."""
    return ["#%02x%02x%02x" % track_color(index) for index in range(PALETTE_SIZE)]


def preview_size(spec: RunModelSpec) -> tuple[int, int]:
    """(width, height) of the layout animation: the video's aspect, long side PREVIEW_LONG_SIDE_PX."""
    scale = PREVIEW_LONG_SIDE_PX / max(spec.width, spec.height)
    return max(1, round(spec.width * scale)), max(1, round(spec.height * scale))


def render_layout_preview(layout: SceneLayout, spec: RunModelSpec, path: str | os.PathLike) -> Path:
    """The layout resampled to the run-model's frames and drawn on a canvas of the video's aspect (GIF)."""
    import numpy as np

    from utils.video_io import write_gif
    from utils.visualize import annotate_video

    width, height = preview_size(spec)
    num_frames = spec.default_num_frames
    boxes_xyxy = resample_boxes(layout, num_frames)  # (tracks, frames, 4)
    canvas = np.full((num_frames, height, width, 3), PREVIEW_BACKGROUND, dtype=np.uint8)
    frames = annotate_video(canvas, boxes_xyxy, layout.phrases) if layout.tracks else canvas
    return write_gif(frames, path)


# --------------------------------------------------------------------------------------------
# Run-models


@dataclass(frozen=True)
class RunModelStatus:
    name: str
    method: str
    width: int
    height: int
    num_frames: int
    tiny: bool
    available: bool
    baseline: str | None             # the baseline run-model the page generates beside it
    hint: str = ""                    # why it is not available and how to get it
    controls: tuple[str, ...] = ()    # its layout control families by default (its method's)
    control_choices: tuple[str, ...] = ()  # the families the page offers for it (`control_choices`)
    num_inference_steps: int = 40     # its sampling default (the paper's 40; 20 for the shapes models)


def baseline_for(spec: RunModelSpec) -> RunModelSpec | None:
    """The unguided run-model of the same video model: same size and kind, same weights if possible."""
    candidates = [s for s in RUN_MODELS if s.method == "baseline" and s.tiny == spec.tiny
                  and s.family == spec.family and (s.height, s.width) == (spec.height, spec.width)]
    same_weights = [s for s in candidates if s.model_id == spec.model_id]
    return (same_weights or candidates or [None])[0]


def _weights_problem(spec: RunModelSpec, model_path: str | None) -> str:
    """'' when the weights of ``spec`` are on this machine, else the download hint (nothing is downloaded)."""
    if spec.tiny and model_path is None:
        return ""
    from models.hub import MissingWeightsError
    from models.loading import find_model_folder

    try:
        find_model_folder(spec, model_path, local_files_only=True)
    except MissingWeightsError:
        revision = f" --revision {spec.revision}" if spec.revision else ""
        where = f" (looked in {model_path})" if model_path else ""
        return (f"weights not found locally{where}: `hf download {spec.model_id}{revision}`, "
                f"or `--model-path {spec.name}=DIR`")
    return ""


def list_run_models(settings: StudioSettings) -> list[RunModelStatus]:
    """Every layout run-model of the registry, with whether its weights are here (checked offline)."""
    statuses = []
    for spec in RUN_MODELS:
        if spec.method not in LAYOUT_METHODS:
            continue
        problem = _weights_problem(spec, settings.model_paths.get(spec.name))
        baseline = baseline_for(spec)
        if baseline is not None and not problem and _weights_problem(baseline, settings.model_paths.get(baseline.name)):
            baseline = None  # its weights are missing: the LVD video alone
        statuses.append(RunModelStatus(
            name=spec.name, method=spec.method, width=spec.width, height=spec.height,
            num_frames=spec.default_num_frames, tiny=spec.tiny,
            available=not problem, baseline=baseline.name if baseline else None, hint=problem,
            controls=spec.controls, control_choices=control_choices(spec),
            num_inference_steps=spec.num_inference_steps))
    return statuses


def control_choices(spec: RunModelSpec) -> tuple[str, ...]:
    """The layout control families the page offers for ``spec``: GLIGEN on a grounded UNet, energy guidance where
    the run-model names guided layers, masking and modulation on every one (what generate.py's --control takes)."""
    return tuple(name for name in CONTROL_FAMILY_NAMES
                 if (name != "gligen" or spec.grounded) and (name != "energy" or spec.guided_layers))


def check_controls(controls: Any, spec: RunModelSpec) -> tuple[str, ...]:
    """A request's control families in `CONTROL_FAMILY_NAMES` order (None: the run-model's own); StudioError for
    what is not a set of family names. Whether ``spec`` takes them is generate.py's check, made on the command
    line the studio builds (``generation.settings.run_controls``)."""
    if controls is None:
        return spec.controls
    if isinstance(controls, str) or not isinstance(controls, (list, tuple)):
        raise StudioError(f"the layout controls must be a list of family names, found {_snippet(controls)}")
    unknown = [name for name in controls if name not in CONTROL_FAMILY_NAMES]
    if unknown:
        raise StudioError(f"unknown layout control {_snippet(unknown[0])}; expected any set of "
                          f"{', '.join(CONTROL_FAMILY_NAMES)} (an empty one for none); {spec.name} offers "
                          f"{', '.join(control_choices(spec))}")
    return tuple(name for name in CONTROL_FAMILY_NAMES if name in controls)


def _snippet(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def get_spec(name: str) -> RunModelSpec:
    try:
        return get_run_model(name)
    except RunModelError as error:
        raise StudioError(str(error)) from None


# --------------------------------------------------------------------------------------------
# Guidance presets


def guidance_defaults() -> dict[str, float | int]:
    """The paper's values of the exposed guidance fields (``GuidanceConfig`` defaults, section 4)."""
    from generation.config import GuidanceConfig

    defaults = GuidanceConfig()
    return {name: getattr(defaults, name) for name in GUIDANCE_FIELDS}


def default_preset(run_model: str) -> str:
    """The preset the page opens with: the tuned one for the shipped shapes models, else the paper's."""
    return PRESET_SHAPES if get_spec(run_model).bundled else PRESET_PAPER


def guidance_preset_values(preset: str, run_model: str) -> dict[str, float | int]:
    """All exposed guidance fields under ``preset`` (custom starts from the paper's values)."""
    from generation.config import shapes_preset, weak_guidance_preset

    values = guidance_defaults()
    if preset == PRESET_SHAPES:
        tuned = shapes_preset(get_spec(run_model).family)
        values.update({name: getattr(tuned, name) for name in GUIDANCE_FIELDS})
    elif preset == PRESET_WEAK:
        spec = get_spec(run_model)
        # README: threshold 350 on Zeroscope (576x320), 250 on ModelScope; the tiny models take ModelScope's.
        base = "zeroscope" if (spec.width, spec.height) == (576, 320) else "modelscope"
        weak = weak_guidance_preset(base)
        values.update({name: getattr(weak, name) for name in GUIDANCE_FIELDS})
    elif preset not in (PRESET_PAPER, PRESET_CUSTOM):
        raise StudioError(f"unknown guidance preset {preset!r}; expected one of {GUIDANCE_PRESETS}")
    return {name: values[name] for name in GUIDANCE_FIELDS}


def guidance_flags(values: Mapping[str, float | int | None]) -> dict[str, float | int]:
    """The guidance flags to pass: the fields whose value differs from the paper's default.

    Raises StudioError for a missing or non-numeric value, naming the field.
    """
    defaults = guidance_defaults()
    flags = {}
    for name in GUIDANCE_FIELDS:
        value = check_guidance_value(name, values.get(name))
        if value != defaults[name]:
            flags[name] = value
    return flags


def check_guidance_value(name: str, value: Any) -> float | int:
    """One guidance field's value within `GUIDANCE_LIMITS` (an int for the integer fields); raises StudioError."""
    if name not in GUIDANCE_LIMITS:
        raise StudioError(f"unknown guidance field {name!r}; expected one of {', '.join(GUIDANCE_FIELDS)}")
    low, high, low_open = GUIDANCE_LIMITS[name]
    if name in INT_GUIDANCE_FIELDS:
        return whole_number(value, f"guidance value {name}", low, high)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudioError(f"guidance value {name} must be a number, found {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise StudioError(f"guidance value {name} must be {'above' if low_open else 'from'} {low} "
                          f"{'and at most' if low_open else 'to'} {high}, found {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Generate


@dataclass(frozen=True)
class GenerationRequest:
    layout: SceneLayout
    run_model: str
    seed: int
    num_inference_steps: int
    guidance_flags: Mapping[str, float | int] = field(default_factory=dict)  # used when energy guidance runs
    with_baseline: bool = True
    controls: tuple[str, ...] | None = None  # layout control families; None: the run-model's (``spec.controls``)


@dataclass(frozen=True)
class VideoOutput:
    run_model: str
    run_dir: Path                    # generate.py's run<k> layout: config.json, 0/video_0.*
    video_gif: Path
    video_joblib: Path
    annotated_gif: Path | None
    command: tuple[str, ...]         # the generate.py command that reproduces it
    elapsed_s: float


@dataclass(frozen=True)
class GenerationResult:
    run_root: Path
    layout_file: Path
    lvd: VideoOutput
    baseline: VideoOutput | None
    guidance_log: tuple[dict, ...]   # (step, iteration, timestep, energy, loss) of every guided iteration
    commands_file: Path
    notes: tuple[str, ...] = ()
    controls: tuple[str, ...] = ()   # the layout control families the LVD arm ran


ProgressFn = Callable[[str, int, int], None]  # (what, e.g. "lvd_tiny: denoising step 3/40"; steps done; in all)


class ModelPool:
    """Loaded video models, shared by run-models that use the same weights (an LVD run-model and its
    baseline), at most ``capacity`` weight sets at once. One generation at a time holds its lock."""

    def __init__(self, settings: StudioSettings, capacity: int = MAX_LOADED_MODELS):
        self.settings = settings
        self.capacity = capacity
        self.lock = threading.Lock()
        self._models: OrderedDict[tuple, Any] = OrderedDict()

    def _key(self, spec: RunModelSpec) -> tuple:
        return (spec.family, spec.tiny, spec.model_id, spec.revision, spec.grounded,
                self.settings.model_paths.get(spec.name))

    def get(self, spec: RunModelSpec):
        """The model of ``spec`` (``models.loading.load_video_model``), loaded once per weight set."""
        from models.loading import load_video_model

        key = self._key(spec)
        if key not in self._models:
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
                _release_device_memory()
            logger.info("loading %s", spec.name)
            self._models[key] = load_video_model(spec, model_path=self.settings.model_paths.get(spec.name),
                                                 device=self.settings.device, dtype=self.settings.dtype)
        self._models.move_to_end(key)
        # Same weights, this spec (the model records which run-model it serves).
        return dataclasses.replace(self._models[key], spec=spec)


def _release_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def display_path(path: str | os.PathLike) -> str:
    """A path as the reproduction command shows it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def allocate_run_root(output_dir: str | os.PathLike) -> Path:
    """A new ``<output_dir>/studio/run<k>`` (the first free k, created atomically)."""
    base = Path(output_dir) / STUDIO_RUNS_DIR
    base.mkdir(parents=True, exist_ok=True)
    index = 0
    while True:
        candidate = base / f"run{index}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            index += 1


def _parse_generate_args(config_argv: Sequence[str]) -> argparse.Namespace:
    """generate.py's settings flags (``generation.settings``) parsed from the command's configuration part, so
    that the configs below are built exactly as the command line builds them."""
    from generation.settings import SettingsError, parse_settings_argv

    try:
        return parse_settings_argv(config_argv)
    except SettingsError as error:
        raise StudioError(str(error)) from None


def _build_configs(args: argparse.Namespace):
    """``generation.settings.RunConfigs`` of the parsed flags (what generate.py runs for the same command)."""
    from generation.settings import configs_from_args

    try:
        return configs_from_args(args)
    except ValueError as error:  # RunModelError and SettingsError are ValueErrors
        raise StudioError(str(error)) from None


def _save_run(run_dir: Path, args: argparse.Namespace, model, configs, result, condition, elapsed_s: float,
              command: Sequence[str]) -> None:
    """config.json and ``0/video_0.*`` as generate.py writes them (``generation.runs``); the config's
    "command" is the reproduction command, not the app's own argv."""
    from generation.runs import record_invocation, run_invocation, run_settings, save_video_outputs
    from generation.settings import output_options_from_args

    settings = run_settings(configs, model, prompt_type="custom")
    invocation = run_invocation(model, command=command, args=args, window=[0, 1], written_by="studio (app.py)")
    record_invocation(run_dir, settings, invocation)
    save_video_outputs(result, run_dir / "0", 0, condition, output_options_from_args(args, configs.spec), elapsed_s)


def _video_output(spec_name: str, run_dir: Path, command: Sequence[str], elapsed_s: float) -> VideoOutput:
    prompt_dir = run_dir / "0"
    annotated = prompt_dir / "video_0_annotated.gif"
    return VideoOutput(run_model=spec_name, run_dir=run_dir, video_gif=prompt_dir / "video_0.gif",
                       video_joblib=prompt_dir / "video_0.joblib",
                       annotated_gif=annotated if annotated.is_file() else None,
                       command=tuple(command), elapsed_s=elapsed_s)


def _generate_one(model, prompt: str, configs, seed: int, condition,
                  on_step: Callable[[int, int], None] | None):
    from generation.sampling import generate_video

    # The configs of the command line, passed as generate.py passes them: masking / modulation as controls.
    return generate_video(model, prompt, configs.sampling, seed, condition=condition, controls=configs.attention,
                          guidance=configs.guidance, gligen=configs.gligen, execution=configs.execution,
                          step_callback=on_step)


def run_generation(request: GenerationRequest, settings: StudioSettings, pool: ModelPool,
                   progress: ProgressFn | None = None) -> GenerationResult:
    """The LVD video of the layout and, beside it, the baseline video of the same prompt and seed.

    Writes ``<output>/studio/run<k>/lvd`` and ``.../baseline`` as generate.py writes a run, the
    layout file, and ``commands.sh`` with the generate.py commands that reproduce both videos.
    Raises StudioError for settings or layouts the library rejects; other errors propagate.
    """
    spec = get_spec(request.run_model)
    if spec.method not in LAYOUT_METHODS:
        raise StudioError(f"run-model {spec.name!r} ({spec.method}) takes no layout; pick an LVD run-model")
    # Everything is checked before any folder is made.
    check_layout_bounds(request.layout)
    try:
        validate_layout(request.layout)
    except LayoutError as error:
        raise StudioError(str(error)) from None
    whole_number(request.num_inference_steps, "number of steps", 1, MAX_STEPS)
    whole_number(request.seed, "seed", 0, MAX_SEED)
    controls = check_controls(request.controls, spec)
    flags = ({name: check_guidance_value(name, value) for name, value in request.guidance_flags.items()}
             if "energy" in controls else {})
    # The command names the families only when they are not the run-model's, as a user would write it.
    command_controls = None if controls == spec.controls else controls
    problem = _weights_problem(spec, settings.model_paths.get(spec.name))
    if problem:
        raise StudioError(f"{spec.name}: {problem}")

    shared = commands.CommandSettings(seed=request.seed, num_inference_steps=request.num_inference_steps,
                                      device=settings.device, dtype=settings.dtype,
                                      model_path=settings.model_paths.get(spec.name))
    config_argv = commands.build_lvd_command(spec.name, "", shared, flags, "", command_controls).config_argv
    configs = _build_configs(_parse_generate_args(config_argv))
    sampling = configs.sampling
    seed = _derive_seed(request.seed)

    with pool.lock:
        from models.devices import apply_cpu_threads, choose_cpu_threads

        apply_cpu_threads(choose_cpu_threads(settings.threads, small_model=spec.small))  # as generate.py does
        model = pool.get(spec)
        try:  # the layout is checked against the tokenizer before any folder is made
            from generation.backbones import backbone_for

            condition = backbone_for(model).build_condition(request.layout, sampling.num_frames)
        except LayoutError as error:
            raise StudioError(str(error)) from None
        run_root = allocate_run_root(settings.output_dir)
        lvd_dir, layout_file = run_root / "lvd", run_root / "lvd" / "0" / "layout.json"
        lvd_command = commands.build_lvd_command(spec.name, display_path(layout_file), shared, flags,
                                                 display_path(run_root / "reproduce" / "lvd"), command_controls)
        args = _parse_generate_args(lvd_command.config_argv)
        write_layout_file(layout_file, request.layout, condition)
        baseline_spec = baseline_for(spec) if request.with_baseline else None
        if baseline_spec is not None and _weights_problem(baseline_spec, settings.model_paths.get(baseline_spec.name)):
            baseline_spec = None
        total = sampling.num_inference_steps * (2 if baseline_spec is not None else 1)

        def on_step(offset: int, what: str):
            return None if progress is None else (lambda i, n: progress(f"{what} {i + 1}/{n}", offset + i + 1, total))

        started = time.perf_counter()
        result = _generate_one(model, request.layout.prompt, configs, seed, condition,
                               on_step(0, f"{spec.name}: denoising step"))
        elapsed = time.perf_counter() - started
        _save_run(lvd_dir, args, model, configs, result, condition, elapsed, lvd_command.argv)
        lvd = _video_output(spec.name, lvd_dir, lvd_command.argv, elapsed)

        baseline = None
        notes = []
        if configs.guidance is not None and configs.guidance.disabled_reason():
            notes.append(f"guidance off: {configs.guidance.disabled_reason()}")
        if baseline_spec is None and request.with_baseline:
            notes.append(f"no baseline: no unguided run-model with the weights of {spec.name} is available")
        if baseline_spec is not None:
            base_dir = run_root / "baseline"
            base_shared = dataclasses.replace(shared, model_path=settings.model_paths.get(baseline_spec.name))
            # A fair comparison: the baseline samples with the LVD arm's sampler (Wan: the same UniPC corrector
            # setting), and its command says so.
            corrector = sampling.corrector_off_steps if baseline_spec.family == WAN_FAMILY else None
            base_command = commands.build_baseline_command(baseline_spec.name, request.layout.prompt, base_shared,
                                                           display_path(run_root / "reproduce" / "baseline"),
                                                           corrector_off_steps=corrector)
            base_args = _parse_generate_args(base_command.config_argv)
            base_configs = _build_configs(base_args)
            base_model = pool.get(baseline_spec)
            started = time.perf_counter()
            # Baselines see the prompt as it is (generate.py's baselines take no layout).
            base_result = _generate_one(base_model, request.layout.prompt, base_configs, seed, None,
                                        on_step(sampling.num_inference_steps, f"{baseline_spec.name}: denoising step"))
            base_elapsed = time.perf_counter() - started
            _save_run(base_dir, base_args, base_model, base_configs, base_result, None, base_elapsed,
                      base_command.argv)
            baseline = _video_output(baseline_spec.name, base_dir, base_command.argv, base_elapsed)

    commands_file = run_root / "commands.sh"
    lines = ["#!/usr/bin/env bash", "# Reproduce this studio run from the repository root.",
             f"# LVD ({spec.name}):", commands.format_command(lvd.command)]
    if baseline is not None:
        lines += [f"# Baseline ({baseline.run_model}), same prompt and seed:",
                  commands.format_command(baseline.command)]
    atomic_write_text(commands_file, "\n".join(lines) + "\n")
    log = tuple(dataclasses.asdict(record) for record in result.guidance_log)
    return GenerationResult(run_root=run_root, layout_file=layout_file, lvd=lvd, baseline=baseline,
                            guidance_log=log, commands_file=commands_file, notes=tuple(notes),
                            controls=configs.controls)


def _derive_seed(seed_offset: int) -> int:
    """The seed generate.py gives prompt 0, repeat 0 with ``--seed_offset seed_offset``."""
    from generation.config import derive_seed

    return derive_seed(0, 0, seed_offset)


def preview_dir(settings: StudioSettings) -> Path:
    """``<output>/studio/previews``: the page's files (preview GIFs, layout downloads), emptied at start."""
    import shutil

    folder = Path(settings.output_dir) / STUDIO_RUNS_DIR / PREVIEWS_DIR
    shutil.rmtree(folder, ignore_errors=True)  # a previous server's
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def scratch_path(directory: str | os.PathLike, name: str, keep: int = MAX_PREVIEW_FOLDERS) -> Path:
    """``<directory>/<fresh folder>/<name>``: a file for the page (preview GIF, layout download). Only the
    ``keep`` newest folders stay (a page shows the latest ones), so the folder stays small however long the
    server runs."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=directory))
    old = sorted((p for p in Path(directory).iterdir() if p.is_dir() and p != folder),
                 key=lambda p: p.stat().st_mtime_ns)
    for stale in old[:max(0, len(old) - keep + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder / name


def opening_prompt(run_model: str) -> str:
    """The prompt the page opens with: one of the shipped cache of ``run_model`` (`shipped_cache_name`)."""
    if get_spec(run_model).bundled:
        return "a green square moving from the left to the right"
    return "A bear walks from the left to the right"


def shipped_cache_name(run_model: str, template_version: str = DEFAULT_TEMPLATE_VERSION) -> str:
    """The shipped cache a run-model opens with: the shapes benchmark's rule-based layouts for the shipped
    shapes models (``cache/cache_shapes_<template>_rule-based.json``), else the hand-written demo cache."""
    if get_spec(run_model).bundled:
        return cache_file_name("shapes", template_version, "rule-based")
    return shipped_demo_cache_name(template_version)


def shipped_demo_cache_name(template_version: str = DEFAULT_TEMPLATE_VERSION) -> str:
    """The hand-written demo cache the repository ships (``cache/cache_demo_<template>_handwritten.json``)."""
    return cache_file_name("demo", template_version, "handwritten")
