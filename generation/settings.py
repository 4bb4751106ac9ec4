"""How a stage-2 video is made, as command-line flags and the configs they give (one mapping, two users).

`add_settings_arguments` declares the flags that decide how videos are made and written (run-model, size,
steps, seed offset, guidance, GLIGEN, Wan's sampler, device, output formats); `configs_from_args` turns
parsed flags into the typed configs. generate.py adds its own batch flags (prompts, run folder, shards) on
top; the studio parses the configuration part of the command line it shows with `parse_settings_argv`, so
the page's command and the configs it runs cannot drift apart. No CLI is imported here.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import dataclasses

from generation.attention_config import MaskingConfig, ModulationConfig
from generation.config import CFG_STANDARD, CFG_VARIANTS
from models.registry import (CONTROL_FAMILY_NAMES, WAN_FAMILY, RunModelError, RunModelSpec, get_run_model,
                             run_model_names, wan_guided_layers)
from utils.cli import float_in, int_in

if TYPE_CHECKING:
    from generation.config import ExecutionConfig, GuidanceConfig, SamplingConfig  # noqa: F401
    from models.gligen import GligenConfig

# torch is imported where models are built, never here: --help and --dry-run stay fast (tests/test_fast_paths.py).

SAVE_FORMATS = ("gif", "joblib", "mp4")
# --save-formats when the flag is not given (this list object: Wan run-models then add mp4, at their 16 fps).
DEFAULT_SAVE_FORMATS = ["gif", "joblib"]
# The attention control families whose config fields are flags: --<prefix>-<field> (README, "Layout control
# families").
ATTENTION_CONTROL_CONFIGS = {"mask": MaskingConfig, "modulate": ModulationConfig}
# The guidance flags (= GuidanceConfig fields), None when not given. The energy terms' weights among them are
# `generation.energies.ENERGY_TERMS` (tests/test_controls.py checks that every term has its flag here).
GUIDANCE_FLAGS = ("loss_scale", "loss_threshold", "max_iter", "max_index_step", "fg_top_p", "bg_top_p", "fg_weight",
                  "bg_weight", "com_loss_scale", "boxdiff_loss_scale", "attn_sync_weight", "use_ratio_based_loss",
                  "boxdiff_normed")


class SettingsError(ValueError):
    """Flags that cannot be used together (or with this run-model); the message names the flags."""


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that decide how a video is made and written (generate.py's, and the studio's commands')."""
    parser.add_argument("--run-model", default="lvd_modelscope256", choices=run_model_names(),
                        help="method and video model (see README); *_tiny are random-weight demos")
    parser.add_argument("--seed_offset", type=int_in(0), default=0)
    parser.add_argument("--num_frames", type=int_in(1), default=None, help="default: the run-model's")
    parser.add_argument("--height", type=int_in(1), default=None,
                        help="default: the run-model's (only models that allow other sizes accept it)")
    parser.add_argument("--width", type=int_in(1), default=None, help="default: the run-model's")
    parser.add_argument("--num_inference_steps", type=int_in(1), default=None, help="default: the run-model's")

    cfg = parser.add_argument_group("classifier-free guidance (README, 'Classifier-free guidance variants')")
    cfg.add_argument("--guidance-scale", type=float_in(0.0), default=None, help="CFG scale (None: the run-model's own)")
    cfg.add_argument("--cfg", choices=CFG_VARIANTS, default=CFG_STANDARD,
                     help="CFG variant: standard (the pipelines') or zero-star (CFG-Zero*'s optimised scale)")
    cfg.add_argument("--cfg-rescale", type=float_in(0.0, 1.0), default=0.0,
                     help="rescale the guided prediction towards the conditional one's std (Lin et al. 2023; 0: off)")
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
    guidance.add_argument("--com_loss_scale", type=float_in(0.0), default=None,
                          help="centre-of-mass term (0; the benchmark preset: 0.03)")
    guidance.add_argument("--boxdiff_loss_scale", type=float_in(0.0), default=None, help="BoxDiff term (0)")
    guidance.add_argument("--boxdiff_normed", type=int_in(0, 1), default=None, help="0/1 (1)")
    guidance.add_argument("--attn_sync_weight", type=float_in(0.0), default=None, help="attention-sync term (0)")
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

    parser.add_argument("--low-memory", action="store_true",
                        help="less memory for the guided pass, same result, slower: its activations in host memory "
                             "(UNet3D; 24 GB cards) or gradient checkpointing of its blocks (Wan)")
    parser.add_argument("--initial-noise", choices=("cpu", "reference"), default="cpu",
                        help="cpu: float32 noise from a CPU generator, the same on every machine; reference: "
                             "the original's draw (a generator on the GPU, in fp16), for bit-level comparisons")
    parser.add_argument("--model-path", default=None, help="local folder with the video model's weights")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: automatic)")
    parser.add_argument("--threads", type=int_in(1), default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else 1 for the tiny run-models, "
                             "else torch's: one per core; on a machine shared with other jobs, fewer)")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="default: fp16 on CUDA (bf16 for Wan), fp32 on CPU")
    parser.add_argument("--save-formats", nargs="+", default=DEFAULT_SAVE_FORMATS, choices=SAVE_FORMATS,
                        help="default: gif joblib (Wan run-models add mp4)")
    parser.add_argument("--save-latents", action="store_true", help="also save the final latents (.latents.pt)")
    parser.add_argument("--no-annotate", action="store_true", help="skip the annotated GIF with boxes and phrases")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="also generate each video's baseline (the prompt as is, same seed, no layout control) "
                             "and write video_<r>_compare.gif: baseline | this video | the boxes")


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """--control, and one flag per field of the masking / modulation configs (README, "Layout control families")."""
    group = parser.add_argument_group("layout control families (README, 'Layout control families')")
    group.add_argument("--control", nargs="+", default=None, choices=(*CONTROL_FAMILY_NAMES, "none"), metavar="FAMILY",
                       help="the layout controls to run, any set of " + ", ".join(CONTROL_FAMILY_NAMES) +
                            " (default: the run-model's method: lvd = energy, lvd-gligen = gligen, lvd-plus = "
                            "gligen energy, baselines none); e.g. --control energy mask. 'none': the layout's "
                            "prompt and layout.json, no control (the families' common zero)")
    for prefix, config_type in ATTENTION_CONTROL_CONFIGS.items():
        for field in dataclasses.fields(config_type):
            kind = int_in(0, 1) if isinstance(field.default, bool) else type(field.default)
            group.add_argument(f"--{prefix}-{field.name.replace('_', '-')}", dest=f"{prefix}_{field.name}", type=kind,
                               default=None, help=f"--control {prefix}: {field.name} ({field.default})")


