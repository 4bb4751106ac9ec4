"""Upsample generated videos: Zeroscope v2 XL video-to-video and / or the SDXL refiner per frame (spec 11).

A thin shell over :mod:`generation.upsampling`. For each input video (a joblib; a ``.gif`` path reads
the joblib next to it) it writes, next to the input:
- ``--use_zsxl``: ``<video>_zsxl`` (strength 0.35, else ``<video>_zsxl_s<strength>``);
- ``--use_sdxl``: ``<video>_sdxl`` (likewise ``_sdxl_s<strength>``);
- ``--use_zssdxl``: the Zeroscope XL video, then SDXL at strength 0.1 on it: ``<video>_zsxl_sdxl_s0.1``;
each as ``.gif`` (125 ms per frame), ``.json`` (settings), ``.mp4`` (8.01 fps, with ``--output-mp4``)
and ``.joblib`` (bz2, written last). An output whose joblib exists is skipped (resume). Departures
that change no pixel: the reference wrote SDXL GIFs with imageio's default frame time and mp4 for
Zeroscope XL only (via OpenCV); here every GIF is 8 fps and ``--output-mp4`` applies to every output.
Zeroscope XL runs on all videos first, then SDXL, so only one model is in memory at a time.

Examples::

    python scripts/upsample.py --videos img_generations/.../run0/0/video_0.joblib \\
        --prompts "A brown dog running on the grass" --use_zsxl --horizontal --output-mp4
    # no weights needed: tiny random models, small size (the output is noise)
    python scripts/upsample.py --videos path/to/video_0.gif --prompts "a cat" --use_zssdxl --tiny \\
        --width 256 --height 144
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from generation.upsampling_config import (CHAINED_SDXL_STRENGTH, DEFAULT_SEED, DEFAULT_STRENGTH, GIF_FPS, MP4_FPS,
                                          SDXL, UPSAMPLE_NEGATIVE_PROMPT, ZEROSCOPE_XL, RefineConfig,
                                          compute_target_size, sdxl_refine_config, upsampled_video_stem,
                                          zeroscope_xl_refine_config)
from utils.cli import float_in, int_in, run_cli
from utils.failures import describe_error, record_failure

logger = logging.getLogger("upsample")

UPSAMPLE_FAILURES_FILE = "upsample_failures.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--videos", nargs="+", required=True,
                        help="input videos (.joblib; a .gif path reads the .joblib next to it)")
    parser.add_argument("--prompts", nargs="+", required=True,
                        help="one prompt per video, or one prompt for all videos")
    parser.add_argument("--seed", type=int_in(0), default=DEFAULT_SEED)
    parser.add_argument("--strength", type=float_in(0.0, 1.0, low_open=True), default=DEFAULT_STRENGTH,
                        help="how much of the video is re-noised (0 keeps it, 1 ignores it)")
    parser.add_argument("--negative_prompt", default=UPSAMPLE_NEGATIVE_PROMPT,
                        help="negative prompt of Zeroscope XL (the SDXL refiner gets none, as in the reference)")
    parser.add_argument("--use_zsxl", action="store_true", help="Zeroscope v2 XL video-to-video")
    parser.add_argument("--use_sdxl", action="store_true", help="SDXL refiner, frame by frame")
    parser.add_argument("--use_zssdxl", action="store_true",
                        help=f"Zeroscope XL, then the SDXL refiner at strength {CHAINED_SDXL_STRENGTH} on its output")
    parser.add_argument("--horizontal", action="store_true",
                        help="resize to 1024x576 (width x height); otherwise 1024x1024 (LANCZOS)")
    parser.add_argument("--output-mp4", action="store_true", help="also write an .mp4 (8.01 fps)")
    parser.add_argument("--width", type=int_in(8), default=None, help="override the output width (multiple of 8)")
    parser.add_argument("--height", type=int_in(8), default=None, help="override the output height (multiple of 8)")
    parser.add_argument("--num_inference_steps", type=int_in(1), default=50,
                        help="scheduler steps before the strength cut (stock pipelines: 50)")
    parser.add_argument("--guidance_scale", type=float_in(0.0), default=None,
                        help="CFG scale for both models; unset: 15.0 for Zeroscope XL, 5.0 for SDXL")
    parser.add_argument("--zsxl-model-path", default=None,
                        help="local folder with cerspense/zeroscope_v2_XL; unset: the HF cache / hub")
    parser.add_argument("--sdxl-model-path", default=None,
                        help="local folder with stabilityai/stable-diffusion-xl-refiner-1.0; unset: the HF cache / hub")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; unset: CUDA when available")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="unset: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="keep weights in CPU memory and move each model part to the GPU only while it runs")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode / encode each frame in tiles (less memory; slightly different pixels)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random-weight models (no download): the output is noise; for tests and demos")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs whose joblib exists")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing video")
    parser.add_argument("--verbose", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class UpsampleJob:
    """One output: ``upsampler`` applied to ``input_path`` with ``config``, written as ``output_stem.*``."""

    upsampler: str
    input_path: Path
    output_stem: Path
    prompt: str
    config: RefineConfig


def broadcast_prompts(videos: list[str], prompts: list[str]) -> list[str]:
    """One prompt per video; a single prompt is used for every video."""
    if len(prompts) == len(videos):
        return list(prompts)
    if len(prompts) == 1:
        return list(prompts) * len(videos)
    raise ValueError(f"got {len(prompts)} prompts for {len(videos)} videos: give one prompt per video, "
                     "or one prompt for all of them")


def plan_jobs(args) -> list[UpsampleJob]:
    """Every output the flags ask for, Zeroscope XL jobs first (chained SDXL jobs read their outputs)."""
    from utils.video_io import resolve_video_path

    prompts = broadcast_prompts(args.videos, args.prompts)
    common = {"num_inference_steps": args.num_inference_steps, "seed": args.seed}
    if args.guidance_scale is not None:
        common["guidance_scale"] = args.guidance_scale
    zsxl_config = zeroscope_xl_refine_config(strength=args.strength, negative_prompt=args.negative_prompt, **common)
    zsxl_jobs, sdxl_jobs = [], []
    for video, prompt in zip(args.videos, prompts):
        path = resolve_video_path(video)
        if args.use_zsxl or args.use_zssdxl:
            zsxl_stem = upsampled_video_stem(path, ZEROSCOPE_XL, args.strength)
            zsxl_jobs.append(UpsampleJob(ZEROSCOPE_XL, path, zsxl_stem, prompt, zsxl_config))
        if args.use_sdxl:
            config = sdxl_refine_config(strength=args.strength, **common)
            sdxl_jobs.append(UpsampleJob(SDXL, path, upsampled_video_stem(path, SDXL, args.strength), prompt, config))
        if args.use_zssdxl:
            chained_input = zsxl_stem.with_name(zsxl_stem.name + ".joblib")
            config = sdxl_refine_config(strength=CHAINED_SDXL_STRENGTH, **common)
            sdxl_jobs.append(UpsampleJob(SDXL, chained_input,
                                         upsampled_video_stem(chained_input, SDXL, CHAINED_SDXL_STRENGTH),
                                         prompt, config))
    unique: dict[Path, UpsampleJob] = {}
    for job in zsxl_jobs + sdxl_jobs:  # a video listed twice is upsampled once
        if job.output_stem in unique and unique[job.output_stem].prompt != job.prompt:
            logger.warning("%s is listed twice with different prompts; using the first (%r)",
                           job.input_path, unique[job.output_stem].prompt)
        unique.setdefault(job.output_stem, job)
    return list(unique.values())


def is_done(job: UpsampleJob) -> bool:
    return job.output_stem.with_name(job.output_stem.name + ".joblib").exists()


# --------------------------------------------------------------------------------------------
# Running


def load_upsampler(upsampler: str, args):
    """The Zeroscope XL `VideoModel` or the SDXL refiner pipeline the flags ask for."""
    from models import upsamplers

    memory = {"cpu_offload": args.cpu_offload, "vae_tiling": args.vae_tiling}
    if upsampler == ZEROSCOPE_XL:
        if args.tiny and args.zsxl_model_path is None:
            return upsamplers.build_tiny_zeroscope_xl(device=args.device, dtype=args.dtype, **memory)
        return upsamplers.load_zeroscope_xl(args.zsxl_model_path, device=args.device, dtype=args.dtype, **memory)
    if args.tiny and args.sdxl_model_path is None:
        return upsamplers.build_tiny_sdxl_refiner(device=args.device, dtype=args.dtype, **memory)
    return upsamplers.load_sdxl_refiner(args.sdxl_model_path, device=args.device, dtype=args.dtype, **memory)


def model_source(model) -> str:
    return getattr(model, "source", None) or str(getattr(model, "name_or_path", "") or type(model).__name__)


def run_job(job: UpsampleJob, model, height: int, width: int, args) -> dict[str, Path]:
    """Load, resize, refine and save one video; returns the written paths."""
    from tqdm import tqdm

    from generation.upsampling import refine_frames_sdxl, refine_video_zeroscope_xl, resize_frames
    from utils.io import atomic_write_json
    from utils.video_io import load_video, save_video

    frames = resize_frames(load_video(job.input_path), height, width)  # (F, height, width, 3) uint8
    start = time.perf_counter()
    if job.upsampler == ZEROSCOPE_XL:
        total = int(job.config.num_inference_steps * job.config.strength)
        with tqdm(total=total, desc=f"{job.output_stem.name} steps", leave=False, dynamic_ncols=True) as bar:
            upsampled = refine_video_zeroscope_xl(model, frames, job.prompt, job.config,
                                                  step_callback=lambda i, n: bar.update(1)).frames
    else:
        with tqdm(total=len(frames), desc=f"{job.output_stem.name} frames", leave=False, dynamic_ncols=True) as bar:
            upsampled = refine_frames_sdxl(model, frames, job.prompt, job.config,
                                           frame_callback=lambda i, n: bar.update(1))
    elapsed_s = time.perf_counter() - start
    atomic_write_json(job.output_stem.with_name(job.output_stem.name + ".json"), {
        "input": str(job.input_path), "upsampler": job.upsampler, "prompt": job.prompt,
        "config": dataclasses.asdict(job.config), "height": height, "width": width,
        "num_frames": int(upsampled.shape[0]), "model": model_source(model), "tiny": bool(args.tiny),
        "elapsed_s": round(elapsed_s, 3), "command": sys.argv})
    paths = save_video(upsampled, job.output_stem, formats=("gif", "joblib"), fps=GIF_FPS)
    if args.output_mp4:
        from utils.video_io import write_mp4

        paths["mp4"] = write_mp4(upsampled, job.output_stem.with_name(job.output_stem.name + ".mp4"), fps=MP4_FPS)
    return paths


def _record_failure(job: UpsampleJob, error: BaseException) -> Path:
    """One record in ``upsample_failures.jsonl`` next to the output; returns the log's path."""
    path = job.output_stem.parent / UPSAMPLE_FAILURES_FILE
    record_failure(path, error, input=str(job.input_path), output=str(job.output_stem), upsampler=job.upsampler,
                   prompt=job.prompt)
    return path


