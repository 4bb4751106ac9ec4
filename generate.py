"""Stage 2 CLI: layouts from the cache -> videos, for a prompt set (reference spec 1.2, 8).

A thin shell over the library: `generation.runs` (the files of a run, one call per batch of videos)
on top of `generation.sampling`. This script owns the flags, the run folder (``run<k>``, created
when the first output is about to be written), resume (a video with all its files is done),
sharding (``--skip_first_prompts``/``--num_prompts``, and across ``accelerate launch`` processes) and
the batch's failures (logged to ``failures.jsonl``; the batch goes on unless ``--fail-fast``).

Example (no downloads, random tiny model; the output is noise)::

    python generate.py --run-model lvd_tiny --prompt-type demo --model handwritten --template_version v0.1
"""
from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from generation.settings import (SettingsError, add_settings_arguments, configs_from_args, output_options_from_args,
                                 run_controls)
from models.registry import WAN_FAMILY, RunModelError
from prompt import (CUSTOM_PROMPT_TYPE, DEFAULT_TEMPLATE_VERSION, PromptList, PromptListError, add_prompt_arguments,
                    prompts_from_args)
from utils.cache import (CacheFormatError, LayoutCache, cache_path, describe_missing_cache, occurrence_indices,
                         select_window)
from utils.cli import OutputDirError, ensure_writable_dir, int_in, run_cli
from utils.failures import FAILURES_FILE, describe_error, record_failure
from utils.layout import LayoutError, SceneLayout, parse_layout_file
from utils.planner import CacheMissError, load_or_query_layout