def run_controls(args: argparse.Namespace, spec: RunModelSpec) -> tuple[str, ...]:
    """The control families of this run: --control, else the run-model's method (raises RunModelError)."""
    controls = tuple(dict.fromkeys(args.control)) if args.control else spec.controls
    if "none" in controls:
        if len(controls) > 1:
            raise RunModelError(f"--control none takes no other family, got {' '.join(controls)}")
        controls = ()
    if "gligen" in controls and not spec.grounded:
        raise RunModelError(f"--control gligen needs a grounded UNet (lvd-gligen_*, lvd-plus_*), not {spec.name!r}")
    for prefix in ATTENTION_CONTROL_CONFIGS:
        given = [key for key, value in vars(args).items() if key.startswith(f"{prefix}_") and value is not None]
        if given and prefix not in controls:
            raise RunModelError(f"{', '.join('--' + g.replace('_', '-') for g in given)} need --control {prefix}")
    return controls


def build_attention_control_configs(args: argparse.Namespace, controls: tuple[str, ...]) -> tuple:
    """The masking / modulation configs of ``controls``, with their flags."""
    configs = []
    for prefix, config_type in ATTENTION_CONTROL_CONFIGS.items():
        if prefix in controls:
            overrides = {f.name: getattr(args, f"{prefix}_{f.name}") for f in dataclasses.fields(config_type)}
            configs.append(config_type(**{k: type(getattr(config_type, k))(v) for k, v in overrides.items()
                                          if v is not None}))
    return tuple(configs)


