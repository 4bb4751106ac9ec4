"""Layout control through the attention logits: Peekaboo-style masking and DenseDiffusion-style modulation.

Both families add a bias ``B`` to the logits of chosen attention modules of the model call that samples
(``softmax(q k^T / sqrt(d) + B)``), on the conditional branch only (the videos `Backbone.model_call` marks as
conditional; the negative prompt's rows get ``B = 0``), with zero extra forward passes. The guided passes of
LVD's energy guidance see the unbiased attention (the bias acts when the backbone samples, not when the
recorder measures), so the families combine: masking or modulation places, the energy refines.

Regions (README, "Layout control families", has the equations). For each video, frame ``f`` (the frames of
the attention maps: every frame for UNet3D, the latent frames for Wan) and object ``o``, ``M[f, p, o] = 1``
when position ``p`` of the map lies in the object's box (the energies' rasterisation, `compute_box_masks`), and
the background column ``M[f, p, O] = 1 - max_o M[f, p, o]``. Every position has at least one region. Text
tokens have regions too: an object's tokens its object, the prompt's other words the background, the
special tokens (start, end, padding) every region. Two positions (or a position and a token) *share a region*
when ``M_q . M_k > 0``.

- Masking (Jain et al., "Peekaboo", CVPR 2024): ``B = 0`` where the pair shares a region, ``-inf`` elsewhere,
  for the first ``max_index_step`` steps: object tokens attend inside their box only, background words outside
  every box, spatial self-attention stays within foreground / background, temporal attention within each
  object's track (the same position in frames where the object covers it), and Wan's 3-D self-attention both.
- Modulation (Kim et al., "DenseDiffusion", ICCV 2023; the logit-bias form Comp-Attn uses on Wan):
  ``B = lambda_i * (1 - a) * (+1 if the pair shares a region else -1)``, ``lambda_i = s * (1 - i / N)^p``
  (s per attention kind, p the decay power, i the step of N), ``a`` the area fraction of the key's region
  (cross-attention: the token's object box in the query's frame) so that small boxes are pushed harder.
  Cross-attention modulates object tokens only.

Zero strength (no steps masked, both modulation strengths 0) builds no control: the run is the baseline,
bit for bit. Processors are installed for the run and restored on exit.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from generation.attention_config import MaskingConfig, ModulationConfig  # noqa: F401  (re-exported)
from generation.backbones.base import CROSS, SPATIAL, TEMPORAL, VIDEO, Backbone

from generation.energies import compute_box_masks
from generation.loop import BatchContext, ControlBase, Step
from models.attention import BiasedAttnProcessor
from utils.layout import LayoutCondition

# Token strings of the CLIP and umT5 tokenizers that are no word of the prompt (they attend everywhere).
SPECIAL_TOKENS = frozenset({"<|startoftext|>", "<|endoftext|>", "</s>", "<s>", "<pad>", "<unk>"})


def compute_config_bias(config: MaskingConfig | ModulationConfig, kind: str, queries: "RegionGrid",
                        keys: "RegionGrid", strength: float) -> torch.Tensor:
    """The logit bias of ``config``'s family for one kind of attention layer (the definitions in the README)."""
    if isinstance(config, MaskingConfig):
        return compute_mask_bias(queries.regions, keys.regions)
    if kind == CROSS:
        return compute_cross_modulation(queries.regions, queries.areas, keys.token_objects, strength)
    return compute_self_modulation(queries.regions, keys.regions, keys.weights, strength)


# --------------------------------------------------------------------------------------------
# Pure functions. Regions are (..., n, G) float32 with G = objects + 1 (the background last).


def compute_position_regions(masks: torch.Tensor) -> torch.Tensor:
    """Box masks (O, F, N) -> (F, N, O + 1) regions: the objects' masks, then the background (outside all)."""
    objects = masks.permute(1, 2, 0).float()
    background = 1 - objects.amax(dim=-1, keepdim=True) if objects.shape[-1] else torch.ones_like(objects[..., :1])
    return torch.cat([objects, background], dim=-1)