logger = logging.getLogger("generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings_arguments(parser)  # how the videos are made and written: generation.settings, shared with the studio
    parser.add_argument("--model", default=None,
                        help="LLM whose layout cache to read, e.g. gpt-4-1106-preview (the demo cache: handwritten)")
    parser.add_argument("--template_version", default=DEFAULT_TEMPLATE_VERSION)
    add_prompt_arguments(parser)
    parser.add_argument("--layout-file", nargs="+", default=None, metavar="FILE",
                        help="generate the layouts of these JSON files (a layout.json generate.py wrote, or a bare "
                             "serialised layout) instead of reading an LLM cache; prompt type custom")
    parser.add_argument("--cache-dir", default="cache", help="folder of the layout caches")
    parser.add_argument("--auto-query", action="store_true",
                        help="ask the LLM (--model at --llm-base-url, or OpenAI) for the layouts the cache lacks and "
                             "save them there first, as prompt_batch.py --auto-query --always-save does")
    parser.add_argument("--output-dir", default="img_generations", help="root of the run directories")
    parser.add_argument("--save-suffix", default=None, help="appended as _<suffix> to the run directory name")
    parser.add_argument("--repeats", type=int_in(1), default=1, help="videos per prompt (seeds differ by 6789)")
    parser.add_argument("--regenerate", type=int_in(1), default=1, help="full passes over the prompt list")
    parser.add_argument("--force_run_ind", type=int_in(0), default=None,
                        help="write into run<k> (resumable); default: the first unused run<k>")
    parser.add_argument("--skip_first_prompts", type=int_in(0), default=0)
    parser.add_argument("--num_prompts", type=int_in(1), default=None)
    parser.add_argument("--batch-size", type=int_in(1), default=1,
                        help="videos per forward pass (sweeps); each keeps its own seed and layout")
    parser.add_argument("--visualize", action="store_true", help="save the layout box GIF of every prompt")
    parser.add_argument("--dry-run", action="store_true", help="parse the layouts only; load no model")
    parser.add_argument("--allow-mixed-settings", action="store_true",
                        help="resume a run<k> made with other sampling/guidance settings (both are recorded); "
                             "without it such a resume stops, so that one run never mixes videos of two settings")
    parser.add_argument("--fail-fast", "--no-continue-on-error", dest="fail_fast", action="store_true",
                        help="stop at the first failing prompt instead of logging it and going on")
    parser.add_argument("--verbose", action="store_true")
    from utils.llm import add_llm_arguments

    add_llm_arguments(parser)
    return parser


# --------------------------------------------------------------------------------------------
# Configs and paths


def resolve_llm_model(model: str | None) -> str | None:
    """The full LLM name for the cache file (aliases as in prompt_batch.py), or None."""
    from utils.llm import resolve_model_name

    return resolve_model_name(model) if model else model


def run_base_dir(args, spec, prompt_type: str) -> Path:
    """``<output>/imgs_<type>_template<ver><M>_<run-model><S>`` (spec 8.1)."""
    model = resolve_llm_model(args.model)
    model_part = "" if model in (None, "gpt-4") else f"_{model.replace('/', '__')}"
    suffix = f"_{args.save_suffix}" if args.save_suffix else ""
    controls = run_controls(args, spec)
    same = controls == spec.controls and args.control != ["none"]
    controls_part = "" if same else f"_ctl-{'+'.join(controls) or 'none'}"
    return Path(args.output_dir) / (f"imgs_{prompt_type}_template{args.template_version}{model_part}_{spec.name}"
                                    f"{controls_part}{suffix}")


def first_unused_run_index(base: Path) -> int:
    index = 0
    while (base / f"run{index}").exists():
        index += 1
    return index


def plan_items(prompts: list[str], args) -> list[tuple[int, str, int]]:
    """(running index, prompt, occurrence) of the window, over all ``--regenerate`` passes (spec 5.4: the
    index counts on across passes and gives the seed and the folder)."""
    occurrences = occurrence_indices(prompts)
    window = select_window(len(prompts), args.skip_first_prompts, args.num_prompts, passes=args.regenerate)
    return [(index, prompts[index % len(prompts)], occurrences[index % len(prompts)]) for index in window]


class LayoutSource:
    """Where a prompt's layout comes from: the LLM cache (by prompt and occurrence) or ``--layout-file``s
    (the k-th prompt of the list is the k-th file's layout). Raises CacheMissError or LayoutError."""

    def __init__(self, cache: LayoutCache | None = None, layouts: list[SceneLayout] | None = None,
                 files: list[str] | None = None):
        self.cache = cache
        self.layouts = layouts
        self.files = files

    def layout(self, index: int, prompt: str, occurrence: int) -> SceneLayout:
        if self.layouts is not None:
            return self.layouts[index % len(self.layouts)]
        return load_or_query_layout(self.cache, prompt, occurrence).layout

    def describe(self) -> dict:
        """What config.json records about it: the cache or the files, each with its SHA-256."""
        from generation.runs import file_sha256

        if self.layouts is not None:
            return {"layout_files": [{"path": str(path), "sha256": file_sha256(path)} for path in self.files]}
        return {"layout_cache": {"path": str(self.cache.path), "sha256": file_sha256(self.cache.path)}}


def resolve_prompt_list(args, uses_layout: bool, llm_model: str | None) -> tuple[PromptList, LayoutSource | None]:
    """The prompts of the run and, for layout methods, where their layouts come from.

    Raises PromptListError, LayoutError (a bad layout file) or CacheFormatError, each one line.
    """
    if args.layout_file:
        if args.prompts is not None or args.prompts_file is not None or args.prompt_type not in (None,
                                                                                                 CUSTOM_PROMPT_TYPE):
            raise PromptListError("--layout-file takes its prompts from the files: drop --prompts / --prompts-file "
                                  "/ --prompt-type")
        if args.model:
            raise PromptListError("--layout-file reads the layouts from the files, not from an LLM cache: drop --model")
        layouts = [parse_layout_file(path) for path in args.layout_file]
        prompts = PromptList(CUSTOM_PROMPT_TYPE, tuple(layout.prompt for layout in layouts), "--layout-file")
        return prompts, LayoutSource(layouts=layouts, files=list(args.layout_file)) if uses_layout else None
    prompts = prompts_from_args(args)
    if not uses_layout:
        return prompts, None
    if not llm_model:
        raise PromptListError("--model is required for layout methods: it names the layout cache to read "
                              "(e.g. --model gpt-4-1106-preview, or --model handwritten for the demo), or pass "
                              "--layout-file FILE")
    path = cache_path(prompts.prompt_type, args.template_version, llm_model, cache_dir=args.cache_dir)
    if not path.is_file() and not args.auto_query:  # with --auto-query a new cache is started
        raise CacheFormatError(describe_missing_cache(path))
    return prompts, LayoutSource(cache=LayoutCache.load(path))


# --------------------------------------------------------------------------------------------
# Main


class UsageError(ValueError):
    """Flags this run cannot use together (one line, exit 2)."""


# What stops a run before anything is written: one line on stderr, exit 2.
_USAGE_ERRORS = (UsageError, RunModelError, SettingsError, PromptListError, LayoutError, CacheFormatError,
                 OutputDirError, ValueError)


def check_batch_flags(args, configs) -> None:
    """The batch flags that need something of the run's configs or of each other; raises UsageError."""
    if args.regenerate > 1 and args.skip_first_prompts != 0:
        raise UsageError("--regenerate > 1 needs --skip_first_prompts 0")
    if args.visualize and not configs.uses_layout:
        raise UsageError("--visualize needs a layout method (baselines have no layout)")


class _Stop(Exception):
    """Ends the run before (or instead of) its videos: ``message`` on stderr, exit ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@contextmanager
def _stop_on(*errors: type[BaseException]):
    """Turns the given errors into a one-line ``error: ...`` stop (exit 2), no traceback."""
    try:
        yield
    except errors as error:
        raise _Stop(f"error: {error}") from error


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's usage errors (exit 2) and --help (0) as return codes
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except _Stop as stop:
        print(stop, file=sys.stderr)
        return stop.code


def _run(args) -> int:
    with _stop_on(*_USAGE_ERRORS):
        configs = configs_from_args(args)
        check_batch_flags(args, configs)
        llm_model = resolve_llm_model(args.model)
        prompt_list, source = resolve_prompt_list(args, configs.uses_layout, llm_model)
        items = plan_items(list(prompt_list.prompts), args)
    spec = configs.spec
    if configs.guidance is not None and configs.guidance.disabled_reason():  # the reference's quirk, said once
        print(f"warning: guidance is off for this run: {configs.guidance.disabled_reason()}", file=sys.stderr)
    if args.auto_query and not args.dry_run and source is not None and source.cache is not None:
        _query_missing_layouts(args, items, source.cache)
    if args.dry_run:
        return _dry_run(items, source, configs.sampling.num_frames, spec)
    with _stop_on(*_USAGE_ERRORS):
        ensure_writable_dir(args.output_dir, "--output-dir")
    _check_weights(args, spec)

    import torch
    from accelerate import PartialState

    from models.devices import apply_cpu_threads, choose_cpu_threads

    apply_cpu_threads(choose_cpu_threads(args.threads, small_model=spec.small))

    # Without CUDA, processes started by a multi-process launcher (accelerate launch --multi_gpu, torchrun)
    # join a CPU (gloo) group; accelerate's own `--cpu` launcher starts one process unless MPI is set up.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    base = run_base_dir(args, spec, prompt_list.prompt_type)
    run_index = args.force_run_ind if args.force_run_ind is not None else first_unused_run_index(base)
    state.wait_for_everyone()  # every process picked the index before any creates it
    my_items = items[state.process_index::state.num_processes]

    from generation.runs import RunSettingsError

    print(f"loading {spec.model_id or spec.name} ...", file=sys.stderr, flush=True)
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    with _stop_on(Exception):  # missing weights and the like: one clear line, no traceback, no run folder
        model = _load_model(args, configs, device)
    if spec.tiny:
        print(f"note: {spec.name} is a tiny random-weight model; its videos are noise (it exercises the code paths)")
    run = _RunFolder(base / f"run{run_index}", args, configs, llm_model, model, state, source, prompt_list.prompt_type)
    try:
        with _stop_on(RunSettingsError):
            if (run.path / "config.json").is_file():
                run.ensure()  # a resume: its settings are checked before any video
            return _generate_all(my_items, args, configs, model, source, run, state)
    except KeyboardInterrupt:
        raise _Stop(f"\ninterrupted: finished videos are kept in {run.path}; rerun the same command with "
                    f"--force_run_ind {run_index} to resume", code=130) from None


def _check_weights(args, spec) -> None:
    """Missing weights: one line before the heavy imports (the tiny run-models are built, not loaded)."""
    if spec.tiny and args.model_path is None:
        return
    from models.hub import MissingWeightsError
    from models.weights import find_model_folder

    with _stop_on(MissingWeightsError):
        find_model_folder(spec, args.model_path)


def _load_model(args, configs, device):
    """The run-model's video model; Wan: where umT5 waits between prompts, and the guided blocks checked against
    the model's depth before any video (the sampler setting travels in ``configs.sampling``)."""
    from generation.backbones import backbone_for
    from models.loading import load_video_model

    model = load_video_model(configs.spec, model_path=args.model_path, device=device, dtype=args.dtype)
    if configs.spec.family == WAN_FAMILY:
        model = model.with_text_encoder_offload(args.offload_text_encoder)
    if configs.guidance is not None:
        backbone_for(model).check_guided_layers(configs.guidance.guided_layers)
    return model


def _query_missing_layouts(args, items, cache: LayoutCache) -> None:
    """--auto-query: plan the layouts the cache lacks (utils.planner) before any model loads; stops on failure."""
    from models.tokenizer import build_clip_tokenizer
    from prompt import build_messages, load_template
    from utils.layout import validate_layout_for_generation
    from utils.llm import LLMConfigError, build_client, llm_config_from_args, query_layout
    from utils.planner import plan_missing_layouts
    from utils.redact import redact_secrets

    wanted = [(prompt, occurrence) for _, prompt, occurrence in items if cache.get(prompt, occurrence) is None]
    if not wanted:
        return
    try:
        template = load_template(args.template_version)
        ensure_writable_dir(cache.path.parent, "--cache-dir")
        client = build_client(llm_config_from_args(args), args.llm_api_key_file)
    except (LLMConfigError, OutputDirError, ValueError, OSError) as error:
        raise _Stop(f"error: {' '.join(str(error).split())}") from error
    tokenizer = build_clip_tokenizer()  # saved replies must build the stage-2 condition, as in prompt_batch.py
    print(f"asking {client.config.model} for {len(wanted)} layout(s) the cache lacks ({cache.path}) ...",
          file=sys.stderr, flush=True)
    try:
        report = plan_missing_layouts(
            cache, wanted, lambda prompt: query_layout(
                client, build_messages(template, prompt), prompt, max_parse_attempts=args.parse_attempts,
                parse_retry_delay_s=args.parse_retry_delay,
                validate=lambda layout: validate_layout_for_generation(layout, tokenizer)),
            max_endpoint_failures=args.llm_max_endpoint_failures,
            on_failure=lambda prompt, occurrence, problem: print(
                f"FAILED {prompt!r}: {redact_secrets(problem, client.secrets)}", file=sys.stderr))
    finally:
        client.close()
    print(f"{report.new} new layout(s) saved to {cache.path}, {len(report.failures)} failed", file=sys.stderr)
    if report.stopped is not None:
        raise _Stop(f"error: {redact_secrets(report.stopped, client.secrets)}; the layouts saved so far are kept, "
                    "rerun the same command to resume")


def _dry_run(items, source: LayoutSource | None, num_frames: int, spec) -> int:
    from utils.layout import build_condition

    # The UNet run-models' CLIP tokenizer (built offline, no model): phrases past its 77 tokens fail here too.
    tokenizer = None
    if source is not None and spec.family != WAN_FAMILY:
        from models.tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer()
    missing = 0
    for index, prompt, occurrence in items:
        if source is None:
            print(f"[{index}] {prompt}")
            continue
        try:
            layout = source.layout(index, prompt, occurrence)
            condition = build_condition(layout, num_frames, tokenizer)
        except (CacheMissError, LayoutError) as error:
            missing += 1
            print(f"[{index}] {error}")
            continue
        print(f"[{index}] {condition.prompt} | objects: {', '.join(condition.phrases) or 'none'}")
    return 1 if missing else 0


class _RunFolder:
    """``run<k>``: created, with this process's record in config.json, when the first output is written."""

    def __init__(self, path: Path, args, configs, llm_model, model, state, source, prompt_type):
        self.path = path
        self._record = (args, configs, llm_model, model, state, source, prompt_type)
        self._ready = False

    def ensure(self) -> Path:
        if not self._ready:
            self.path.mkdir(parents=True, exist_ok=True)
            changed = _record_invocation(self.path, *self._record)
            if changed:
                logger.warning("resuming %s with different settings (%s); both are recorded in %s", self.path,
                               ", ".join(changed), self.path / "config.json")
            self._ready = True
        return self.path

    def prompt_folder(self, index: int) -> Path:
        return self.ensure() / str(index)


def _record_invocation(run_dir: Path, args, configs, llm_model, model, state, source, prompt_type) -> list[str]:
    from generation.runs import record_invocation, run_invocation, run_settings

    settings = run_settings(configs, model, prompt_type=prompt_type, template_version=args.template_version,
                            llm_model=llm_model)
    end = None if args.num_prompts is None else args.skip_first_prompts + args.num_prompts
    invocation = run_invocation(model, command=sys.argv, args=args, window=[args.skip_first_prompts, end],
                                rank=state.process_index, num_processes=state.num_processes,
                                **({} if source is None else source.describe()))
    return record_invocation(run_dir, settings, invocation, allow_changed=args.allow_mixed_settings)


class _Tally:
    """The run's counts, and how a failed prompt is recorded (failures file, one line, CUDA cache freed)."""

    def __init__(self, run: _RunFolder, state):
        self.run, self.state = run, state
        self.counts = {"videos": 0, "already_done": 0, "missing_layout": 0, "failed": 0}

    def fail(self, index: int, prompt: str, error: BaseException) -> None:
        import torch
        from tqdm import tqdm

        self.counts["failed"] += 1
        failures = self.run.ensure() / FAILURES_FILE
        record_failure(failures, error, prompt_index=index, prompt=prompt, rank=self.state.process_index)
        kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else describe_error(error)
        tqdm.write(f"[{index}] {prompt!r} failed: {kind}; traceback in {failures}")
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _generate_all(items, args, configs, model, source: LayoutSource | None, run: _RunFolder, state) -> int:
    from tqdm import tqdm

    from generation.runs import generate_and_save

    options = output_options_from_args(args, configs.spec)
    tally = _Tally(run, state)
    pending = _pending_jobs(items, args, configs, model, source, run, options, tally)
    if pending is None:
        return 1  # --fail-fast on a bad layout

    # Videos, --batch-size at a time (each keeps its own seed, layout and guidance state).
    position, sampling = state.process_index, configs.sampling
    bar = tqdm(total=len(pending), desc=f"videos (rank {position})" if state.num_processes > 1 else "videos",
               position=position, dynamic_ncols=True, unit="video")
    try:
        for start in range(0, len(pending), args.batch_size):
            chunk = pending[start:start + args.batch_size]
            label = f"[{chunk[0].index}] seed {chunk[0].seed}" + (f" +{len(chunk) - 1}" if len(chunk) > 1 else "")
            steps = tqdm(total=sampling.num_inference_steps, desc=label, leave=False,
                         position=position + state.num_processes, dynamic_ncols=True)
            try:
                run.ensure()
                generate_and_save(model, chunk, sampling, controls=configs.attention, guidance=configs.guidance,
                                  gligen=configs.gligen, execution=configs.execution,
                                  options=options, step_callback=lambda i, n: steps.update(1))
                tally.counts["videos"] += len(chunk)
            except Exception as error:  # out of memory included: logged per video, the batch goes on
                for video in chunk:
                    tally.fail(video.index, video.prompt, error)
                if args.fail_fast:
                    return 1
            finally:
                steps.close()
            bar.update(len(chunk))
    finally:
        bar.close()
    counts = tally.counts
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
    print(f"{run.path} (rank {state.process_index}): {summary}")
    return 1 if counts["failed"] or counts["missing_layout"] else 0


def _pending_jobs(items, args, configs, model, source: LayoutSource | None, run: _RunFolder, options,
                  tally: _Tally) -> list | None:
    """Parses every prompt of this process's share and lists the videos still to make (None: --fail-fast hit)."""
    from tqdm import tqdm

    from generation.backbones import backbone_for
    from generation.config import derive_seed
    from generation.runs import VideoJob, is_video_done, remove_stale_temp_files, write_layout_record

    backbone = backbone_for(model)
    pending: list[VideoJob] = []
    for index, prompt, occurrence in items:
        prompt_dir = run.path / str(index)
        if prompt_dir.is_dir():
            remove_stale_temp_files(prompt_dir)  # left by a killed run; this process owns this prompt
        todo = [r for r in range(args.repeats) if not is_video_done(prompt_dir, r, options)]
        tally.counts["already_done"] += args.repeats - len(todo)
        if not todo:
            continue
        condition = None
        if source is not None:
            try:  # a bad layout (cached reply, condition, drawing) never stops the batch (unless --fail-fast)
                layout = source.layout(index, prompt, occurrence)
                condition = backbone.build_condition(layout, configs.sampling.num_frames)
                write_layout_record(run.prompt_folder(index), prompt=prompt, index=index, occurrence=occurrence,
                                    layout=layout, condition=condition)
                if args.visualize:
                    from utils.visualize import save_layout_gif

                    save_layout_gif(layout, prompt_dir / "boxes.gif")
                    save_layout_gif(layout, prompt_dir / f"boxes_{index}.gif")
            except CacheMissError:
                tqdm.write(f"[{index}] no cached layout for {prompt!r} (occurrence {occurrence}); skipped")
                tally.counts["missing_layout"] += 1
                continue
            except Exception as error:
                tally.fail(index, prompt, error)
                if args.fail_fast:
                    return None
                continue
        pending += [VideoJob(index, prompt, r, derive_seed(index, r, args.seed_offset), condition, prompt_dir)
                    for r in todo]
    return pending


if __name__ == "__main__":
    sys.exit(run_cli(main))
