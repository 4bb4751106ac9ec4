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
import dataclasses
import logging
import sys
from pathlib import Path

from models.registry import (CONTROL_FAMILY_NAMES, METHOD_CONTROLS, WAN_FAMILY, RunModelError, get_run_model,
                             run_model_names, wan_guided_layers)
from prompt import (CUSTOM_PROMPT_TYPE, DEFAULT_TEMPLATE_VERSION, PromptList, PromptListError, add_prompt_arguments,
                    prompts_from_args)
from utils.cache import (CacheFormatError, LayoutCache, cache_path, describe_missing_cache, occurrence_indices,
                         select_window)
from utils.cli import OutputDirError, ensure_writable_dir, float_in, int_in, run_cli
from utils.failures import FAILURES_FILE, describe_error, record_failure
from utils.layout import LayoutError, SceneLayout, parse_layout_file
from utils.planner import CacheMissError, load_or_query_layout

logger = logging.getLogger("generate")

# From the registry's method table (models.registry.METHOD_CONTROLS).
LAYOUT_METHODS = tuple(method for method, controls in METHOD_CONTROLS.items() if controls)
GUIDED_METHODS = tuple(method for method, controls in METHOD_CONTROLS.items() if "energy" in controls)
# The attention control families whose config fields are flags: --<prefix>-<field> (generation.attention_control).
ATTENTION_CONTROL_FLAGS = {"mask": "MaskingConfig", "modulate": "ModulationConfig"}
SAVE_FORMATS = ("gif", "joblib", "mp4")
# --save-formats when the flag is not given (this list object: Wan run-models then add mp4, at their 16 fps).
DEFAULT_SAVE_FORMATS = ["gif", "joblib"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-model", default="lvd_modelscope256", choices=run_model_names(),
                        help="method and video model (see README); *_tiny are random-weight demos")
    parser.add_argument("--model", default=None,
                        help="LLM whose layout cache to read, e.g. gpt-4-1106-preview (the demo cache: handwritten)")
    parser.add_argument("--template_version", default=DEFAULT_TEMPLATE_VERSION)
    add_prompt_arguments(parser)
    parser.add_argument("--layout-file", nargs="+", default=None, metavar="FILE",
                        help="generate the layouts of these JSON files (a layout.json generate.py wrote, or a bare "
                             "serialised layout) instead of reading an LLM cache; prompt type custom")
    parser.add_argument("--cache-dir", default="cache", help="folder of the layout caches")
    parser.add_argument("--output-dir", default="img_generations", help="root of the run directories")
    parser.add_argument("--save-suffix", default=None, help="appended as _<suffix> to the run directory name")
    parser.add_argument("--repeats", type=int_in(1), default=1, help="videos per prompt (seeds differ by 6789)")
    parser.add_argument("--regenerate", type=int_in(1), default=1, help="full passes over the prompt list")
    parser.add_argument("--force_run_ind", type=int_in(0), default=None,
                        help="write into run<k> (resumable); default: the first unused run<k>")
    parser.add_argument("--skip_first_prompts", type=int_in(0), default=0)
    parser.add_argument("--num_prompts", type=int_in(1), default=None)
    parser.add_argument("--seed_offset", type=int_in(0), default=0)
    parser.add_argument("--num_frames", type=int_in(1), default=None, help="default: the run-model's")
    parser.add_argument("--height", type=int_in(1), default=None,
                        help="default: the run-model's (only models that allow other sizes accept it)")
    parser.add_argument("--width", type=int_in(1), default=None, help="default: the run-model's")
    parser.add_argument("--num_inference_steps", type=int_in(1), default=None, help="default: the run-model's")

    guidance = parser.add_argument_group("LVD guidance (default: the paper's values, spec 4.8)")
    guidance.add_argument("--loss_scale", type=float_in(0.0, low_open=True), default=None,
                          help="scale of the energy in the latent update (5)")
    guidance.add_argument("--loss_threshold", type=float_in(), default=None,
                          help="guide while the energy is above this (200)")
    guidance.add_argument("--max_iter", type=int_in(0), default=None, help="guided iterations per step (5)")
    guidance.add_argument("--max_index_step", type=int_in(0), default=None, help="guided denoising steps (10)")
    guidance.add_argument("--fg_top_p", type=float_in(0.0, 1.0, low_open=True), default=None,
                          help="top-k fraction of the attention inside the box (0.75)")
    guidance.add_argument("--bg_top_p", type=float_in(0.0, 1.0, low_open=True), default=None,
                          help="top-k fraction of the attention outside the box (0.75)")
    guidance.add_argument("--fg_weight", type=float_in(0.0), default=None, help="(1.0)")
    guidance.add_argument("--bg_weight", type=float_in(0.0), default=None, help="(4.0)")
    from generation.energies import ENERGY_TERMS

    for term in ENERGY_TERMS:  # one flag per energy term, named after its GuidanceConfig field
        guidance.add_argument(f"--{term.name}", type=float_in(0.0), default=None, help=term.help)
    guidance.add_argument("--boxdiff_normed", type=int_in(0, 1), default=None, help="0/1 (1)")
    guidance.add_argument("--use_ratio_based_loss", type=int_in(0, 1), default=None, help="0/1 (0)")
    guidance.add_argument("--guidance-stop", choices=("carried", "per-step"), default="carried",
                          help="carried: the reference's threshold rule (stops for good once below); "
                               "per-step: recompute the energy at every guided step (spec 15.2)")
    parser.add_argument("--gligen_scheduled_sampling_beta", type=float_in(0.0, 1.0), default=None,
                        help="LVD-GLIGEN / LVD-plus: fraction of steps with the fusers on (1.0)")
    add_control_arguments(parser)

    wan = parser.add_argument_group("Wan 2.1 run-models (see README, 'Wan 2.1 (DiT backbone)')")
    wan.add_argument("--guided-blocks", type=int_in(0), nargs="+", default=None,
                     help="transformer blocks whose cross-attention (blocks.<i>.attn2) LVD guides (1.3B: 8 10 12 14 "
                          "16 18; 14B: 11 13 16 19 21 24; a starting point, see scripts/probe_attention.py)")
    wan.add_argument("--corrector-off-steps", type=int_in(0), default=None,
                     help="UniPC without its corrector on the first K steps, so guided edits survive (default: "
                          "max_index_step for lvd_wan*, 0 = stock WanPipeline for wan2.1-*; give both arms of a "
                          "comparison the same K)")
    wan.add_argument("--offload-text-encoder", action="store_true",
                     help="keep umT5 (5.7B parameters) on the CPU between prompts; it visits the GPU to encode")

    parser.add_argument("--batch-size", type=int_in(1), default=1,
                        help="videos per forward pass (sweeps); each keeps its own seed and layout")
    parser.add_argument("--low-memory", action="store_true",
                        help="less memory for the guided pass, same result, slower: its activations in host memory "
                             "(UNet3D; 24 GB cards) or gradient checkpointing of its blocks (Wan)")
    parser.add_argument("--initial-noise", choices=("cpu", "reference"), default="cpu",
                        help="cpu: float32 noise from a CPU generator, the same on every machine; reference: "
                             "the original's draw (a generator on the GPU, in fp16), for bit-level comparisons")
    parser.add_argument("--model-path", default=None, help="local folder with the video model's weights")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: automatic)")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="default: fp16 on CUDA (bf16 for Wan), fp32 on CPU")
    parser.add_argument("--save-formats", nargs="+", default=DEFAULT_SAVE_FORMATS, choices=SAVE_FORMATS,
                        help="default: gif joblib (Wan run-models add mp4)")
    parser.add_argument("--save-latents", action="store_true", help="also save the final latents (.latents.pt)")
    parser.add_argument("--no-annotate", action="store_true", help="skip the annotated GIF with boxes and phrases")
    parser.add_argument("--visualize", action="store_true", help="save the layout box GIF of every prompt")
    parser.add_argument("--dry-run", action="store_true", help="parse the layouts only; load no model")
    parser.add_argument("--fail-fast", "--no-continue-on-error", dest="fail_fast", action="store_true",
                        help="stop at the first failing prompt instead of logging it and going on")
    parser.add_argument("--verbose", action="store_true")
    return parser


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """--control, and one flag per field of the masking / modulation configs (README, "Layout control families")."""
    import dataclasses

    import generation.attention_control as attention_control

    group = parser.add_argument_group("layout control families (README, 'Layout control families')")
    group.add_argument("--control", nargs="+", default=None, choices=(*CONTROL_FAMILY_NAMES, "none"), metavar="FAMILY",
                       help="the layout controls to run, any set of " + ", ".join(CONTROL_FAMILY_NAMES) +
                            " (default: the run-model's method: lvd = energy, lvd-gligen = gligen, lvd-plus = "
                            "gligen energy, baselines none); e.g. --control energy mask. 'none': the layout's "
                            "prompt and layout.json, no control (the families' common zero)")
    for prefix, name in ATTENTION_CONTROL_FLAGS.items():
        for field in dataclasses.fields(getattr(attention_control, name)):
            kind = int_in(0, 1) if isinstance(field.default, bool) else type(field.default)
            group.add_argument(f"--{prefix}-{field.name.replace('_', '-')}", dest=f"{prefix}_{field.name}", type=kind,
                               default=None, help=f"--control {prefix}: {field.name} ({field.default})")