def compute_token_regions(num_tokens: int, token_positions: Sequence[Sequence[int]],
                          background_positions: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, O + 1) token regions and (K, O) object one-hots: an object's tokens its object, background words the
    background, every other token (start, end, padding) every region (and no object)."""
    num_objects = len(token_positions)
    regions = torch.ones(num_tokens, num_objects + 1, device=device)
    objects = torch.zeros(num_tokens, num_objects, device=device)
    for position in background_positions:
        if position < num_tokens:
            regions[position] = 0
            regions[position, num_objects] = 1
    for index, positions in enumerate(token_positions):
        for position in positions:
            if position < num_tokens:
                regions[position] = 0
                regions[position, index] = 1
                objects[position, index] = 1
    return regions, objects


def compute_mask_bias(query_regions: torch.Tensor, key_regions: torch.Tensor) -> torch.Tensor:
    """(..., Q, G), (..., K, G) -> (..., Q, K): 0 where query and key share a region, -inf elsewhere."""
    shared = query_regions @ key_regions.transpose(-1, -2) > 0
    shared |= ~shared.any(dim=-1, keepdim=True)  # a query without any key would give NaN: leave it unmasked
    return torch.zeros(shared.shape, device=shared.device).masked_fill(~shared, float("-inf"))


def compute_self_modulation(query_regions: torch.Tensor, key_regions: torch.Tensor, key_weights: torch.Tensor,
                            strength: float) -> torch.Tensor:
    """(..., Q, K) bias ``strength * w_k * (+1 shared / -1 not)``; ``key_weights`` (..., K) = 1 - region area."""
    shared = (query_regions @ key_regions.transpose(-1, -2) > 0).float()
    return strength * key_weights.unsqueeze(-2) * (2 * shared - 1)


def compute_cross_modulation(query_regions: torch.Tensor, query_areas: torch.Tensor, token_objects: torch.Tensor,
                             strength: float) -> torch.Tensor:
    """(..., Q, K) bias: for a token of object o, ``strength * (1 - a_o) * (+1 inside the box / -1 outside)``
    with ``a_o`` the box's area fraction in the query's frame; 0 for every other token.

    ``query_regions`` (..., Q, O + 1), ``query_areas`` (..., Q, O + 1), ``token_objects`` (K, O)."""
    objects = token_objects.shape[-1]
    signed = (2 * query_regions[..., :objects] - 1) * (1 - query_areas[..., :objects])
    return strength * signed @ token_objects.transpose(-1, -2)


def compute_background_positions(condition: LayoutCondition) -> list[int]:
    """Token positions of the prompt's words that belong to no object (special tokens excluded)."""
    if condition.token_map is None or condition.token_positions is None:
        return []
    taken = {position for positions in condition.token_positions for position in positions}
    return [position for position, token in enumerate(condition.token_map)
            if position not in taken and token not in SPECIAL_TOKENS]


# --------------------------------------------------------------------------------------------
# Geometry: the rows, queries and keys of each kind of attention module


@dataclass(frozen=True)
class RegionGrid:
    """Regions of one video's queries or keys, laid out like the module's rows: (rows, n, G)."""

    regions: torch.Tensor
    areas: torch.Tensor | None = None         # (rows, n, G) area fraction of each region in the position's frame
    weights: torch.Tensor | None = None       # (rows, n) 1 - area of the smallest region holding the position
    token_objects: torch.Tensor | None = None  # (K, O) for text keys