def find_unreadable_inputs(jobs: list[UpsampleJob]) -> dict[Path, str]:
    """Inputs that are not there (or not files), checked before any model is loaded: path -> problem.
    Inputs written by an earlier job of this run (chained SDXL after Zeroscope XL) are not checked."""
    produced = {job.output_stem.with_name(job.output_stem.name + ".joblib") for job in jobs}
    problems = {}
    for job in jobs:
        path = job.input_path
        if path in produced or path in problems:
            continue
        if not path.exists():
            problems[path] = "not found"
        elif not path.is_file():
            problems[path] = "not a file"
        elif not os.access(path, os.R_OK):
            problems[path] = "not readable"
    return problems


def _release_memory() -> None:
    """Return freed model memory (the caller dropped its references) before the next model loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not (args.use_zsxl or args.use_sdxl or args.use_zssdxl):
        print("error: choose an upsampler: --use_zsxl, --use_sdxl and / or --use_zssdxl", file=sys.stderr)
        return 2
    try:
        height, width = compute_target_size(args.horizontal, args.height, args.width)
        jobs = plan_jobs(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    counts = {"written": 0, "already_done": 0, "failed": 0}
    failed_outputs: set[Path] = set()
    failed_inputs = find_unreadable_inputs(jobs)
    for path, problem in failed_inputs.items():
        print(f"{path}: {problem}; its outputs are skipped", file=sys.stderr)
    if args.tiny:
        print("note: --tiny uses tiny random-weight models; the upsampled videos are noise "
              "(this only exercises the code paths)")
    for upsampler in (ZEROSCOPE_XL, SDXL):
        stage = [job for job in jobs if job.upsampler == upsampler]
        pending = [job for job in stage if args.overwrite or not is_done(job)]
        counts["already_done"] += len(stage) - len(pending)
        for job in stage:
            if job not in pending:
                print(f"{job.output_stem}.joblib exists; skipped")
        for job in [job for job in pending if job.input_path in failed_inputs]:
            counts["failed"] += 1
            failed_outputs.add(job.output_stem)
            _record_failure(job, FileNotFoundError(f"{job.input_path}: {failed_inputs[job.input_path]}"))
        pending = [job for job in pending if job.input_path not in failed_inputs]
        for job in [job for job in pending if job.input_path.with_suffix("") in failed_outputs]:
            print(f"{job.output_stem}: skipped, its input {job.input_path} failed")  # a chained job
            counts["failed"] += 1
        pending = [job for job in pending if job.input_path.with_suffix("") not in failed_outputs]
        if not pending:  # nothing left to run: no model is loaded
            continue
        try:
            model = load_upsampler(upsampler, args)
        except Exception as error:  # missing weights and the like: one clear line, no traceback
            print(f"error: {error}", file=sys.stderr)
            return 2
        for job in pending:
            try:
                paths = run_job(job, model, height, width, args)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # one bad video never stops the batch (unless --fail-fast)
                counts["failed"] += 1
                failed_outputs.add(job.output_stem)
                log = _record_failure(job, error)
                print(f"{job.output_stem}: failed: {describe_error(error)}; traceback in {log}", file=sys.stderr)
                if args.fail_fast:
                    return 1
                continue
            counts["written"] += 1
            print(" ".join(str(paths[fmt]) for fmt in ("gif", "mp4", "joblib") if fmt in paths))
        del model
        _release_memory()
    print(", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
