"""The grounded UNet3D of LVD-GLIGEN / LVD-plus (reference spec 6), built from stock diffusers parts.

The IGLIGEN adapters published as ``longlian/text-to-video-lvd-ms`` (ModelScope) and
``longlian/text-to-video-lvd-zs`` (Zeroscope) are a stock ``UNet3DConditionModel`` plus:
- a ``GatedSelfAttentionDense`` "fuser" in every *spatial* ``BasicTransformerBlock`` (down, mid and
  up ``attentions.<j>.transformer_blocks.0``; the temporal ``temp_attentions.*`` / ``transformer_in``
  blocks have none), run after self-attention and before cross-attention (spec 6.1);
- a text-only box/phrase position network (``GLIGENTextBoundingboxProjection``) as ``position_net``.

We build exactly that without forking diffusers: the stock UNet3D from its config, then diffusers'
own ``GatedSelfAttentionDense`` set as the ``fuser`` attribute of each spatial block, with the
arguments diffusers' ``BasicTransformerBlock`` uses for ``attention_type="gated"``
(``dim, cross_attention_dim, num_attention_heads, attention_head_dim``), and diffusers'
``GLIGENTextBoundingboxProjection`` with the arguments ``UNet2DConditionModel`` uses
(``positive_len = out_dim = cross_attention_dim``, feature type "text-only"). The stock
``BasicTransformerBlock.forward`` already calls ``self.fuser(hidden_states, objs)`` when its
``cross_attention_kwargs`` carry ``{"gligen": {"objs": objs}}`` (and pops that entry from a copy
before the attention processors see the kwargs).

ASSUMPTION (stated as the issue asks): the published weights use diffusers' GLIGEN parameter names,
``<spatial block>.fuser.{linear,attn.to_q/k/v/out.0,ff.net.0.proj,ff.net.2,norm1,norm2,alpha_attn,
alpha_dense}`` and ``position_net.{linears.0/2/4,null_positive_feature,null_position_feature}``, i.e.
the names a diffusers UNet with ``attention_type: "gated"`` has. The reference's fork built its
fusers and ``PositionNet`` from diffusers 0.20 classes with these names (its Fourier embedder's
frequency buffer is not persistent), and :func:`load_grounded_unet` checks the assumption: it reads
``unet/config.json`` (``attention_type`` must be ``"gated"``) and loads the state dict strictly,
naming any missing or unexpected keys.

Temporal blocks must never see the ``"gligen"`` entry (their ``BasicTransformerBlock`` has no fuser
and would fail with an AttributeError). Every call site in diffusers' UNet3D passes
``cross_attention_kwargs`` by keyword to ``transformer_in`` and to each ``temp_attentions.<j>``
(``TransformerTemporalModel``), so a forward pre-hook (``with_kwargs=True``) on exactly those
modules, selected by module path, hands them a copy of the kwargs without ``"gligen"``. The hook
never mutates the caller's dict and does nothing when there is no ``"gligen"`` entry.

Objects are computed once per video (``compute_gligen_objects``, outside the UNet forward) and passed
as ``cross_attention_kwargs={"gligen": {"objs": objs}}`` in the CFG pass only; guided passes of
LVD-plus pass no kwargs, so there the fusers get no objects (spec 4.7), as in the reference.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import UNet3DConditionModel
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from models.devices import cast_module
from models.hub import WEIGHT_SUFFIXES, MissingWeightsError, select_hub_files
from models.registry import GLIGEN_CROSS_ATTENTION_DIM

logger = logging.getLogger(__name__)

GATED_ATTENTION_TYPE = "gated"       # diffusers' `attention_type` for text-only GLIGEN
MAX_OBJECTS = 30                     # objects per frame (spec 6.1)
# Module paths (as in `unet.named_modules()`): spatial transformer blocks get a fuser, temporal
# transformers get the hook that drops "gligen". A bare "attentions" match would also hit temp_attentions.
_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
SPATIAL_BLOCK_PATH = re.compile(rf"^{_BLOCK}\.attentions\.\d+\.transformer_blocks\.\d+$")
TEMPORAL_TRANSFORMER_PATH = re.compile(rf"^(transformer_in|{_BLOCK}\.temp_attentions\.\d+)$")
UNET_WEIGHT_NAME = "diffusion_pytorch_model"


class GroundedModelError(ValueError):
    """A grounded (GLIGEN) UNet config or state dict does not match what the method needs."""


@dataclass(frozen=True)
class GligenConfig:
    """GLIGEN conditioning of LVD-GLIGEN / LVD-plus (spec 6.1)."""

    # Fusers are on for the first int(beta * steps) steps. The reference's run() default is 1.0;
    # the README commands use 0.4.
    scheduled_sampling_beta: float = 1.0
    max_objects: int = MAX_OBJECTS   # per frame (spec 6.1)

    def __post_init__(self):
        if not 0.0 <= self.scheduled_sampling_beta <= 1.0:
            raise ValueError("gligen scheduled_sampling_beta must be in [0, 1] (the fraction of steps with the "
                             f"fusers on), found {self.scheduled_sampling_beta!r}")
        if self.max_objects < 1:
            raise ValueError(f"gligen max_objects must be >= 1, found {self.max_objects!r}")


@dataclass(frozen=True)
class GligenInputs:
    """Per-frame GLIGEN inputs, rows in the UNet's (batch * frames) order, batch-major."""

    boxes_xyxy: torch.Tensor          # (rows, max_objects, 4) unclipped normalised xyxy, zero-padded
    phrase_embeddings: torch.Tensor   # (rows, max_objects, D) pooled CLIP text features, zero-padded
    masks: torch.Tensor               # (rows, max_objects) 1 for a real object, 0 for padding