def run_controls(args, spec) -> tuple[str, ...]:
    """The control families of this run: --control, else the run-model's method (raises RunModelError)."""
    controls = tuple(dict.fromkeys(args.control)) if args.control else spec.controls
    if "none" in controls:
        if len(controls) > 1:
            raise RunModelError(f"--control none takes no other family, got {' '.join(controls)}")
        controls = ()
    if "gligen" in controls and not spec.grounded:
        raise RunModelError(f"--control gligen needs a grounded UNet (lvd-gligen_*, lvd-plus_*), not {spec.name!r}")
    for prefix in ATTENTION_CONTROL_FLAGS:
        given = [key for key, value in vars(args).items() if key.startswith(f"{prefix}_") and value is not None]
        if given and prefix not in controls:
            raise RunModelError(f"{', '.join('--' + g.replace('_', '-') for g in given)} need --control {prefix}")
    return controls


def build_attention_control_configs(args, controls: tuple[str, ...]) -> list:
    """The masking / modulation configs of ``controls``, with their flags."""
    import dataclasses

    import generation.attention_control as attention_control

    configs = []
    for prefix, name in ATTENTION_CONTROL_FLAGS.items():
        if prefix in controls:
            config_type = getattr(attention_control, name)
            overrides = {f.name: getattr(args, f"{prefix}_{f.name}") for f in dataclasses.fields(config_type)}
            configs.append(config_type(**{k: type(getattr(config_type, k))(v) for k, v in overrides.items()
                                          if v is not None}))
    return configs


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