class VideoRegions:
    """One video's regions at every map size, computed once per size and kept for the run."""

    def __init__(self, condition: LayoutCondition, num_map_frames: int, map_sizes: dict[int, tuple[int, int]],
                 background_tokens: bool, device):
        self.boxes = np.asarray(condition.boxes_at(num_map_frames), dtype=np.float64)  # (O, F, 4)
        self.num_frames = num_map_frames
        self.map_sizes = map_sizes
        self.token_positions = condition.token_positions or ()
        self.background_positions = compute_background_positions(condition) if background_tokens else []
        self.device = device

    @functools.lru_cache(maxsize=None)
    def grid(self, num_positions: int) -> RegionGrid:
        """(F, N, G) regions, areas and key weights at the map of ``num_positions`` positions."""
        if num_positions not in self.map_sizes:
            raise RuntimeError(f"no attention map of {num_positions} positions; known sizes: "
                               f"{ {n: hw for n, hw in self.map_sizes.items()} }")
        height, width = self.map_sizes[num_positions]
        masks = compute_box_masks(self.boxes, height, width, self.device).masks  # (O, F, N)
        regions = compute_position_regions(masks)                                 # (F, N, G)
        areas = regions.mean(dim=1, keepdim=True).expand_as(regions)              # (F, N, G)
        weights = (regions * (1 - areas) + (1 - regions) * -1).amax(dim=-1)       # (F, N): 1 - smallest area held
        return RegionGrid(regions, areas, weights)

    @functools.lru_cache(maxsize=None)
    def tokens(self, num_tokens: int) -> RegionGrid:
        regions, objects = compute_token_regions(num_tokens, self.token_positions, self.background_positions,
                                                 self.device)
        return RegionGrid(regions.unsqueeze(0), token_objects=objects)

    def layout(self, kind: str, rows: int, queries: int, keys: int) -> tuple[RegionGrid, RegionGrid]:
        """(query grid, key grid) of a module of ``kind`` with ``rows`` rows per video."""
        frames = self.num_frames
        if kind == TEMPORAL:           # rows: positions; queries and keys: frames
            grid = self.grid(rows)
            moved = RegionGrid(grid.regions.transpose(0, 1), grid.areas.transpose(0, 1), grid.weights.T)
            return moved, moved
        if rows == frames:             # one row per frame: UNet3D spatial / cross
            grid = self.grid(queries)
        elif rows == 1 and queries % frames == 0:  # one row per video: Wan (frame-major positions)
            full = self.grid(queries // frames)
            grid = RegionGrid(full.regions.reshape(1, queries, -1), full.areas.reshape(1, queries, -1),
                              full.weights.reshape(1, queries))
        else:
            raise RuntimeError(f"a {kind} attention module with {rows} rows per video and {queries} queries does "
                               f"not fit {frames} map frames")
        return grid, (self.tokens(keys) if kind == CROSS else grid)


# --------------------------------------------------------------------------------------------
# The control


class AttentionLayoutControl(ControlBase):
    """A family's bias on the conditional rows of every module of its kinds, while the backbone samples."""

    def __init__(self, backbone: Backbone, videos: Sequence[VideoRegions | None], config):
        self.backbone = backbone
        self.videos = list(videos)
        self.config = config
        kinds = config.kinds()
        self.layers = {name: kind for name, kind in backbone.attention_layers().items() if kind in kinds}
        self._step: Step | None = None
        self._cache: dict[tuple, torch.Tensor | None] = {}
        self._installed: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "AttentionLayoutControl":
        def build(name: str, replaced):
            return BiasedAttnProcessor(name, replaced, functools.partial(self.bias, self.layers[name]))

        self._installed = self.backbone.attention_processors(list(self.layers), build)
        self._installed.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        installed, self._installed = self._installed, None
        self._step = None
        self._cache.clear()
        installed.__exit__(*exc_info)

    def before_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self._step = step
        # Keep the biases whose strength this step shares (a mask: the whole masked span).
        self._cache = {key: bias for key, bias in self._cache.items()
                       if key[-1] == self.config.strength_at(key[0], step.index, step.num_steps)}
        return latents

    def bias(self, kind: str, hidden_states: torch.Tensor, num_keys: int) -> torch.Tensor | None:
        """(rows, 1, queries, keys) bias of this call of a ``kind`` module, or None (not sampling, an inactive
        step, or no conditional video)."""
        call = self.backbone.model_call
        if call is None or self._step is None:
            return None
        strength = self.config.strength_at(kind, self._step.index, self._step.num_steps)
        cond = range(*call.cond.indices(call.num_videos))
        if strength == 0 or not len(cond):
            return None
        rows, queries = hidden_states.shape[:2]
        key = (kind, rows, queries, num_keys, call.num_videos, call.cond.start, call.cond.stop, strength)
        if key not in self._cache:
            self._cache[key] = self._compute(kind, rows, queries, num_keys, call.num_videos, cond, strength,
                                             hidden_states.device, hidden_states.dtype)
        return self._cache[key]

    def _compute(self, kind, rows, queries, num_keys, num_videos, cond, strength, device,
                 dtype) -> torch.Tensor | None:
        per_video = rows // num_videos
        bias = None
        for position, video_index in enumerate(cond):
            video = self.videos[position]  # the conditional videos are the batch's, in order
            if video is None:
                continue
            query_grid, key_grid = video.layout(kind, per_video, queries, num_keys)
            video_bias = compute_config_bias(self.config, kind, query_grid, key_grid, strength)
            if bias is None:
                bias = torch.zeros(rows, 1, queries, num_keys, device=device, dtype=dtype)
            bias[video_index * per_video:(video_index + 1) * per_video, 0] = video_bias.to(device, dtype)
        return bias


def build_attention_control(config, context: BatchContext) -> AttentionLayoutControl | None:
    """The masking or modulation control of a batch, or None when it has nothing to do (zero strength, no
    video with a layout of objects): the baseline then runs untouched."""
    num_steps = len(context.timesteps)
    kinds = config.kinds()
    if not kinds or not any(config.strength_at(kind, index, num_steps) for kind in kinds for index in range(num_steps)):
        return None
    backbone = context.backbone
    map_frames = backbone.guided_num_frames(context.sampling.num_frames)
    sizes = backbone.attention_map_sizes(context.sampling.height, context.sampling.width)
    map_sizes = {height * width: (height, width) for height, width in sizes}
    videos = []
    for condition in context.conditions:
        if condition is None or not condition.phrases:
            videos.append(None)
            continue
        if condition.num_frames != context.sampling.num_frames:
            raise ValueError(f"prompt {condition.prompt!r}: the layout has boxes for {condition.num_frames} frames "
                             f"but {context.sampling.num_frames} frames are generated; build the condition with "
                             f"num_frames={context.sampling.num_frames}")
        videos.append(VideoRegions(condition, map_frames, map_sizes,
                                   getattr(config, "background_tokens", False), backbone.device))
    if not any(videos):
        return None
    return AttentionLayoutControl(backbone, videos, config)

