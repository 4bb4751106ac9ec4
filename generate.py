"""Stage 2 CLI: layouts from the cache -> videos, for a prompt set (reference spec 1.2, 8).

A thin shell over :func:`generation.sampling.generate_video`: it reads the layout cache, builds the
configs, and owns the batch concerns: run directories, resume (a video whose joblib exists is
done), sharding (``--skip_first_prompts``/``--num_prompts``, and across ``accelerate launch``
processes), per-prompt failures (logged to ``failures.jsonl``; the batch goes on unless
``--fail-fast``) and the resolved config next to the outputs.

Example (no downloads, random tiny model; the output is noise)::

    python generate.py --run-model lvd_tiny --prompt-type demo --model handwritten --template_version v0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from models.registry import RunModelError, get_run_model, run_model_names
from prompt import DEFAULT_TEMPLATE_VERSION, PROMPT_TYPES, get_prompts
from utils.cache import LayoutCache, cache_path
from utils.io import atomic_write_json
from utils.layout import LayoutError, build_condition, layout_to_dict, parse_layout

logger = logging.getLogger("generate")

LAYOUT_METHODS = ("lvd", "lvd-plus", "lvd-gligen")
GUIDED_METHODS = ("lvd", "lvd-plus")
FLOAT_OVERRIDES = ("fg_top_p", "bg_top_p", "fg_weight", "bg_weight", "loss_threshold", "loss_scale",
                   "boxdiff_loss_scale", "com_loss_scale", "attn_sync_weight")
INT_OVERRIDES = ("max_iter", "max_index_step")
BOOL_INT_OVERRIDES = ("use_ratio_based_loss", "boxdiff_normed")  # 0/1 on the command line
SAVE_FORMATS = ("gif", "joblib", "mp4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-model", default="lvd_modelscope256", choices=run_model_names(),
                        help="method and video model (see README); *_tiny are random-weight demos")
    parser.add_argument("--model", default=None,
                        help="LLM whose layout cache to read, e.g. gpt-4-1106-preview (the demo cache: handwritten)")
    parser.add_argument("--template_version", default=DEFAULT_TEMPLATE_VERSION)
    parser.add_argument("--prompt-type", default="demo", choices=PROMPT_TYPES)
    parser.add_argument("--cache-dir", default="cache", help="folder of the layout caches")
    parser.add_argument("--output-dir", default="img_generations", help="root of the run directories")
    parser.add_argument("--save-suffix", default=None, help="appended as _<suffix> to the run directory name")
    parser.add_argument("--repeats", type=int, default=1, help="videos per prompt (seeds differ by 6789)")
    parser.add_argument("--regenerate", type=int, default=1, help="full passes over the prompt list")
    parser.add_argument("--force_run_ind", type=int, default=None,
                        help="write into run<k> (resumable); default: the first unused run<k>")
    parser.add_argument("--skip_first_prompts", type=int, default=0)
    parser.add_argument("--num_prompts", type=int, default=None)
    parser.add_argument("--seed_offset", type=int, default=0)
    parser.add_argument("--num_frames", type=int, default=None, help="default: the run-model's")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: 40")
    for name in FLOAT_OVERRIDES + ("gligen_scheduled_sampling_beta",):
        parser.add_argument(f"--{name}", type=float, default=None)
    for name in INT_OVERRIDES + BOOL_INT_OVERRIDES:
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="videos per forward pass (sweeps); each keeps its own seed and layout")
    parser.add_argument("--low-memory", action="store_true",
                        help="keep the guided pass's activations in host memory (same result, slower; 24 GB cards)")
    parser.add_argument("--initial-noise", choices=("cpu", "reference"), default="cpu",
                        help="cpu: float32 noise from a CPU generator, the same on every machine; reference: "
                             "the original's draw (a generator on the GPU, in fp16), for bit-level comparisons")
    parser.add_argument("--guidance-stop", choices=("carried", "per-step"), default="carried",
                        help="carried: the reference's threshold rule (stops for good once below); "
                             "per-step: recompute the energy at every guided step (spec 15.2)")
    parser.add_argument("--model-path", default=None, help="local folder with the video model's weights")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: automatic)")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--save-formats", nargs="+", default=["gif", "joblib"], choices=SAVE_FORMATS)
    parser.add_argument("--save-latents", action="store_true", help="also save the final latents (.latents.pt)")
    parser.add_argument("--no-annotate", action="store_true", help="skip the annotated GIF with boxes and phrases")
    parser.add_argument("--visualize", action="store_true", help="save the layout box GIF of every prompt")
    parser.add_argument("--dry-run", action="store_true", help="parse the layouts only; load no model")
    parser.add_argument("--fail-fast", "--no-continue-on-error", dest="fail_fast", action="store_true",
                        help="stop at the first failing prompt instead of logging it and going on")
    parser.add_argument("--verbose", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------
# Configs and paths


def resolve_llm_model(model: str | None) -> str | None:
    """The full LLM name for the cache file (aliases as in prompt_batch.py), or None."""
    from utils.llm import resolve_model_name

    return resolve_model_name(model) if model else model


def run_base_dir(args, spec) -> Path:
    """``<output>/imgs_<type>_template<ver><M>_<run-model><S>`` (spec 8.1)."""
    model = resolve_llm_model(args.model)
    model_part = "" if model in (None, "gpt-4") else f"_{model.replace('/', '__')}"
    suffix = f"_{args.save_suffix}" if args.save_suffix else ""
    return Path(args.output_dir) / f"imgs_{args.prompt_type}_template{args.template_version}{model_part}_{spec.name}{suffix}"


def first_unused_run_index(base: Path) -> int:
    index = 0
    while (base / f"run{index}").exists():
        index += 1
    return index


def build_configs(args, spec):
    """(SamplingConfig, GuidanceConfig | None, ExecutionConfig) from the run-model and the given flags only."""
    from generation.config import ExecutionConfig, GuidanceConfig, replace_config, sampling_config_for

    sampling = sampling_config_for(spec, num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                                   initial_noise=args.initial_noise)
    execution = ExecutionConfig(low_memory=args.low_memory)
    # Each guidance flag, None when not given (the run-model's defaults then apply).
    overrides = dict(
        loss_scale=args.loss_scale, loss_threshold=args.loss_threshold, max_iter=args.max_iter,
        max_index_step=args.max_index_step, fg_top_p=args.fg_top_p, bg_top_p=args.bg_top_p,
        fg_weight=args.fg_weight, bg_weight=args.bg_weight, com_loss_scale=args.com_loss_scale,
        boxdiff_loss_scale=args.boxdiff_loss_scale, attn_sync_weight=args.attn_sync_weight,
        use_ratio_based_loss=None if args.use_ratio_based_loss is None else bool(args.use_ratio_based_loss),
        boxdiff_normed=None if args.boxdiff_normed is None else bool(args.boxdiff_normed))
    given = sorted(name for name, value in overrides.items() if value is not None)
    if spec.method not in GUIDED_METHODS:
        if given:
            raise RunModelError(f"run-model {spec.name!r} ({spec.method}) has no attention guidance; "
                                f"remove {', '.join('--' + g for g in given)}")
        return sampling, None, execution
    guidance = replace_config(GuidanceConfig(guided_layers=spec.guided_layers, stop_rule=args.guidance_stop),
                              **overrides)
    return sampling, guidance, execution


def build_gligen_config(args, spec):
    """GligenConfig for grounded run-models (lvd-gligen, lvd-plus), else None (spec 6.1: beta defaults to 1.0)."""
    if not spec.grounded:
        return None
    from models.gligen import GligenConfig

    beta = args.gligen_scheduled_sampling_beta
    return GligenConfig() if beta is None else GligenConfig(scheduled_sampling_beta=beta)


def _work_items(prompts: list[str], args) -> list[tuple[int, int, str, int]]:
    """(pass, running index, prompt, occurrence) in the window, over all ``--regenerate`` passes."""
    from utils.cache import occurrence_indices

    occurrences = occurrence_indices(prompts)
    end = None if args.num_prompts is None else args.skip_first_prompts + args.num_prompts
    items = []
    for pass_index in range(args.regenerate):
        for position, prompt in enumerate(prompts):
            index = pass_index * len(prompts) + position
            if index < args.skip_first_prompts or (end is not None and index >= end):
                continue
            items.append((pass_index, index, prompt, occurrences[position]))
    return items


# --------------------------------------------------------------------------------------------
# Per-prompt work


def _record_failure(run_dir: Path, index: int, prompt: str, error: BaseException, rank: int) -> None:
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "prompt_index": index, "prompt": prompt, "rank": rank,
              "error": f"{type(error).__name__}: {error}",
              "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))}
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(run_dir / "failures.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one append per record: concurrent processes do not interleave lines
    finally:
        os.close(fd)


def _save_outputs(result, prompt_dir: Path, repeat_index: int, args, condition, elapsed_s: float) -> None:
    from utils.video_io import save_latents, save_video
    from utils.visualize import annotate_video

    stem = prompt_dir / f"video_{repeat_index}"
    meta = {"seed": result.seed, "repeat_index": repeat_index, "prompt": result.prompt, "elapsed_s": round(elapsed_s, 3),
            "guided_iterations": len(result.guidance_log),
            "guidance_log": [dataclasses.asdict(record) for record in result.guidance_log]}
    atomic_write_json(stem.with_suffix(".json"), meta)
    if args.save_latents:
        save_latents(result.latents, prompt_dir / f"video_{repeat_index}.latents.pt")
    if condition is not None and not args.no_annotate and condition.phrases:
        from utils.video_io import write_gif

        annotated = annotate_video(result.frames, condition.boxes_xyxy, condition.phrases)
        write_gif(annotated, prompt_dir / f"video_{repeat_index}_annotated.gif")
    # The joblib is written last by save_video: its presence marks the video finished.
    save_video(result.frames, stem, formats=tuple(args.save_formats))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = get_run_model(args.run_model)
        sampling, guidance, execution = build_configs(args, spec)
        gligen = build_gligen_config(args, spec)
    except (RunModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.repeats < 1 or args.regenerate < 1:
        print("error: --batch-size, --repeats and --regenerate must be at least 1", file=sys.stderr)
        return 2
    if args.regenerate > 1 and args.skip_first_prompts != 0:
        print("error: --regenerate > 1 needs --skip_first_prompts 0", file=sys.stderr)
        return 2
    if args.gligen_scheduled_sampling_beta is not None and not spec.grounded:
        print(f"error: --gligen_scheduled_sampling_beta does not apply to {spec.name!r}", file=sys.stderr)
        return 2
    uses_layout = spec.method in LAYOUT_METHODS
    if args.visualize and not uses_layout:
        print("error: --visualize needs a layout method (baselines have no layout)", file=sys.stderr)
        return 2
    llm_model = resolve_llm_model(args.model)
    prompts = get_prompts(args.prompt_type)
    items = _work_items(prompts, args)

    cache = None
    if uses_layout:
        if not llm_model:
            print("error: --model is required for layout methods: it names the layout cache to read "
                  "(e.g. --model gpt-4-1106-preview, or --model handwritten for the demo)", file=sys.stderr)
            return 2
        path = cache_path(args.prompt_type, args.template_version, llm_model, cache_dir=args.cache_dir)
        if not Path(path).is_file():
            print(f"error: no layout cache at {path}; make one with prompt_batch.py --prompt-type "
                  f"{args.prompt_type} --model {llm_model} --auto-query", file=sys.stderr)
            return 2
        cache = LayoutCache.load(path)

    if args.dry_run:
        return _dry_run(items, cache, uses_layout, sampling.num_frames)

    from accelerate import PartialState

    import torch

    # Without CUDA, processes started by a multi-process launcher (accelerate launch --multi_gpu, torchrun)
    # join a CPU (gloo) group; accelerate's own `--cpu` launcher starts one process unless MPI is set up.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    base = run_base_dir(args, spec)
    run_index = args.force_run_ind if args.force_run_ind is not None else first_unused_run_index(base)
    state.wait_for_everyone()  # every process picked the index before any creates it
    run_dir = base / f"run{run_index}"
    run_dir.mkdir(parents=True, exist_ok=True)
    my_items = items[state.process_index::state.num_processes]

    from models.loading import load_video_model

    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    try:
        model = load_video_model(spec, model_path=args.model_path, device=device, dtype=args.dtype)
    except Exception as error:  # missing weights and the like: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if spec.tiny:
        print(f"note: {spec.name} is a tiny random-weight model; its videos are noise (it exercises the code paths)")
    if state.is_main_process:
        _write_run_config(run_dir, args, spec, sampling, guidance, execution, llm_model, model, state.num_processes,
                          gligen)
    return _generate_all(my_items, args, spec, model, sampling, guidance, execution, cache, run_dir, state, gligen)


def _dry_run(items, cache, uses_layout, num_frames: int) -> int:
    missing = 0
    for _, index, prompt, occurrence in items:
        if not uses_layout:
            print(f"[{index}] {prompt}")
            continue
        reply = cache.get(prompt, occurrence)
        if reply is None:
            missing += 1
            print(f"[{index}] no cached layout for {prompt!r} (occurrence {occurrence})")
            continue
        try:
            layout = parse_layout(reply, prompt)
        except LayoutError as error:
            missing += 1
            print(f"[{index}] {error}")
            continue
        condition = build_condition(layout, num_frames)
        print(f"[{index}] {condition.prompt} | objects: {', '.join(condition.phrases) or 'none'}")
    return 1 if missing else 0


def _write_run_config(run_dir: Path, args, spec, sampling, guidance, execution, llm_model, model, num_processes,
                      gligen=None) -> None:
    import diffusers
    import torch
    import transformers

    config = {
        "command": sys.argv,
        "args": vars(args),
        "run_model": dataclasses.asdict(spec),
        "prompt_type": args.prompt_type,
        "template_version": args.template_version,
        "llm_model": llm_model,
        "sampling": dataclasses.asdict(sampling),
        "guidance": dataclasses.asdict(guidance) if guidance is not None else None,
        "execution": dataclasses.asdict(execution),
        "gligen": dataclasses.asdict(gligen) if gligen is not None else None,
        "device": str(model.device), "dtype": str(model.dtype), "num_processes": num_processes,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "seed_rule": "prompt_index + 6789 * repeat_index + seed_offset",
    }
    path = run_dir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        keys = ("run_model", "sampling", "guidance", "gligen", "prompt_type", "template_version", "llm_model")
        changed = [k for k in keys if json.dumps(previous.get(k), default=str) != json.dumps(config[k], default=str)]
        if changed:
            logger.warning("resuming %s with different settings (%s); the old config is kept as config.previous.json",
                           run_dir, ", ".join(changed))
            atomic_write_json(run_dir / "config.previous.json", previous)
    atomic_write_json(path, json.loads(json.dumps(config, default=str)))


@dataclasses.dataclass(frozen=True)
class _PendingVideo:
    index: int
    prompt: str
    repeat_index: int
    seed: int
    condition: object  # LayoutCondition | None
    prompt_dir: Path


def _prepare_prompt(index: int, prompt: str, occurrence: int, args, cache, sampling, model, prompt_dir: Path):
    """Parse the prompt's cached layout and write layout.json (and the box GIF); returns the condition.

    Returns None for baselines; raises LookupError on a cache miss and LayoutError on a bad layout.
    """
    if cache is None:
        return None
    reply = cache.get(prompt, occurrence)
    if reply is None:
        raise LookupError(f"no cached layout for {prompt!r} (occurrence {occurrence})")
    layout = parse_layout(reply, prompt)
    condition = build_condition(layout, sampling.num_frames, model.tokenizer)
    prompt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(prompt_dir / "layout.json", {
        "prompt": prompt, "prompt_index": index, "occurrence": occurrence,
        "layout": layout_to_dict(layout), "diffusion_prompt": condition.prompt,
        "phrases": list(condition.phrases), "token_positions": [list(p) for p in condition.token_positions],
        "num_frames": sampling.num_frames, "boxes_xyxy": condition.boxes_xyxy.tolist()})
    if args.visualize:
        from utils.visualize import save_layout_gif

        save_layout_gif(layout, prompt_dir / "boxes.gif")
        save_layout_gif(layout, prompt_dir / f"boxes_{index}.gif")
    return condition


def _generate_all(items, args, spec, model, sampling, guidance, execution, cache, run_dir, state, gligen=None) -> int:
    import torch
    from tqdm import tqdm

    from generation.config import derive_seed
    from generation.sampling import VideoRequest, generate_videos

    counts = {"videos": 0, "already_done": 0, "missing_layout": 0, "failed": 0}
    position = state.process_index

    def fail(index: int, prompt: str, error: BaseException) -> None:
        counts["failed"] += 1
        _record_failure(run_dir, index, prompt, error, state.process_index)
        kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else f"{type(error).__name__}: {error}"
        tqdm.write(f"[{index}] failed: {kind}; logged to {run_dir / 'failures.jsonl'}")
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # 1. Layouts: parse every prompt of this process's share, list the videos still to make.
    pending: list[_PendingVideo] = []
    for _, index, prompt, occurrence in items:
        prompt_dir = run_dir / str(index)
        todo = [r for r in range(args.repeats) if not (prompt_dir / f"video_{r}.joblib").exists()]
        counts["already_done"] += args.repeats - len(todo)
        if not todo:
            continue
        try:
            condition = _prepare_prompt(index, prompt, occurrence, args, cache, sampling, model, prompt_dir)
        except LookupError as error:
            tqdm.write(f"[{index}] {error}; skipped")
            counts["missing_layout"] += 1
            continue
        except Exception as error:  # a bad layout never stops the batch (unless --fail-fast)
            fail(index, prompt, error)
            if args.fail_fast:
                raise
            continue
        prompt_dir.mkdir(parents=True, exist_ok=True)
        pending += [_PendingVideo(index, prompt, r, derive_seed(index, r, args.seed_offset), condition, prompt_dir)
                    for r in todo]

    # 2. Videos, --batch-size at a time (each keeps its own seed, layout and guidance state).
    bar = tqdm(total=len(pending), desc=f"videos (rank {position})" if state.num_processes > 1 else "videos",
               position=position, dynamic_ncols=True, unit="video")
    for start in range(0, len(pending), args.batch_size):
        chunk = pending[start:start + args.batch_size]
        label = f"[{chunk[0].index}] seed {chunk[0].seed}" + (f" +{len(chunk) - 1}" if len(chunk) > 1 else "")
        steps = tqdm(total=sampling.num_inference_steps, desc=label, leave=False,
                     position=position + state.num_processes, dynamic_ncols=True)
        started = time.perf_counter()
        try:
            requests = [VideoRequest(video.prompt, video.seed, video.condition) for video in chunk]
            results = generate_videos(model, requests, sampling, guidance=guidance, gligen=gligen, execution=execution,
                                      step_callback=lambda i, n: steps.update(1))
            elapsed = (time.perf_counter() - started) / len(chunk)
            for video, result in zip(chunk, results):
                _save_outputs(result, video.prompt_dir, video.repeat_index, args, video.condition, elapsed)
                counts["videos"] += 1
        except KeyboardInterrupt:
            raise
        except Exception as error:  # out of memory included: logged per video, the batch goes on
            for video in chunk:
                fail(video.index, video.prompt, error)
            if args.fail_fast:
                raise
        finally:
            steps.close()
            bar.update(len(chunk))
    bar.close()
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
    print(f"{run_dir} (rank {state.process_index}): {summary}")
    return 1 if counts["failed"] or counts["missing_layout"] else 0


if __name__ == "__main__":
    sys.exit(main())