def build_configs(args, spec):
    """(SamplingConfig, GuidanceConfig | None, ExecutionConfig) from the run-model and the given flags only."""
    from generation.config import ExecutionConfig, GuidanceConfig, replace_config, sampling_config_for
    from generation.energies import ENERGY_TERMS

    sampling = sampling_config_for(spec, num_frames=args.num_frames, height=args.height, width=args.width,
                                   num_inference_steps=args.num_inference_steps, initial_noise=args.initial_noise)
    execution = ExecutionConfig(low_memory=args.low_memory)
    # Each guidance flag, None when not given (the defaults then apply).
    overrides = dict(
        loss_scale=args.loss_scale, loss_threshold=args.loss_threshold, max_iter=args.max_iter,
        max_index_step=args.max_index_step, fg_top_p=args.fg_top_p, bg_top_p=args.bg_top_p,
        fg_weight=args.fg_weight, bg_weight=args.bg_weight,
        **{term.name: getattr(args, term.name) for term in ENERGY_TERMS},
        use_ratio_based_loss=None if args.use_ratio_based_loss is None else bool(args.use_ratio_based_loss),
        boxdiff_normed=None if args.boxdiff_normed is None else bool(args.boxdiff_normed))
    given = sorted(name for name, value in overrides.items() if value is not None)
    if "energy" not in run_controls(args, spec):
        if given:
            raise RunModelError(f"run-model {spec.name!r} ({spec.method}) has no attention guidance; "
                                f"remove {', '.join('--' + g for g in given)}")
        return sampling, None, execution
    guided_layers = spec.guided_layers
    if args.guided_blocks is not None:
        guided_layers = wan_guided_layers(args.guided_blocks)
    if not guided_layers:
        raise RunModelError(f"--control energy needs guided layers and run-model {spec.name!r} names none; use its "
                            "lvd_* run-model" + (" or --guided-blocks" if spec.family == WAN_FAMILY else ""))
    guidance = replace_config(GuidanceConfig(guided_layers=guided_layers, stop_rule=args.guidance_stop),
                              **overrides)
    return sampling, guidance, execution


