"""Stage-2 runs on disk (spec 8.1): what a prompt folder holds, when a video counts as done, the run's
config record, and generating a batch of videos into their folders.

A run folder ``<output>/imgs_<type>_template<ver>[_<llm>]_<run-model>[_<suffix>]/run<k>/`` holds
``config.json`` (the resolved settings and one record per invocation: shard, process, host, commit),
``failures.jsonl`` and one folder per prompt index with ``layout.json`` (layout methods) and, per
repeat ``r``: ``video_<r>.json`` (seed, prompt, guidance log), the requested video formats, the
annotated GIF and optionally the final latents. Every file is written atomically; a video is done
when every file it was asked for exists, so a run killed at any point resumes where it stopped.

The CLI (``generate.py``) owns flags, run-folder choice, sharding and the batch's failures; this module
owns the files and one call per batch of videos (:func:`generate_and_save`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from generation.backbones import backbone_for
from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig
from generation.controls import family_of
from generation.sampling import StepCallback, VideoRequest, VideoResult, generate_videos
from models.gligen import GligenConfig
from models.registry import WAN_FAMILY
from utils.cache import locked
from utils.io import atomic_write_json
from utils.layout import LayoutCondition, SceneLayout, layout_to_dict
from utils.video_io import DEFAULT_FPS, VIDEO_FORMATS, save_latents, save_video, write_gif

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"
LAYOUT_FILE = "layout.json"
# The settings that must match when a run is resumed (a change is recorded and warned about).
RUN_SETTINGS_KEYS = ("run_model", "sampling", "guidance", "gligen", "controls", "prompt_type", "template_version",
                     "llm_model", "solver")
# Temporary files of an atomic write (utils.io.atomic_path) that a killed process left behind.
TEMP_FILE_GLOB = ".*.tmp*"
# Settings fields added after runs were recorded, with the value that reproduces those runs: a resume of such a run
# reads a missing field as this value, so an old run folder resumes with the default settings.
ADDED_SETTINGS = {"sampling": {field.name: field.default for field in dataclasses.fields(SamplingConfig)
                                if field.name in ("cfg_variant", "guidance_rescale")}}


@dataclass(frozen=True)
class OutputOptions:
    """What is written for each video."""

    formats: tuple[str, ...] = ("gif", "joblib")
    fps: float = DEFAULT_FPS
    save_latents: bool = False
    annotate: bool = True   # the annotated GIF (layout methods with objects)
    # ``video_<r>_compare.gif``: the same seed without layout control | this video | the boxes (layout methods).
    compare_baseline: bool = False

    def __post_init__(self):
        unknown = [f for f in self.formats if f not in VIDEO_FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"video formats must be a non-empty subset of {VIDEO_FORMATS}, found {list(self.formats)}")


@dataclass(frozen=True)
class VideoJob:
    """One video to make: prompt index ``index`` (its folder), repeat ``repeat_index``, its seed."""

    index: int
    prompt: str
    repeat_index: int
    seed: int
    condition: LayoutCondition | None
    folder: Path


def video_stem(folder: Path, repeat_index: int) -> Path:
    return Path(folder) / f"video_{repeat_index}"


def expected_video_files(folder: Path, repeat_index: int, options: OutputOptions) -> list[Path]:
    """The files a finished video has: its record and every requested format."""
    stem = video_stem(folder, repeat_index)
    files = [stem.with_suffix(".json")] + [stem.with_name(f"{stem.name}.{fmt}") for fmt in options.formats]
    if options.compare_baseline:
        files.append(comparison_path(folder, repeat_index))
    return files


def comparison_path(folder: Path, repeat_index: int) -> Path:
    stem = video_stem(folder, repeat_index)
    return stem.with_name(f"{stem.name}_compare.gif")


def is_video_done(folder: Path, repeat_index: int, options: OutputOptions) -> bool:
    """Whether a video was finished with these outputs (any format set, joblib or not)."""
    return all(path.is_file() for path in expected_video_files(folder, repeat_index, options))


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temporary files of interrupted atomic writes in ``folder`` (not below it); returns how many.

    Only for folders no other process is writing into (a prompt folder of this process's share).
    """
    removed = 0
    for path in Path(folder).glob(TEMP_FILE_GLOB):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_layout_record(folder: Path, *, prompt: str, index: int, occurrence: int, layout: SceneLayout,
                        condition: LayoutCondition, source: str | None = None) -> Path:
    """``<folder>/layout.json``: the parsed layout, the diffusion prompt, phrases, token positions and the
    per-frame boxes (what the video was generated from; evaluation and ``--layout-file`` read it)."""
    record = {"prompt": prompt, "prompt_index": index, "occurrence": occurrence, "layout": layout_to_dict(layout),
              "diffusion_prompt": condition.prompt, "phrases": list(condition.phrases),
              "token_positions": None if condition.token_positions is None else [list(p) for p in
                                                                                 condition.token_positions],
              "num_frames": condition.num_frames, "boxes_xyxy": condition.boxes_xyxy.tolist()}
    if source is not None:
        record["source"] = source
    path = Path(folder) / LAYOUT_FILE
    atomic_write_json(path, record)
    return path