# ---------------------------------------------------------------------------------------------
# Building the grounded UNet


def spatial_transformer_block_paths(unet: torch.nn.Module) -> list[str]:
    """Module paths of the spatial ``BasicTransformerBlock``s (those that get a fuser), in module order."""
    return [name for name, _ in unet.named_modules() if SPATIAL_BLOCK_PATH.match(name)]


def temporal_transformer_paths(unet: torch.nn.Module) -> list[str]:
    """Module paths of the temporal transformers (``transformer_in``, ``*.temp_attentions.<j>``)."""
    return [name for name, _ in unet.named_modules() if TEMPORAL_TRANSFORMER_PATH.match(name)]


def _drop_gligen_kwarg(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of temporal transformers: the same call without ``cross_attention_kwargs["gligen"]``.

    Builds new dicts (the caller's stays as it was); returns None (no change) when there is nothing to drop.
    """
    extra = kwargs.get("cross_attention_kwargs")
    if not extra or "gligen" not in extra:
        return None
    kept = {key: value for key, value in extra.items() if key != "gligen"}
    return args, {**kwargs, "cross_attention_kwargs": kept or None}


def attach_gligen_modules(unet: UNet3DConditionModel) -> UNet3DConditionModel:
    """Turn a stock UNet3D into the grounded one in place: fusers, ``position_net``, temporal hooks.

    New modules are created on the UNet's device and in its dtype from the current torch RNG, with
    diffusers' initialisation (gates ``alpha_attn = alpha_dense = 0``, so the output is unchanged
    until weights are loaded). The config gains ``attention_type: "gated"`` so that
    ``save_pretrained`` writes it.
    """
    if is_grounded(unet):
        raise GroundedModelError("this UNet already has GLIGEN modules (position_net / fusers)")
    cross_attention_dim = unet.config.cross_attention_dim
    if not isinstance(cross_attention_dim, int):
        raise GroundedModelError(f"expected an integer cross_attention_dim, found {cross_attention_dim!r}")
    reference = next(unet.parameters())
    spatial = spatial_transformer_block_paths(unet)
    temporal = temporal_transformer_paths(unet)
    _check_block_coverage(unet, spatial, temporal)
    with torch.device(reference.device):
        for path in spatial:
            block = unet.get_submodule(path)
            # The arguments BasicTransformerBlock.__init__ uses for attention_type="gated".
            block.fuser = GatedSelfAttentionDense(block.dim, block.cross_attention_dim,
                                                  block.num_attention_heads, block.attention_head_dim
                                                  ).to(dtype=reference.dtype)
        # As UNet2DConditionModel._set_pos_net_if_use_gligen: positive_len = out_dim = cross_attention_dim.
        unet.position_net = GLIGENTextBoundingboxProjection(
            positive_len=cross_attention_dim, out_dim=cross_attention_dim, feature_type="text-only",
        ).to(dtype=reference.dtype)
    for path in temporal:
        unet.get_submodule(path).register_forward_pre_hook(_drop_gligen_kwarg, with_kwargs=True)
    unet.register_to_config(attention_type=GATED_ATTENTION_TYPE)
    return unet


def _check_block_coverage(unet: torch.nn.Module, spatial: Sequence[str], temporal: Sequence[str]) -> None:
    """Every BasicTransformerBlock is either a spatial block or inside a hooked temporal transformer;
    otherwise a diffusers change moved a block and "gligen" could reach a block without a fuser."""
    spatial_set = set(spatial)
    uncovered = [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)
                 and name not in spatial_set and not any(name.startswith(t + ".") for t in temporal)]
    if uncovered or not spatial:
        raise GroundedModelError(f"unexpected UNet3D layout: spatial blocks {list(spatial)[:3]}..., transformer "
                                 f"blocks neither spatial nor temporal: {uncovered[:5]}")


def is_grounded(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` carries GLIGEN modules (a ``position_net``)."""
    return isinstance(getattr(unet, "position_net", None), GLIGENTextBoundingboxProjection)


def fuser_modules(unet: torch.nn.Module) -> dict[str, GatedSelfAttentionDense]:
    """``{spatial block path: its fuser}``."""
    return {path: unet.get_submodule(path).fuser for path in spatial_transformer_block_paths(unet)
            if isinstance(getattr(unet.get_submodule(path), "fuser", None), GatedSelfAttentionDense)}


def gligen_parameter_names(unet: torch.nn.Module) -> list[str]:
    """State-dict keys of the GLIGEN modules (fusers and position net)."""
    return [key for key in unet.state_dict() if key.startswith("position_net.") or ".fuser." in key]


def validate_grounded_config(config: Mapping[str, Any], where: str,
                             cross_attention_dim: int | None = GLIGEN_CROSS_ATTENTION_DIM) -> None:
    """Raise `GroundedModelError` unless ``config`` is a UNet3D config with ``attention_type: "gated"``
    (and, unless None, the given ``cross_attention_dim``)."""
    attention_type = config.get("attention_type")
    if attention_type != GATED_ATTENTION_TYPE:
        raise GroundedModelError(
            f"{where}: expected a grounded UNet config with attention_type {GATED_ATTENTION_TYPE!r} (GLIGEN "
            f"fusers), found attention_type {attention_type!r}; this is not an LVD-GLIGEN / IGLIGEN UNet "
            "(for lvd-plus use the `weights_only` revision of longlian/text-to-video-lvd-ms)")
    if cross_attention_dim is not None and config.get("cross_attention_dim") != cross_attention_dim:
        raise GroundedModelError(f"{where}: expected cross_attention_dim {cross_attention_dim} (the OpenCLIP-H text "
                                 f"width of ModelScope / Zeroscope), found {config.get('cross_attention_dim')!r}")


def build_grounded_unet(unet_config: Mapping[str, Any]) -> UNet3DConditionModel:
    """A grounded UNet3D (random weights from the current RNG, on the current default device) from a
    UNet3D config with ``attention_type`` "gated" or without one (a base model's config)."""
    config = dict(unet_config)
    attention_type = config.pop("attention_type", GATED_ATTENTION_TYPE)
    if attention_type != GATED_ATTENTION_TYPE:
        raise GroundedModelError(f"cannot build a grounded UNet from attention_type {attention_type!r}; "
                                 f"expected {GATED_ATTENTION_TYPE!r}")
    # The stock UNet3D does not know `attention_type`: drop it, build, then add the GLIGEN modules.
    return attach_gligen_modules(UNet3DConditionModel.from_config(config))


def find_unet_weight_files(unet_dir: Path) -> list[Path]:
    """The weight files of a saved UNet: non-variant safetensors (all shards), else .bin, else variants."""
    if not unet_dir.is_dir():
        return []
    names = [path.name for path in unet_dir.iterdir() if path.name.endswith(WEIGHT_SUFFIXES)]
    return [unet_dir / name for name in select_hub_files(names) if name.endswith(WEIGHT_SUFFIXES)]


def read_state_dict(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Merge the tensors of .safetensors / .bin files (CPU)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.name.endswith(".safetensors"):
            state.update(load_file(str(path), device="cpu"))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def load_grounded_unet(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                       cross_attention_dim: int | None = GLIGEN_CROSS_ATTENTION_DIM) -> UNet3DConditionModel:
    """The grounded UNet3D of a hub-like folder (``<folder>/unet/config.json`` + weights), loaded strictly.

    The architecture is built on the meta device (no memory, no initialisation), then every tensor of
    the state dict is assigned; missing or unexpected keys and shape mismatches raise `GroundedModelError`.
    """
    unet_dir = Path(folder) / "unet"
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise MissingWeightsError(f"no UNet config at {config_file}")
    config = json.loads(config_file.read_text())
    validate_grounded_config(config, str(config_file), cross_attention_dim)
    files = find_unet_weight_files(unet_dir)
    if not files:
        raise MissingWeightsError(f"no UNet weights (*.safetensors or *.bin) in {unet_dir}")
    with torch.device("meta"):
        unet = build_grounded_unet(config)
    state = read_state_dict(files)
    expected = set(unet.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise GroundedModelError(
            f"{unet_dir}: the weights do not match the grounded UNet3D (diffusers GLIGEN naming, see "
            f"models/gligen.py): {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}")
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise GroundedModelError(f"{unet_dir}: the weights do not fit the config: {exc}") from exc
    left_on_meta = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    assert not left_on_meta, left_on_meta  # every tensor is persistent, so all were assigned
    cast_module(unet, dtype)
    unet.eval()
    logger.info("loaded grounded UNet3D from %s (%d GLIGEN tensors)", unet_dir, len(gligen_parameter_names(unet)))
    return unet


# ---------------------------------------------------------------------------------------------
# Conditioning tensors


def encode_phrases(text_encoder, tokenizer, phrases: Sequence[str], device: torch.device | str,
                   dtype: torch.dtype) -> torch.Tensor:
    """(len(phrases), D) pooled CLIP text features of the phrases, tokenised with padding=True (spec 6.1).

    Padding to the longest phrase does not change a phrase's pooled (EOS-position) feature, since the
    text encoder is causal, so all phrases are encoded in one batch.
    """
    hidden = text_encoder.config.hidden_size
    if not phrases:
        return torch.zeros(0, hidden, device=device, dtype=dtype)
    tokens = tokenizer(list(phrases), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt")
    with torch.no_grad():
        output = text_encoder(input_ids=tokens.input_ids.to(text_encoder.device),
                              attention_mask=tokens.attention_mask.to(text_encoder.device))
    return output.pooler_output.to(device=device, dtype=dtype)


def build_gligen_inputs(boxes_xyxy: np.ndarray, phrase_embeddings: torch.Tensor,
                        max_objects: int = MAX_OBJECTS) -> GligenInputs:
    """Per-frame GLIGEN inputs from track boxes (spec 6): one row per frame.

    ``boxes_xyxy``: (tracks, frames, 4) normalised xyxy with exact zeros where a track is absent;
    ``phrase_embeddings``: (tracks, D). In each frame, the tracks whose box is not exactly [0, 0, 0, 0]
    (at most ``max_objects``, in track order), boxes unclipped; zero padding with mask 0.
    Returns tensors of shape (frames, max_objects, ·) on the embeddings' device and dtype.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != phrase_embeddings.shape[0]:
        raise ValueError(f"expected boxes (tracks, frames, 4) and embeddings (tracks, D) with the same number "
                         f"of tracks, found {boxes.shape} and {tuple(phrase_embeddings.shape)}")
    num_tracks, num_frames = boxes.shape[:2]
    device, dtype = phrase_embeddings.device, phrase_embeddings.dtype
    # float32 first, then the model dtype, as the reference builds its box tensor (no double rounding).
    out_boxes = torch.zeros(num_frames, max_objects, 4, dtype=torch.float32)
    out_embeddings = torch.zeros(num_frames, max_objects, phrase_embeddings.shape[1], device=device, dtype=dtype)
    out_masks = torch.zeros(num_frames, max_objects)
    dropped = 0
    for frame in range(num_frames):
        present = [track for track in range(num_tracks) if np.any(boxes[track, frame] != 0.0)]
        dropped = max(dropped, len(present) - max_objects)
        present = present[:max_objects]
        if present:
            out_boxes[frame, :len(present)] = torch.from_numpy(boxes[present, frame]).float()
            out_embeddings[frame, :len(present)] = phrase_embeddings[present]
            out_masks[frame, :len(present)] = 1.0
    if dropped > 0:
        logger.warning("a frame has %d objects; GLIGEN keeps the first %d of each frame", max_objects + dropped,
                       max_objects)
    return GligenInputs(boxes_xyxy=out_boxes.to(device=device, dtype=dtype), phrase_embeddings=out_embeddings,
                        masks=out_masks.to(device=device, dtype=dtype))


def stack_cfg_gligen_inputs(inputs: GligenInputs) -> GligenInputs:
    """(frames, ...) -> (2 * frames, ...): [unconditional frames 0..F-1 (masks zeroed); conditional frames].

    This is the order of the UNet3D's spatial blocks, which see (batch * frames) rows, batch-major.
    """
    return GligenInputs(boxes_xyxy=torch.cat([inputs.boxes_xyxy] * 2),
                        phrase_embeddings=torch.cat([inputs.phrase_embeddings] * 2),
                        masks=torch.cat([torch.zeros_like(inputs.masks), inputs.masks]))


def compute_gligen_objects(unet: torch.nn.Module, inputs: GligenInputs) -> torch.Tensor:
    """(rows, max_objects, cross_attention_dim) object tokens for the fusers, from ``unet.position_net``."""
    if not is_grounded(unet):
        raise GroundedModelError("GLIGEN conditioning needs a grounded UNet (models.gligen.build_grounded_unet / "
                                 "a lvd-gligen or lvd-plus run-model)")
    expected = unet.position_net.positive_len
    if inputs.phrase_embeddings.shape[-1] != expected:
        raise GroundedModelError(f"phrase features have width {inputs.phrase_embeddings.shape[-1]} but the position "
                                 f"net expects {expected} (the text encoder does not match this UNet)")
    with torch.no_grad():
        return unet.position_net(boxes=inputs.boxes_xyxy, masks=inputs.masks,
                                 positive_embeddings=inputs.phrase_embeddings)


def build_gligen_objects(model, boxes_xyxy: np.ndarray, phrases: Sequence[str],
                         max_objects: int = MAX_OBJECTS) -> torch.Tensor:
    """(2 * frames, max_objects, C) fuser objects for a CFG batch [uncond; cond], for a loaded model
    (``unet``, ``text_encoder``, ``tokenizer``, ``device``, ``dtype``)."""
    embeddings = encode_phrases(model.text_encoder, model.tokenizer, phrases, model.device, model.dtype)
    inputs = stack_cfg_gligen_inputs(build_gligen_inputs(boxes_xyxy, embeddings, max_objects))
    return compute_gligen_objects(model.unet, inputs)


# ---------------------------------------------------------------------------------------------
# Scheduled sampling


def count_grounded_steps(scheduled_sampling_beta: float, num_steps: int) -> int:
    """Steps with the fusers on: ``int(beta * steps)`` (spec 6.1; 16 of 40 at beta 0.4)."""
    return int(scheduled_sampling_beta * num_steps)


def set_fusers_enabled(unet: torch.nn.Module, enabled: bool) -> None:
    """Switch every fuser on or off (a disabled ``GatedSelfAttentionDense`` returns its input)."""
    for fuser in fuser_modules(unet).values():
        fuser.enabled = enabled


@contextlib.contextmanager
def fuser_state_restored(unet: torch.nn.Module) -> Iterator[None]:
    """Restore each fuser's ``enabled`` flag on exit (scheduled sampling switches them per step)."""
    saved = {path: fuser.enabled for path, fuser in fuser_modules(unet).items()}
    try:
        yield
    finally:
        for path, fuser in fuser_modules(unet).items():
            fuser.enabled = saved.get(path, True)