def parse_settings_argv(argv: Sequence[str]) -> argparse.Namespace:
    """The settings flags of a command line, parsed as generate.py parses them; raises SettingsError."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # no exit, no usage print: a library raises
            raise SettingsError(f"generate.py rejects {' '.join(argv)}: {message}")

    parser = _Parser(prog="generate.py", add_help=False)
    add_settings_arguments(parser)
    return parser.parse_args(list(argv))


@dataclass(frozen=True)
class RunConfigs:
    """What a command line makes: the run-model and the typed configs of its videos."""

    spec: RunModelSpec
    sampling: SamplingConfig
    guidance: GuidanceConfig | None
    execution: ExecutionConfig
    gligen: GligenConfig | None       # runs with GLIGEN grounding (grounded run-models only)
    controls: tuple[str, ...] = ()    # the run's control families (generation.controls)
    attention: tuple = ()             # the masking / modulation configs among them
    layout_only: bool = False         # --control none: the layout's prompt and layout.json, no control

    @property
    def uses_layout(self) -> bool:
        """Whether the run reads layouts: any control family, or --control none."""
        return bool(self.controls) or self.layout_only


def configs_from_args(args: argparse.Namespace) -> RunConfigs:
    """The configs of parsed settings flags; the defaults apply to every flag not given.

    Raises RunModelError (an unknown run-model, a size or frame count it cannot make) or SettingsError
    (a flag that does not apply to the run-model), each naming the flag.
    """
    from generation.config import ExecutionConfig, GuidanceConfig, replace_config, sampling_config_for

    spec = get_run_model(args.run_model)
    controls = run_controls(args, spec)
    _check_flags_apply(args, spec, controls)
    overrides = {name: getattr(args, name) for name in GUIDANCE_FLAGS}
    for name in ("use_ratio_based_loss", "boxdiff_normed"):
        overrides[name] = None if overrides[name] is None else bool(overrides[name])
    guidance = None
    if "energy" in controls:
        guided_layers = spec.guided_layers if args.guided_blocks is None else wan_guided_layers(args.guided_blocks)
        if not guided_layers:
            raise RunModelError(f"--control energy needs guided layers and run-model {spec.name!r} names none; use "
                                "its lvd_* run-model" + (" or --guided-blocks" if spec.family == WAN_FAMILY else ""))
        guidance = replace_config(GuidanceConfig(guided_layers=guided_layers, stop_rule=args.guidance_stop),
                                  **overrides)
    else:
        given = sorted(name for name, value in overrides.items() if value is not None)
        if given:
            raise SettingsError(f"run-model {spec.name!r} ({spec.method}) has no attention guidance; "
                                f"remove {', '.join('--' + g for g in given)}")
    sampling = sampling_config_for(spec, num_frames=args.num_frames, height=args.height, width=args.width,
                                   num_inference_steps=args.num_inference_steps, initial_noise=args.initial_noise,
                                   corrector_off_steps=_corrector_off_steps(args, spec, guidance),
                                   guidance_scale=args.guidance_scale, cfg_variant=args.cfg,
                                   guidance_rescale=args.cfg_rescale)
    return RunConfigs(spec=spec, sampling=sampling, guidance=guidance,
                      execution=ExecutionConfig(low_memory=args.low_memory),
                      gligen=_gligen_config(args, spec) if "gligen" in controls else None, controls=controls,
                      attention=build_attention_control_configs(args, controls),
                      layout_only=args.control == ["none"])


def _check_flags_apply(args: argparse.Namespace, spec: RunModelSpec, controls: tuple[str, ...]) -> None:
    wan_flags = [flag for flag, value in (("--guided-blocks", args.guided_blocks),
                                          ("--corrector-off-steps", args.corrector_off_steps),
                                          ("--offload-text-encoder", args.offload_text_encoder or None))
                 if value is not None]
    if spec.family != WAN_FAMILY and wan_flags:
        raise SettingsError(f"{', '.join(wan_flags)} apply to the Wan run-models only, not to {spec.name!r}")
    if args.guided_blocks is not None and "energy" not in controls:
        raise SettingsError(f"run-model {spec.name!r} ({spec.method}) has no attention guidance; remove --guided-blocks")
    if args.gligen_scheduled_sampling_beta is not None and not spec.grounded:
        raise SettingsError(f"--gligen_scheduled_sampling_beta does not apply to {spec.name!r}")


def _corrector_off_steps(args: argparse.Namespace, spec: RunModelSpec, guidance) -> int:
    """Wan's UniPC corrector-off steps: the flag, else the guided steps (LVD) or 0 (the stock sampler);
    0 for the UNet3D family (its DPM-Solver has no such setting)."""
    if spec.family != WAN_FAMILY:
        return 0
    if args.corrector_off_steps is not None:
        return args.corrector_off_steps
    return guidance.max_index_step if guidance is not None else 0


def _gligen_config(args: argparse.Namespace, spec: RunModelSpec):
    """GligenConfig for grounded run-models (lvd-gligen, lvd-plus), else None (spec 6.1: beta defaults to 1.0)."""
    if not spec.grounded:
        return None
    from models.gligen import GligenConfig

    beta = args.gligen_scheduled_sampling_beta
    return GligenConfig() if beta is None else GligenConfig(scheduled_sampling_beta=beta)


def output_options_from_args(args: argparse.Namespace, spec: RunModelSpec):
    """`generation.runs.OutputOptions` of the flags (Wan run-models add mp4 when --save-formats is not given)."""
    from generation.runs import OutputOptions

    formats = list(args.save_formats)
    if args.save_formats is DEFAULT_SAVE_FORMATS and spec.family == WAN_FAMILY:
        formats.append("mp4")
    return OutputOptions(formats=tuple(dict.fromkeys(formats)), fps=spec.fps, save_latents=args.save_latents,
                         annotate=not args.no_annotate, compare_baseline=args.compare_baseline)