def save_comparison(result: VideoResult, baseline: VideoResult, folder: Path, repeat_index: int,
                    condition: LayoutCondition | None, fps: float) -> Path:
    """``video_<r>_compare.gif``: baseline | this video | the layout's boxes, enlarged if small."""
    from utils.visualize import comparison_scale, compose_comparison, draw_layout_video

    num_frames, height, width, _ = result.frames.shape
    panels = [("baseline (no layout)", baseline.frames), ("LVD", result.frames)]
    if condition is not None and condition.phrases:
        scale = comparison_scale(height, width)  # boxes drawn at the enlarged size, so their labels read
        panels.append(("layout", draw_layout_video(condition.boxes_at(num_frames), condition.phrases, num_frames,
                                                   height * scale, width * scale)))
    path = comparison_path(folder, repeat_index)
    write_gif(compose_comparison(panels), path, fps=fps)
    return path


def save_video_outputs(result: VideoResult, folder: Path, repeat_index: int, condition: LayoutCondition | None,
                       options: OutputOptions, elapsed_s: float) -> None:
    """Write one video's files; the record (``video_<r>.json``) goes last, so that a video with all its
    files is finished (:func:`is_video_done`)."""
    from utils.visualize import annotate_video  # drawing code only when drawing

    stem = video_stem(folder, repeat_index)
    if options.save_latents:
        save_latents(result.latents, stem.with_name(f"{stem.name}.latents.pt"))
    if options.annotate and condition is not None and condition.phrases:
        boxes = condition.boxes_at(result.frames.shape[0])
        write_gif(annotate_video(result.frames, boxes, condition.phrases),
                  stem.with_name(f"{stem.name}_annotated.gif"), fps=options.fps)
    save_video(result.frames, stem, formats=options.formats, fps=options.fps)
    atomic_write_json(stem.with_suffix(".json"), {
        "seed": result.seed, "repeat_index": repeat_index, "prompt": result.prompt, "elapsed_s": round(elapsed_s, 3),
        "num_frames": int(result.frames.shape[0]), "formats": list(options.formats),
        "guided_iterations": len(result.guidance_log),
        "guidance_log": [dataclasses.asdict(record) for record in result.guidance_log]})


def generate_and_save(model, jobs: Sequence[VideoJob], sampling: SamplingConfig, *,
                      controls: Sequence[Any] = (), guidance: GuidanceConfig | None = None,
                      gligen: GligenConfig | None = None, execution: ExecutionConfig | None = None,
                      options: OutputOptions = OutputOptions(),
                      step_callback: StepCallback | None = None) -> list[VideoResult]:
    """Generate ``jobs`` as one batch (each keeps its seed, layout and control state) and save each."""
    started = time.perf_counter()
    requests = [VideoRequest(job.prompt, job.seed, job.condition) for job in jobs]
    results = generate_videos(model, requests, sampling, controls=controls, guidance=guidance, gligen=gligen,
                              execution=execution, step_callback=step_callback)
    elapsed = (time.perf_counter() - started) / max(len(jobs), 1)
    baselines = [None] * len(jobs)
    if options.compare_baseline:  # the baseline's video: the prompt as is, the same seed, no layout control
        baselines = generate_videos(model, [VideoRequest(job.prompt, job.seed) for job in jobs], sampling,
                                    execution=execution)
    for job, result, baseline in zip(jobs, results, baselines):
        job.folder.mkdir(parents=True, exist_ok=True)
        if baseline is not None:
            save_comparison(result, baseline, job.folder, job.repeat_index, job.condition, options.fps)
        save_video_outputs(result, job.folder, job.repeat_index, job.condition, options, elapsed)
    return results


# --------------------------------------------------------------------------------------------
# The run's config record


def describe_environment(device: str) -> dict[str, Any]:
    """Where and with what this process runs: host, GPU, library versions, the project's git commit."""
    import diffusers
    import torch
    import transformers

    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "gpu": gpu,
            "python": platform.python_version(), "git_commit": git_commit(Path(__file__).resolve().parents[1]),
            "torch_threads": torch.get_num_threads(),  # on CPU the count changes the last bits of sums
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__}}


