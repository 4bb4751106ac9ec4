"""The `--run-model` choices as data (spec 1.5): which weights, resolution, frames and guided layers.

Each choice is a frozen `RunModelSpec`: a method on a backbone family. `METHOD_CONTROLS` is the one table
from a method to the layout controls it runs (`generation.controls.CONTROL_FAMILIES`), so a run-model
names its backbone (``family``) and its controls (``controls``); a new method is one entry there and its
entries in `RUN_MODELS`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path

UNET3D_FAMILY = "unet3d"  # ModelScope, Zeroscope, their GLIGEN adapters, the tiny models
WAN_FAMILY = "wan"        # Wan 2.1 T2V (a DiT with flow matching): models/wan.py, generation/backbones/wan.py

# Far past what any of these models was trained on (16 to 81 frames): a larger count is a typo, and as the
# latents and the temporal attention grow with it, such a run would fail late (out of memory) or crawl.
MAX_NUM_FRAMES = 256

# Latent = pixels / 8 for the SD-style VAE of ModelScope / Zeroscope (and of the tiny models).
VAE_SCALE_FACTOR = 8

# Spec 4.1: the six spatial cross-attention layers LVD guides, as stock diffusers module paths
# (processor names minus ".processor"). Temporal `temp_attentions.*` / `transformer_in.*` never appear.
LVD_GUIDED_LAYERS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",
)

MODELSCOPE_ID = "damo-vilab/text-to-video-ms-1.7b"
ZEROSCOPE_ID = "cerspense/zeroscope_v2_576w"
# The IGLIGEN adapters (spec 1.5, 6): ModelScope / Zeroscope UNets with GLIGEN fusers (models/gligen.py).
LVD_GLIGEN_MODELSCOPE_ID = "longlian/text-to-video-lvd-ms"
LVD_GLIGEN_ZEROSCOPE_ID = "longlian/text-to-video-lvd-zs"
# LVD-plus loads the ModelScope adapter from this revision (no hub pipeline code; spec 6.2).
LVD_PLUS_REVISION = "weights_only"
# The layout control families (generation.controls.CONTROL_FAMILIES builds them; generate.py's --control).
CONTROL_FAMILY_NAMES = ("gligen", "energy", "mask", "modulate")
# Method -> the layout control families it runs by default (generate.py's --control replaces them).
METHOD_CONTROLS: types.MappingProxyType[str, tuple[str, ...]] = types.MappingProxyType({
    "baseline": (),
    "lvd": ("energy",),                  # spec 4: energy guidance on the cross-attention maps
    "lvd-gligen": ("gligen",),           # spec 6.1: GLIGEN adapters, no guidance
    "lvd-plus": ("gligen", "energy"),    # spec 6.2: both
})
# Methods whose UNet carries GLIGEN fusers and a position net.
GROUNDED_METHODS = tuple(method for method, controls in METHOD_CONTROLS.items() if "gligen" in controls)
# Methods that take a layout (the others are the text-only baselines), and those with attention guidance.
LAYOUT_METHODS = tuple(method for method, controls in METHOD_CONTROLS.items() if controls)
GUIDED_METHODS = tuple(method for method, controls in METHOD_CONTROLS.items() if "energy" in controls)
# cross_attention_dim of the published adapters' UNets: the OpenCLIP-H text width of ModelScope / Zeroscope.
GLIGEN_CROSS_ATTENTION_DIM = 1024
# Folder names of the architecture configs (no weights) used for random-weight benchmarks.
MODELSCOPE_CONFIG_DIR = "damo-vilab__text-to-video-ms-1.7b"
ZEROSCOPE_CONFIG_DIR = "cerspense__zeroscope_v2_576w"

# Tiny random-weight models: 128x128 video -> 16x16 latents -> guided maps 8x8 and 4x4
# (ModelScope-256 has 32x32 latents and 16x16 / 8x8 maps). 8 frames keep a 40-step CFG run at a few seconds.
TINY_HEIGHT = 128
TINY_WIDTH = 128
TINY_NUM_FRAMES = 8


# Wan 2.1 T2V (diffusers `WanPipeline`). Defaults are the pipeline's and Wan's own (Wan2.1
# `wan/configs/shared_config.py`: 81 frames, 16 fps, 50 steps, CFG 5.0, UniPC with flow shift 3.0 for 480p).
WAN_1_3B_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_14B_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN_CONFIG_DIR = "Wan-AI__Wan2.1-T2V-1.3B-Diffusers"
WAN_HEIGHT = 480
WAN_WIDTH = 832
WAN_NUM_FRAMES = 81
WAN_NUM_INFERENCE_STEPS = 50
WAN_GUIDANCE_SCALE = 5.0
WAN_FPS = 16.0
WAN_SIZE_MULTIPLE = 16      # VAE 8x, then 2x2 patches
WAN_FRAMES_STEP = 4         # the VAE keeps frame 0 and folds each later group of 4 frames into one latent frame
# UniPC's corrector is off on this many first steps when an LVD Wan run-model is loaded (the guided steps of the
# default schedule, max_index_step 10, spec 4.8); baselines load the stock sampler (0). generate.py sets it from
# --corrector-off-steps / --max_index_step (README, "Wan 2.1").
WAN_LVD_CORRECTOR_OFF_STEPS = 10
WAN_NUM_LAYERS_1_3B = 30
WAN_NUM_LAYERS_14B = 40
# Wan's own negative prompt (`sample_neg_prompt` of Wan2.1's shared config; diffusers' WanPipeline example uses an
# English rendering of it). The umT5 tokenizer is multilingual.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的"
                       "肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# Guided cross-attention blocks of the 1.3B model (30 blocks): a starting point, to be tuned on real weights with
# scripts/probe_attention.py. Other depths get the same relative depths (`scale_guided_blocks`).
WAN_GUIDED_BLOCKS_1_3B = (8, 10, 12, 14, 16, 18)
# Tiny random-weight Wan (models/wan.py): 64x96 video -> 8x12 latents -> 4x6 maps; 17 frames -> 5 latent frames.
WAN_TINY_HEIGHT = 64
WAN_TINY_WIDTH = 96
WAN_TINY_NUM_FRAMES = 17
WAN_TINY_NUM_LAYERS = 6

# LVD-Shapes (models/shapes.py): small models trained here on the shapes world, shipped in shapes/weights/.
# 64x64 frames -> 16x16 latents (4x VAE) -> LVD's guided maps at 8x8 and 4x4. 20 steps keep a CPU video at
# seconds. The unconditional text of their training is "", so that is their negative prompt (LVD's negative
# prompt is words they never saw).
SHAPES_HEIGHT = 64
SHAPES_WIDTH = 64
SHAPES_NUM_FRAMES = 16
SHAPES_NUM_INFERENCE_STEPS = 20
SHAPES_UNET3D_FOLDER = "unet3d"
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "shapes" / "weights"


def scale_guided_blocks(blocks: tuple[int, ...], num_layers: int,
                        reference_layers: int = WAN_NUM_LAYERS_1_3B) -> tuple[int, ...]:
    """``blocks`` of a ``reference_layers``-deep model at the same relative depths of a ``num_layers``-deep one
    (rounded, duplicates merged): (8, 10, 12, 14, 16, 18) of 30 -> (11, 13, 16, 19, 21, 24) of 40."""
    return tuple(sorted({min(num_layers - 1, round(block * num_layers / reference_layers)) for block in blocks}))


def wan_guided_layers(blocks) -> tuple[str, ...]:
    """Module paths of the cross-attention of transformer blocks ``blocks``: ``blocks.<i>.attn2``."""
    return tuple(f"blocks.{int(block)}.attn2" for block in blocks)


WAN_1_3B_GUIDED_LAYERS = wan_guided_layers(WAN_GUIDED_BLOCKS_1_3B)
WAN_14B_GUIDED_LAYERS = wan_guided_layers(scale_guided_blocks(WAN_GUIDED_BLOCKS_1_3B, WAN_NUM_LAYERS_14B))
WAN_TINY_GUIDED_LAYERS = wan_guided_layers(scale_guided_blocks(WAN_GUIDED_BLOCKS_1_3B, WAN_TINY_NUM_LAYERS))
# The Wan shapes model: the UNet's 64x64 world, a 4x VAE (Wan's own is 8x), so 16x16 latents -> guided maps 8x8; 17
# frames -> 5 latent frames (Wan's 4x in time). 8 blocks.
SHAPES_WAN_HEIGHT = 64
SHAPES_WAN_WIDTH = 64
SHAPES_WAN_NUM_FRAMES = 17
SHAPES_WAN_NUM_LAYERS = 8
SHAPES_WAN_FOLDER = "wan"
# Its training localises the attention of the 1.3B's guided depths, blocks 2-5 (shapes/training.py), but LVD guides
# blocks 0-3: measured on the shapes benchmark (docs/BENCHMARKS.md, "The Wan sibling's guidance"), 0-3 has twice the
# detector mIoU of 2-5 (0.031 against 0.016) at the same placement; no prompt-following measure on the main object
# tells them apart (1/16 against 0/16: "Prompt following, measured on the main object").
SHAPES_WAN_TRAINED_LAYERS = wan_guided_layers(scale_guided_blocks(WAN_GUIDED_BLOCKS_1_3B, SHAPES_WAN_NUM_LAYERS))
SHAPES_WAN_GUIDED_LAYERS = wan_guided_layers((0, 1, 2, 3))


class RunModelError(ValueError):
    """An unknown run-model name or a setting the run-model cannot use (e.g. too few frames)."""


@dataclasses.dataclass(frozen=True)
class RunModelSpec:
    """One `--run-model` choice: the method and the video model it runs on.

    `height`/`width` are the generation size in pixels. `guided_layers` are the module paths of the
    cross-attention layers that attention guidance records (empty for methods without it).
    `config_dir_name` names the architecture folder under shared/model-configs (random-weight benchmarks).
    """

    name: str
    method: str
    model_id: str | None
    height: int
    width: int
    default_num_frames: int
    min_num_frames: int = 2                  # one frame is a picture, not a video
    max_num_frames: int = MAX_NUM_FRAMES
    revision: str | None = None
    guided_layers: tuple[str, ...] = ()
    tiny: bool = False
    config_dir_name: str | None = None
    family: str = UNET3D_FAMILY              # which loader and backbone adapter (generation/backbones)
    num_inference_steps: int = 40            # sampling defaults of the family (spec 4.8, 5.2)
    guidance_scale: float = 9.0
    negative_prompt: str | None = None       # None: the LVD negative prompt (spec 5.3)
    fps: float = 8.0                         # of the saved GIF / mp4 (spec 8.2)
    size_multiple: int | None = None         # None: the size is fixed; else --height/--width must be multiples
    frames_step: int = 1                     # num_frames must be 1 + k * frames_step (a temporal VAE factor)
    bundled: str | None = None               # weights shipped in shapes/weights/<bundled> (models/shapes.py)

    @property
    def small(self) -> bool:
        """A model small enough that one CPU thread runs it fastest (the tiny and the shipped shapes models:
        models.devices.choose_cpu_threads)."""
        return self.tiny or self.bundled is not None

    @property
    def controls(self) -> tuple[str, ...]:
        """The layout control families the method runs by default (`METHOD_CONTROLS`)."""
        return METHOD_CONTROLS[self.method]

    @property
    def grounded(self) -> bool:
        """Whether the UNet is the grounded (GLIGEN) one (models/gligen.py)."""
        return self.method in GROUNDED_METHODS

    @property
    def bundled_folder(self) -> Path | None:
        """Where the shipped weights of a bundled run-model live (None: weights come from the hub)."""
        return None if self.bundled is None else BUNDLED_WEIGHTS_DIR / self.bundled

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SCALE_FACTOR

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SCALE_FACTOR


RUN_MODELS: tuple[RunModelSpec, ...] = (
    # Reference: Zeroscope aborts when frames are unset (its LVD default, 16, is wrong for it).
    # Defaulting to its native 24 frames changes no run the reference accepts.
    RunModelSpec("lvd_zeroscope", "lvd", ZEROSCOPE_ID, 320, 576, default_num_frames=24, min_num_frames=24,
                 guided_layers=LVD_GUIDED_LAYERS, config_dir_name=ZEROSCOPE_CONFIG_DIR),
    RunModelSpec("lvd_modelscope256", "lvd", MODELSCOPE_ID, 256, 256, default_num_frames=16,
                 guided_layers=LVD_GUIDED_LAYERS, config_dir_name=MODELSCOPE_CONFIG_DIR),
    RunModelSpec("lvd_modelscope512", "lvd", MODELSCOPE_ID, 512, 512, default_num_frames=16,
                 guided_layers=LVD_GUIDED_LAYERS, config_dir_name=MODELSCOPE_CONFIG_DIR),
    # LVD-GLIGEN (spec 6.1): no attention guidance. Zeroscope needs >= 24 frames as for LVD.
    RunModelSpec("lvd-gligen_modelscope256", "lvd-gligen", LVD_GLIGEN_MODELSCOPE_ID, 256, 256, default_num_frames=16,
                 config_dir_name=MODELSCOPE_CONFIG_DIR),
    RunModelSpec("lvd-gligen_zeroscope", "lvd-gligen", LVD_GLIGEN_ZEROSCOPE_ID, 320, 576, default_num_frames=24,
                 min_num_frames=24, config_dir_name=ZEROSCOPE_CONFIG_DIR),
    # LVD-plus (spec 6.2): GLIGEN plus the section-4 guidance with the LVD defaults.
    RunModelSpec("lvd-plus_modelscope256", "lvd-plus", LVD_GLIGEN_MODELSCOPE_ID, 256, 256, default_num_frames=16,
                 revision=LVD_PLUS_REVISION, guided_layers=LVD_GUIDED_LAYERS, config_dir_name=MODELSCOPE_CONFIG_DIR),
    RunModelSpec("zeroscope", "baseline", ZEROSCOPE_ID, 320, 576, default_num_frames=24, min_num_frames=24,
                 config_dir_name=ZEROSCOPE_CONFIG_DIR),
    RunModelSpec("modelscope_256", "baseline", MODELSCOPE_ID, 256, 256, default_num_frames=16,
                 config_dir_name=MODELSCOPE_CONFIG_DIR),
    RunModelSpec("modelscope", "baseline", MODELSCOPE_ID, 512, 512, default_num_frames=16,
                 config_dir_name=MODELSCOPE_CONFIG_DIR),
    # Tiny random-weight models for tests and demos (models/tiny.py); both build the same weights.
    RunModelSpec("lvd_tiny", "lvd", None, TINY_HEIGHT, TINY_WIDTH, default_num_frames=TINY_NUM_FRAMES,
                 guided_layers=LVD_GUIDED_LAYERS, tiny=True),
    RunModelSpec("baseline_tiny", "baseline", None, TINY_HEIGHT, TINY_WIDTH, default_num_frames=TINY_NUM_FRAMES,
                 tiny=True),
    # Tiny grounded UNet (the lvd_tiny UNet plus tiny fusers and position net); both build the same weights.
    RunModelSpec("lvd-gligen_tiny", "lvd-gligen", None, TINY_HEIGHT, TINY_WIDTH, default_num_frames=TINY_NUM_FRAMES,
                 tiny=True),
    RunModelSpec("lvd-plus_tiny", "lvd-plus", None, TINY_HEIGHT, TINY_WIDTH, default_num_frames=TINY_NUM_FRAMES,
                 guided_layers=LVD_GUIDED_LAYERS, tiny=True),
    # LVD-Shapes: trained here, shipped with the repository (no download); both load the same weights.
    *(RunModelSpec(name, method, None, SHAPES_HEIGHT, SHAPES_WIDTH, default_num_frames=SHAPES_NUM_FRAMES,
                   guided_layers=LVD_GUIDED_LAYERS if method == "lvd" else (), bundled=SHAPES_UNET3D_FOLDER,
                   num_inference_steps=SHAPES_NUM_INFERENCE_STEPS, negative_prompt="")
      for name, method in (("lvd_shapes", "lvd"), ("baseline_shapes", "baseline"))),
    # Wan 2.1 T2V (a DiT, flow matching; models/wan.py, generation/backbones/wan.py). Baselines use the prompt as
    # is; the LVD variants guide `blocks.<i>.attn2`. Any size that is a multiple of 16, frames 1 + 4k.
    *(RunModelSpec(name, method, model_id, WAN_HEIGHT, WAN_WIDTH, default_num_frames=WAN_NUM_FRAMES,
                   guided_layers=layers if method == "lvd" else (), config_dir_name=WAN_CONFIG_DIR, family=WAN_FAMILY,
                   num_inference_steps=WAN_NUM_INFERENCE_STEPS, guidance_scale=WAN_GUIDANCE_SCALE,
                   negative_prompt=WAN_NEGATIVE_PROMPT, fps=WAN_FPS, size_multiple=WAN_SIZE_MULTIPLE,
                   frames_step=WAN_FRAMES_STEP, min_num_frames=1 + WAN_FRAMES_STEP)
      for name, method, model_id, layers in (
          ("wan2.1-1.3b", "baseline", WAN_1_3B_ID, WAN_1_3B_GUIDED_LAYERS),
          ("lvd_wan2.1-1.3b", "lvd", WAN_1_3B_ID, WAN_1_3B_GUIDED_LAYERS),
          ("wan2.1-14b", "baseline", WAN_14B_ID, WAN_14B_GUIDED_LAYERS),
          ("lvd_wan2.1-14b", "lvd", WAN_14B_ID, WAN_14B_GUIDED_LAYERS))),
    # The Wan shapes model: trained here, shipped with the repository; both load the same weights.
    *(RunModelSpec(name, method, None, SHAPES_WAN_HEIGHT, SHAPES_WAN_WIDTH, default_num_frames=SHAPES_WAN_NUM_FRAMES,
                   guided_layers=SHAPES_WAN_GUIDED_LAYERS if method == "lvd" else (), bundled=SHAPES_WAN_FOLDER,
                   family=WAN_FAMILY, num_inference_steps=SHAPES_NUM_INFERENCE_STEPS, guidance_scale=WAN_GUIDANCE_SCALE,
                   negative_prompt="", frames_step=WAN_FRAMES_STEP, min_num_frames=1 + WAN_FRAMES_STEP)
      for name, method in (("lvd_wan_shapes", "lvd"), ("wan_shapes", "baseline"))),
    # Tiny random-weight Wan (noise; for tests and demos); both build the same weights.
    *(RunModelSpec(name, method, None, WAN_TINY_HEIGHT, WAN_TINY_WIDTH, default_num_frames=WAN_TINY_NUM_FRAMES,
                   guided_layers=WAN_TINY_GUIDED_LAYERS if method == "lvd" else (), tiny=True, family=WAN_FAMILY,
                   num_inference_steps=WAN_NUM_INFERENCE_STEPS, guidance_scale=WAN_GUIDANCE_SCALE,
                   negative_prompt=WAN_NEGATIVE_PROMPT, fps=WAN_FPS, size_multiple=WAN_SIZE_MULTIPLE,
                   frames_step=WAN_FRAMES_STEP, min_num_frames=1 + WAN_FRAMES_STEP)
      for name, method in (("wan_tiny", "baseline"), ("lvd_wan_tiny", "lvd"))),
)

RUN_MODELS_BY_NAME: types.MappingProxyType[str, RunModelSpec] = types.MappingProxyType(
    {spec.name: spec for spec in RUN_MODELS})

# Names the reference accepts but cannot run, with what to use instead.
_BROKEN_NAMES = {
    "lvd": "the reference's bare `lvd` run-model is broken (it maps to no valid model); "
           "use `lvd_modelscope256`, `lvd_modelscope512` or `lvd_zeroscope`",
    "lvd-gligen": "the reference's bare `lvd-gligen` run-model is broken (it maps to no valid model); "
                  "use `lvd-gligen_modelscope256` or `lvd-gligen_zeroscope`",
    "zeroscope_xl": "`zeroscope_xl` (Zeroscope + XL upsampling) is not a run-model here: "
                    "generate with `zeroscope`, then upsample the videos (spec 11)",
}


def run_model_names() -> tuple[str, ...]:
    """All valid run-model names, in registry order (for argparse `choices`)."""
    return tuple(RUN_MODELS_BY_NAME)


def get_run_model(name: str) -> RunModelSpec:
    """The `RunModelSpec` called ``name``; raises `RunModelError` listing the choices otherwise."""
    spec = RUN_MODELS_BY_NAME.get(name)
    if spec is not None:
        return spec
    choices = ", ".join(RUN_MODELS_BY_NAME)
    if name in _BROKEN_NAMES:
        raise RunModelError(f"run-model {name!r} is not supported: {_BROKEN_NAMES[name]}. Choices: {choices}")
    close = difflib.get_close_matches(name, list(RUN_MODELS_BY_NAME), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RunModelError(f"unknown run-model {name!r}.{hint} Choices: {choices}")


def validate_num_frames(spec: RunModelSpec, num_frames: int | None) -> int:
    """The number of frames to generate: ``num_frames``, or the run-model's default when None.

    Raises `RunModelError` below the model's minimum (spec 1.2: Zeroscope needs at least 24 frames) or off
    the model's frame grid (a VAE that compresses time by 4 takes 1 + 4k frames).
    """
    if num_frames is None:
        return spec.default_num_frames
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise RunModelError(f"num_frames must be an integer, got {num_frames!r} ({type(num_frames).__name__})")
    if num_frames < spec.min_num_frames:
        raise RunModelError(
            f"run-model {spec.name!r} needs num_frames >= {spec.min_num_frames}, got {num_frames}"
            + (" (Zeroscope was trained on 24-frame clips)" if spec.min_num_frames == 24 else "")
        )
    if num_frames > spec.max_num_frames:
        raise RunModelError(f"run-model {spec.name!r} takes num_frames <= {spec.max_num_frames}, got {num_frames} "
                            f"(its default is {spec.default_num_frames})")
    if spec.frames_step > 1 and (num_frames - 1) % spec.frames_step:
        below = (num_frames - 1) // spec.frames_step * spec.frames_step + 1
        raise RunModelError(f"run-model {spec.name!r} needs num_frames = 1 + {spec.frames_step}k (its VAE folds "
                            f"frames by {spec.frames_step}), got {num_frames}; e.g. {below} or "
                            f"{below + spec.frames_step}")
    return num_frames


def validate_size(spec: RunModelSpec, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) to generate: the run-model's own, or the given ones where the model allows another size."""
    if height is None and width is None:
        return spec.height, spec.width
    height = spec.height if height is None else height
    width = spec.width if width is None else width
    if spec.size_multiple is None:
        if (height, width) != (spec.height, spec.width):
            raise RunModelError(f"run-model {spec.name!r} generates {spec.width}x{spec.height} only (its guided "
                                f"layers and presets are tuned for that size), got {width}x{height}")
        return height, width
    for name, value in (("height", height), ("width", width)):
        if value < spec.size_multiple or value % spec.size_multiple:
            raise RunModelError(f"run-model {spec.name!r} needs a {name} that is a positive multiple of "
                                f"{spec.size_multiple}, got {value}")
    return height, width