def check_wan_flags(args, spec) -> None:
    """The Wan-only flags apply to Wan run-models (and --guided-blocks to the guided ones); raises RunModelError."""
    wan_flags = [flag for flag, value in (("--guided-blocks", args.guided_blocks),
                                          ("--corrector-off-steps", args.corrector_off_steps),
                                          ("--offload-text-encoder", args.offload_text_encoder or None))
                 if value is not None]
    if spec.family != WAN_FAMILY and wan_flags:
        raise RunModelError(f"{', '.join(wan_flags)} apply to the Wan run-models only, not to {spec.name!r}")
    if args.guided_blocks is not None and "energy" not in run_controls(args, spec):
        raise RunModelError(f"run-model {spec.name!r} ({spec.method}) has no attention guidance; remove --guided-blocks")


def wan_solver_steps(args, guidance) -> int:
    """UniPC corrector-off steps of a Wan run: the flag, else the guided steps (LVD) or 0 (stock baseline)."""
    if args.corrector_off_steps is not None:
        return args.corrector_off_steps
    return guidance.max_index_step if guidance is not None else 0


def build_gligen_config(args, spec):
    """GligenConfig for runs with GLIGEN (lvd-gligen, lvd-plus), else None (spec 6.1: beta defaults to 1.0)."""
    if "gligen" not in run_controls(args, spec):
        return None
    from models.gligen import GligenConfig

    beta = args.gligen_scheduled_sampling_beta
    return GligenConfig() if beta is None else GligenConfig(scheduled_sampling_beta=beta)


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
    if not path.is_file():
        raise CacheFormatError(describe_missing_cache(path))
    return prompts, LayoutSource(cache=LayoutCache.load(path))


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's usage errors (exit 2) and --help (0) as return codes
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = get_run_model(args.run_model)
        check_wan_flags(args, spec)
        controls = run_controls(args, spec)
        sampling, guidance, execution = build_configs(args, spec)
        gligen = build_gligen_config(args, spec)
        build_attention_control_configs(args, controls)  # a bad masking / modulation value fails here
    except (RunModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.regenerate > 1 and args.skip_first_prompts != 0:
        print("error: --regenerate > 1 needs --skip_first_prompts 0", file=sys.stderr)
        return 2
    if args.gligen_scheduled_sampling_beta is not None and not spec.grounded:
        print(f"error: --gligen_scheduled_sampling_beta does not apply to {spec.name!r}", file=sys.stderr)
        return 2
    uses_layout = bool(controls) or args.control == ["none"]
    if args.visualize and not uses_layout:
        print("error: --visualize needs a layout method (baselines have no layout)", file=sys.stderr)
        return 2
    llm_model = resolve_llm_model(args.model)
    try:
        prompt_list, source = resolve_prompt_list(args, uses_layout, llm_model)
    except (PromptListError, LayoutError, CacheFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    items = plan_items(list(prompt_list.prompts), args)

    if args.dry_run:
        return _dry_run(items, source, sampling.num_frames)
    try:
        ensure_writable_dir(args.output_dir, "--output-dir")
    except OutputDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch
    from accelerate import PartialState

    # Without CUDA, processes started by a multi-process launcher (accelerate launch --multi_gpu, torchrun)
    # join a CPU (gloo) group; accelerate's own `--cpu` launcher starts one process unless MPI is set up.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    base = run_base_dir(args, spec, prompt_list.prompt_type)
    run_index = args.force_run_ind if args.force_run_ind is not None else first_unused_run_index(base)
    state.wait_for_everyone()  # every process picked the index before any creates it
    my_items = items[state.process_index::state.num_processes]

    from generation.backbones import backbone_for
    from models.loading import load_video_model

    print(f"loading {spec.model_id or spec.name} ...", file=sys.stderr, flush=True)
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    try:
        model = load_video_model(spec, model_path=args.model_path, device=device, dtype=args.dtype)
        if spec.family == WAN_FAMILY:  # the sampler setting of this run, and where umT5 waits between prompts
            model = model.with_corrector_off_steps(wan_solver_steps(args, guidance))
            model = model.with_text_encoder_offload(args.offload_text_encoder)
            if guidance is not None:  # e.g. --guided-blocks past the model's depth: say so before any video
                backbone_for(model).check_guided_layers(guidance.guided_layers)
    except Exception as error:  # missing weights and the like: one clear line, no traceback, no run folder
        print(f"error: {error}", file=sys.stderr)
        return 2
    if spec.tiny:
        print(f"note: {spec.name} is a tiny random-weight model; its videos are noise (it exercises the code paths)")
    run = _RunFolder(base / f"run{run_index}", args, spec, sampling, guidance, execution, gligen, llm_model, model,
                     state, source, prompt_list.prompt_type)
    try:
        return _generate_all(my_items, args, spec, model, sampling, guidance, execution, gligen, source, run, state)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished videos are kept in {run.path}; rerun the same command with "
              f"--force_run_ind {run_index} to resume", file=sys.stderr)
        return 130


def _dry_run(items, source: LayoutSource | None, num_frames: int) -> int:
    from utils.layout import build_condition

    missing = 0
    for index, prompt, occurrence in items:
        if source is None:
            print(f"[{index}] {prompt}")
            continue
        try:
            layout = source.layout(index, prompt, occurrence)
        except (CacheMissError, LayoutError) as error:
            missing += 1
            print(f"[{index}] {error}")
            continue
        condition = build_condition(layout, num_frames)
        print(f"[{index}] {condition.prompt} | objects: {', '.join(condition.phrases) or 'none'}")
    return 1 if missing else 0


class _RunFolder:
    """``run<k>``: created, with this process's record in config.json, when the first output is written."""

    def __init__(self, path: Path, args, spec, sampling, guidance, execution, gligen, llm_model, model, state, source,
                 prompt_type):
        self.path = path
        self._record = (args, spec, sampling, guidance, execution, gligen, llm_model, model, state, source,
                        prompt_type)
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


def _record_invocation(run_dir: Path, args, spec, sampling, guidance, execution, gligen, llm_model, model, state,
                       source, prompt_type) -> list[str]:
    from generation.runs import describe_environment, record_invocation

    settings = {
        "run_model": dataclasses.asdict(spec), "prompt_type": prompt_type,
        "template_version": args.template_version, "llm_model": llm_model,
        "sampling": dataclasses.asdict(sampling),
        "guidance": dataclasses.asdict(guidance) if guidance is not None else None,
        "execution": dataclasses.asdict(execution),
        "gligen": dataclasses.asdict(gligen) if gligen is not None else None,
        "controls": describe_controls(args, spec),
        "seed_rule": "prompt_index + 6789 * repeat_index + seed_offset",
        # Wan: the sampler (UniPC, corrector off on the first K steps; 0 = stock) and text-encoder placement.
        "solver": ({"name": "unipc", "corrector_off_steps": model.corrector_off_steps,
                    "offload_text_encoder": model.offload_text_encoder,
                    "scheduler": dict(model.scheduler.config)} if spec.family == WAN_FAMILY else None),
    }
    end = None if args.num_prompts is None else args.skip_first_prompts + args.num_prompts
    invocation = {
        "command": sys.argv, "args": vars(args), "rank": state.process_index, "num_processes": state.num_processes,
        "window": [args.skip_first_prompts, end], "device": str(model.device), "dtype": str(model.dtype),
        "model_source": model.source, **({} if source is None else source.describe()),
        **describe_environment(str(model.device)),
    }
    return record_invocation(run_dir, settings, invocation)


def describe_controls(args, spec) -> dict:
    """config.json's record of the run's control families and the masking / modulation settings."""
    import dataclasses

    controls = run_controls(args, spec)
    record = {"families": list(controls)}
    for prefix, config in zip([p for p in ATTENTION_CONTROL_FLAGS if p in controls],
                              build_attention_control_configs(args, controls)):
        record[prefix] = dataclasses.asdict(config)
    return record


def _generate_all(items, args, spec, model, sampling, guidance, execution, gligen, source: LayoutSource | None,
                  run: _RunFolder, state) -> int:
    import torch
    from tqdm import tqdm

    from generation.backbones import backbone_for
    from generation.config import derive_seed
    from generation.runs import (OutputOptions, VideoJob, generate_and_save, is_video_done, remove_stale_temp_files,
                                 write_layout_record)

    attention_controls = build_attention_control_configs(args, run_controls(args, spec))
    formats = list(args.save_formats)
    if args.save_formats is DEFAULT_SAVE_FORMATS and spec.family == WAN_FAMILY:  # not given: Wan also writes mp4
        formats.append("mp4")
    options = OutputOptions(formats=tuple(dict.fromkeys(formats)), fps=spec.fps,
                            save_latents=args.save_latents, annotate=not args.no_annotate)
    backbone = backbone_for(model)
    counts = {"videos": 0, "already_done": 0, "missing_layout": 0, "failed": 0}
    position = state.process_index

    def fail(index: int, prompt: str, error: BaseException) -> None:
        counts["failed"] += 1
        record_failure(run.ensure() / FAILURES_FILE, error, prompt_index=index, prompt=prompt, rank=state.process_index)
        kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else describe_error(error)
        tqdm.write(f"[{index}] {prompt!r} failed: {kind}; traceback in {run.path / FAILURES_FILE}")
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # 1. Layouts: parse every prompt of this process's share, list the videos still to make.
    pending: list[VideoJob] = []
    for index, prompt, occurrence in items:
        prompt_dir = run.path / str(index)
        if prompt_dir.is_dir():
            remove_stale_temp_files(prompt_dir)  # left by a killed run; this process owns this prompt
        todo = [r for r in range(args.repeats) if not is_video_done(prompt_dir, r, options)]
        counts["already_done"] += args.repeats - len(todo)
        if not todo:
            continue
        condition = None
        if source is not None:
            try:
                layout = source.layout(index, prompt, occurrence)
            except CacheMissError:
                tqdm.write(f"[{index}] no cached layout for {prompt!r} (occurrence {occurrence}); skipped")
                counts["missing_layout"] += 1
                continue
            except LayoutError as error:  # a bad cached reply never stops the batch (unless --fail-fast)
                fail(index, prompt, error)
                if args.fail_fast:
                    return 1
                continue
            try:
                condition = backbone.build_condition(layout, sampling.num_frames)
                write_layout_record(run.prompt_folder(index), prompt=prompt, index=index, occurrence=occurrence,
                                    layout=layout, condition=condition)
                if args.visualize:
                    from utils.visualize import save_layout_gif

                    save_layout_gif(layout, prompt_dir / "boxes.gif")
                    save_layout_gif(layout, prompt_dir / f"boxes_{index}.gif")
            except Exception as error:  # a bad layout never stops the batch (unless --fail-fast)
                fail(index, prompt, error)
                if args.fail_fast:
                    return 1
                continue
        pending += [VideoJob(index, prompt, r, derive_seed(index, r, args.seed_offset), condition, prompt_dir)
                    for r in todo]

    # 2. Videos, --batch-size at a time (each keeps its own seed, layout and guidance state).
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
                generate_and_save(model, chunk, sampling, controls=attention_controls, guidance=guidance, gligen=gligen,
                                  execution=execution,
                                  options=options, step_callback=lambda i, n: steps.update(1))
                counts["videos"] += len(chunk)
            except Exception as error:  # out of memory included: logged per video, the batch goes on
                for video in chunk:
                    fail(video.index, video.prompt, error)
                if args.fail_fast:
                    return 1
            finally:
                steps.close()
            bar.update(len(chunk))
    finally:
        bar.close()
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
    print(f"{run.path} (rank {state.process_index}): {summary}")
    return 1 if counts["failed"] or counts["missing_layout"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