def git_commit(folder: Path) -> str | None:
    """The checked-out commit of the project (``+dirty`` with uncommitted changes), None outside a checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def file_sha256(path: str | os.PathLike) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


SEED_RULE = "prompt_index + 6789 * repeat_index + seed_offset"  # generation.config.derive_seed


def run_settings(configs, model, *, prompt_type: str, template_version: str | None = None,
                 llm_model: str | None = None) -> dict[str, Any]:
    """The settings of a run's config.json (what evaluation reads and a resume compares), for every writer
    (generate.py, the studio): the run-model, the typed configs (``generation.settings.RunConfigs``), the seed
    rule and, for Wan, the sampler as it runs (UniPC, corrector off on the first K steps; 0 = stock) and where
    umT5 waits between prompts."""
    solver = None
    if configs.spec.family == WAN_FAMILY:
        steps = configs.sampling.corrector_off_steps
        scheduler = backbone_for(model).make_scheduler(steps)
        solver = {"name": "unipc", "corrector_off_steps": model.corrector_off_steps if steps is None else steps,
                  "offload_text_encoder": model.offload_text_encoder, "scheduler": dict(scheduler.config)}
    return {
        "run_model": dataclasses.asdict(configs.spec), "prompt_type": prompt_type,
        "template_version": template_version, "llm_model": llm_model,
        "sampling": dataclasses.asdict(configs.sampling),
        "guidance": dataclasses.asdict(configs.guidance) if configs.guidance is not None else None,
        "execution": dataclasses.asdict(configs.execution),
        "gligen": dataclasses.asdict(configs.gligen) if configs.gligen is not None else None,
        "controls": {"families": list(configs.controls),
                     **{family_of(config).name: dataclasses.asdict(config) for config in configs.attention}},
        "seed_rule": SEED_RULE, "solver": solver,
    }


def run_invocation(model, *, command: Sequence[str], args: Any, window: Sequence[int | None], rank: int = 0,
                   num_processes: int = 1, **extra: Any) -> dict[str, Any]:
    """One invocation's record of config.json: its command and flags, shard, device, weights and environment."""
    return {"command": list(command), **extra, "args": vars(args), "rank": rank, "num_processes": num_processes,
            "window": list(window), "device": str(model.device), "dtype": str(model.dtype),
            "model_source": model.source, **describe_environment(str(model.device))}


class RunSettingsError(ValueError):
    """A resume of a run folder with settings that differ from the run's own (one run would mix videos)."""


def _describe_change(key: str, before: Any, after: Any) -> str:
    """``key: name a -> b, ...`` for the fields of a settings group that differ (at most three)."""
    if isinstance(before, dict) and isinstance(after, dict):
        fields = [f"{name} {before.get(name)!r} -> {after.get(name)!r}" for name in sorted(set(before) | set(after))
                  if before.get(name) != after.get(name)]
        return f"{key}: {', '.join(fields[:3])}" + (", ..." if len(fields) > 3 else "")
    return f"{key}: {before!r} -> {after!r}"


def record_invocation(run_dir: Path, settings: dict[str, Any], invocation: dict[str, Any], *,
                      allow_changed: bool = True) -> list[str]:
    """Add this process's record to ``<run_dir>/config.json``; returns the settings that differ from the
    run's first invocation (a resume with other settings), which are recorded, never overwritten.
    With ``allow_changed`` False such a resume raises :class:`RunSettingsError` and records nothing.

    The file holds the run's settings at the top (those of its first invocation, which evaluation reads)
    and ``"invocations"``: one entry per process and shard, each with its own command, window, settings,
    host, GPU, commit and the layout cache's hash. Shards and processes add to it under a lock.
    """
    path = Path(run_dir) / RUN_CONFIG_FILE
    settings = json.loads(json.dumps(settings, default=str))
    invocation = json.loads(json.dumps(invocation, default=str))
    with locked(path):
        existing = None
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s is not valid JSON; it is kept as %s and a new one is started", path,
                               path.with_suffix(".corrupt.json"))
                os.replace(path, path.with_suffix(".corrupt.json"))
        if not isinstance(existing, dict):
            existing = {**settings, "invocations": []}
        existing.setdefault("invocations", [])
        recorded = {key: ({**ADDED_SETTINGS[key], **existing[key]} if isinstance(existing.get(key), dict)
                          and key in ADDED_SETTINGS else existing.get(key)) for key in RUN_SETTINGS_KEYS}
        changed = [key for key in RUN_SETTINGS_KEYS
                   if json.dumps(recorded[key], sort_keys=True) != json.dumps(settings.get(key), sort_keys=True)]
        if changed and not allow_changed:
            details = "; ".join(_describe_change(key, recorded[key], settings.get(key)) for key in changed)
            raise RunSettingsError(f"{run_dir} was made with other settings ({details}): its videos and this run's "
                                   "would be mixed in one run folder; use another --force_run_ind (or none, for a "
                                   "new run<k>), or pass --allow-mixed-settings")
        existing["invocations"].append({**invocation, "settings": settings, "changed_settings": changed})
        atomic_write_json(path, existing)
    return changed
