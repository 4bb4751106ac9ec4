"""Box energies on cross-attention maps (reference spec 4.3, 4.4), vectorised and pure.

Every function takes tensors and plain numbers and returns tensors: nothing here calls a model,
reads a config or moves data between devices. Shapes use J for the guided tokens (each token
belongs to one object; a phrase of three tokens gives three entries), F for frames, H for heads
and N = h*w for the flattened attention map (row-major, ``p = y*w + x``).

Faithfulness: masks round origin and size separately, half to even; top-k sizes are float32
products truncated toward zero, at least 1; terms are summed over heads and frames and averaged
over an object's tokens, then over objects and layers; attention enters in float32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

# Downsampling factors of a UNet's attention maps relative to the latent, precomputed per layout.
MAP_FACTORS = (1, 2, 4, 8)


@dataclass(frozen=True)
class BoxMasks:
    """Rasterised boxes of every guided token and frame at one attention-map size."""

    height: int
    width: int
    masks: torch.Tensor    # (J, F, h*w) float32, 1 inside the box
    corners: torch.Tensor  # (J, F, 4) int64: x_min, y_min, x_max, y_max in map pixels, after clipping


@dataclass(frozen=True)
class GuidanceTargets:
    """Everything the energy needs that depends only on the layout: computed once per video."""

    token_indices: torch.Tensor  # (J,) int64 CLIP positions to record
    token_weights: torch.Tensor  # (J,) float32, 1 / (number of tokens of the token's object)
    num_objects: int
    masks_by_size: dict[int, BoxMasks]  # keyed by h*w

    def masks_for(self, num_positions: int) -> BoxMasks:
        try:
            return self.masks_by_size[num_positions]
        except KeyError:
            sizes = {n: (m.height, m.width) for n, m in self.masks_by_size.items()}
            raise ValueError(f"no box masks for an attention map of {num_positions} positions; "
                             f"prepared sizes: {sizes}") from None


def compute_box_corners(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., 4) normalised xyxy -> (..., 4) int64 map-pixel corners, as spec 4.3 rasterises them."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    x_min = np.round(boxes[..., 0] * width)   # numpy rounds half to even, like Python's round
    y_min = np.round(boxes[..., 1] * height)
    x_max = x_min + np.round((boxes[..., 2] - boxes[..., 0]) * width)
    y_max = y_min + np.round((boxes[..., 3] - boxes[..., 1]) * height)
    corners = np.stack([np.maximum(x_min, 0), np.maximum(y_min, 0),
                        np.minimum(x_max, width), np.minimum(y_max, height)], axis=-1)
    return corners.astype(np.int64)


def compute_box_masks(boxes_xyxy: np.ndarray, height: int, width: int,
                      device: torch.device | str = "cpu") -> BoxMasks:
    """Boxes (J, F, 4) normalised xyxy -> masks (J, F, h*w) float32 at an ``height x width`` map."""
    corners = compute_box_corners(boxes_xyxy, height, width)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    c = corners[..., None, None, :]
    inside = ((rows >= c[..., 1]) & (rows < c[..., 3]) & (cols >= c[..., 0]) & (cols < c[..., 2]))
    masks = torch.from_numpy(inside.reshape(*corners.shape[:-1], height * width).astype(np.float32))
    return BoxMasks(height, width, masks.to(device), torch.from_numpy(corners).to(device))


def prepare_guidance_targets(boxes_xyxy: np.ndarray, token_positions, map_sizes: Sequence[tuple[int, int]],
                             device: torch.device | str = "cpu") -> GuidanceTargets:
    """Layout boxes (objects, F, 4) and token positions per object -> :class:`GuidanceTargets`, with box
    masks at every attention-map grid ``(h, w)`` of ``map_sizes``."""
    token_indices, token_objects, token_weights = [], [], []
    for object_index, positions in enumerate(token_positions):
        for position in positions:
            token_indices.append(position)
            token_objects.append(object_index)
            token_weights.append(1.0 / len(positions))
    token_boxes = np.asarray(boxes_xyxy, dtype=np.float64)[np.asarray(token_objects, dtype=np.int64)]
    token_boxes = token_boxes.reshape(len(token_objects), -1, 4)
    masks_by_size = {height * width: compute_box_masks(token_boxes, height, width, device)
                     for height, width in map_sizes if height and width}
    return GuidanceTargets(token_indices=torch.tensor(token_indices, dtype=torch.int64, device=device),
                           token_weights=torch.tensor(token_weights, dtype=torch.float32, device=device),
                           num_objects=len(token_positions), masks_by_size=masks_by_size)


def compute_latent_map_sizes(latent_height: int, latent_width: int,
                             factors: Sequence[int] = MAP_FACTORS) -> tuple[tuple[int, int], ...]:
    """The attention-map grids of a UNet at ``latent / factor`` for each downsampling factor (spec 4.1)."""
    return tuple((latent_height // f, latent_width // f) for f in factors
                 if latent_height // f and latent_width // f)


# --------------------------------------------------------------------------------------------
# Terms. ``attention`` below is (J, F, H, N) float32; ``masks`` is (J, F, N) float32.


def compute_topk_mean(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean of the ``k`` largest entries along the last axis; ``k`` broadcasts over the leading axes."""
    ranked = values.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    k = k.expand(values.shape[:-1])
    return ranked.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1) / k.to(values.dtype)


def compute_topk_sizes(masks: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, F) foreground and background top-k sizes: max(1, trunc(top_p * area)) in float32."""
    inside = masks.sum(dim=-1)
    outside = (1 - masks).sum(dim=-1)
    return (top_p * inside).long().clamp(min=1), (top_p * outside).long().clamp(min=1)


def compute_fg_bg_energy(attention: torch.Tensor, masks: torch.Tensor, fg_top_p: float,
                         bg_top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, F) foreground and background terms: sum over heads of 1 - topk-mean inside, topk-mean outside."""
    mask = masks.unsqueeze(2)  # (J, F, 1, N)
    fg_k = compute_topk_sizes(masks, fg_top_p)[0].unsqueeze(2)
    bg_k = compute_topk_sizes(masks, bg_top_p)[1].unsqueeze(2)
    fg = (1 - compute_topk_mean(attention * mask, fg_k)).sum(dim=2)
    bg = compute_topk_mean(attention * (1 - mask), bg_k).sum(dim=2)
    return fg, bg


def compute_ratio_energy(attention: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(J, F) ratio-based term: mean over heads of (1 - mass inside / (total mass + 0.01))^2."""
    inside = (attention * masks.unsqueeze(2)).sum(dim=-1)
    ratio = inside / (attention.sum(dim=-1) + 0.01)
    return ((1 - ratio) ** 2).mean(dim=2)


def _center_of_mass(maps: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) non-negative maps -> (row, column) centres of mass in map pixels, each (...)."""
    grid = maps.unflatten(-1, (height, width))
    rows = torch.arange(height, dtype=maps.dtype, device=maps.device)
    cols = torch.arange(width, dtype=maps.dtype, device=maps.device)
    total = grid.sum(dim=(-1, -2))
    total = torch.where(total > 0, total, torch.ones_like(total))  # empty masks: centre unused
    center_y = (grid.sum(dim=-1) * rows).sum(dim=-1) / total
    center_x = (grid.sum(dim=-2) * cols).sum(dim=-1) / total
    return center_y, center_x


def compute_com_energy(attention: torch.Tensor, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(J, F) centre-of-mass position + velocity terms, zero where the box is empty (spec 4.4)."""
    att_y, att_x = _center_of_mass(attention, height, width)    # (J, F, H)
    box_y, box_x = _center_of_mass(masks, height, width)        # (J, F)
    present = (masks.sum(dim=-1) > 0).to(attention.dtype)       # (J, F)
    position = (((att_y - box_y.unsqueeze(-1)) ** 2).mean(dim=-1)
                + ((att_x - box_x.unsqueeze(-1)) ** 2).mean(dim=-1))
    num_frames = attention.shape[1]
    following = torch.clamp(torch.arange(num_frames, device=attention.device) + 1, max=num_frames - 1)

    def motion_error(att: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        att_motion = att[:, following] - att
        box_motion = (box[:, following] - box).unsqueeze(-1)
        return ((att_motion - box_motion) ** 2).mean(dim=-1)

    velocity = (motion_error(att_y, box_y) + motion_error(att_x, box_x)) * present[:, following]
    return (position + velocity) * present


def compute_boxdiff_energy(attention: torch.Tensor, corners: torch.Tensor, height: int, width: int,
                           normed: bool) -> torch.Tensor:
    """(J, F) BoxDiff corner term with a band of one pixel around each box edge (spec 4.4)."""
    grid = attention.unflatten(-1, (height, width))       # (J, F, H, h, w)
    column_max = grid.amax(dim=-2)                        # (J, F, H, w)
    row_max = grid.amax(dim=-1)                           # (J, F, H, h)

    def edge_terms(profile: torch.Tensor, start: torch.Tensor, end: torch.Tensor, length: int) -> torch.Tensor:
        position = torch.arange(length, device=attention.device)
        start, end = start.unsqueeze(-1), end.unsqueeze(-1)                  # (J, F, 1)
        band = (((position - start).abs() <= 1) | ((position - end).abs() <= 1)).to(attention.dtype)
        inside = ((position >= start) & (position < end)).to(attention.dtype)
        error = (profile - inside.unsqueeze(2)).abs() * band.unsqueeze(2)    # (J, F, H, length)
        return error.flatten(2).mean(dim=-1) if normed else error.flatten(2).sum(dim=-1)

    return (edge_terms(column_max, corners[..., 0], corners[..., 2], width)
            + edge_terms(row_max, corners[..., 1], corners[..., 3], height))


def compute_sync_energy(attention: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(J, F) attention-sync term: sum over heads of the mean squared change to the next frame inside
    the next frame's box (the reference crops with frame f+1's box); zero at the last frame."""
    crop = masks[:, 1:].unsqueeze(2)                                     # (J, F-1, 1, N)
    change = (attention[:, :-1] - attention[:, 1:]) ** 2 * crop
    area = crop.sum(dim=-1).clamp(min=1)                                 # empty crops count as 0
    per_frame = (change.sum(dim=-1) / area).sum(dim=2)                   # (J, F-1)
    return torch.cat([per_frame, per_frame.new_zeros(per_frame.shape[0], 1)], dim=1)


def compute_com_term(attention: torch.Tensor, box_masks: BoxMasks, weights) -> torch.Tensor:
    return compute_com_energy(attention, box_masks.masks, box_masks.height, box_masks.width)


def compute_boxdiff_term(attention: torch.Tensor, box_masks: BoxMasks, weights) -> torch.Tensor:
    return compute_boxdiff_energy(attention, box_masks.corners, box_masks.height, box_masks.width,
                                  weights.boxdiff_normed)


def compute_sync_term(attention: torch.Tensor, box_masks: BoxMasks, weights) -> torch.Tensor:
    return compute_sync_energy(attention, box_masks.masks)


@dataclass(frozen=True)
class EnergyTerm:
    """An optional term of the energy: ``weight * compute(attention (J, F, H, N), box masks, weights) -> (J, F)``,
    added to the fg / bg (or ratio) terms. Its weight is the field ``name`` of `EnergyWeights` and of
    `generation.config.GuidanceConfig`; 0 leaves it out. generate.py's ``--<name>`` flag comes from here."""

    name: str
    compute: Callable[[torch.Tensor, BoxMasks, Any], torch.Tensor]
    help: str


# The optional terms, in the order they are added (spec 4.4). A new term is one function here and one weight
# field of GuidanceConfig (tests/test_controls.py builds one).
ENERGY_TERMS: tuple[EnergyTerm, ...] = (
    EnergyTerm("com_loss_scale", compute_com_term, "centre-of-mass term (0; the benchmark preset: 0.03)"),
    EnergyTerm("boxdiff_loss_scale", compute_boxdiff_term, "BoxDiff corner term (0)"),
    EnergyTerm("attn_sync_weight", compute_sync_term, "attention-sync term (0)"),
)


def compute_layer_energy(attention: torch.Tensor, box_masks: BoxMasks, token_weights: torch.Tensor, *,
                         fg_top_p: float, bg_top_p: float, fg_weight: float, bg_weight: float,
                         use_ratio_based_loss: bool = False, boxdiff_normed: bool = True,
                         terms: Sequence[EnergyTerm] = ENERGY_TERMS, **term_weights: float) -> torch.Tensor:
    """One layer's energy: sum over tokens (weighted 1/|T_o|) and frames of the per-(token, frame) terms.

    ``attention``: (F, H, N, J) recorded probabilities of the guided tokens (conditional batch);
    ``term_weights``: the weight of each of ``terms`` by name (missing: 0).
    """
    unknown = sorted(set(term_weights) - {term.name for term in terms})
    if unknown:
        raise TypeError(f"unknown energy terms {unknown}; the terms are {[term.name for term in terms]}")
    attention = attention.float().permute(3, 0, 1, 2)   # (J, F, H, N)
    masks = box_masks.masks
    if use_ratio_based_loss:
        energy = compute_ratio_energy(attention, masks)
    else:
        fg, bg = compute_fg_bg_energy(attention, masks, fg_top_p, bg_top_p)
        energy = fg_weight * fg + bg_weight * bg
    options = _TermOptions(boxdiff_normed)
    for term in terms:
        weight = term_weights.get(term.name, 0.0)
        if weight != 0:
            energy = energy + weight * term.compute(attention, box_masks, options)
    return (energy.sum(dim=1) * token_weights).sum()


@dataclass(frozen=True)
class _TermOptions:
    boxdiff_normed: bool


@dataclass(frozen=True)
class _BaseWeights:
    fg_top_p: float
    bg_top_p: float
    fg_weight: float
    bg_weight: float
    use_ratio_based_loss: bool = False
    boxdiff_normed: bool = True


# The numbers of :func:`compute_layer_energy` (spec 4.4), as one value (``GuidanceConfig.energy_weights``): the
# fg / bg numbers and one weight per term of ENERGY_TERMS (default 0).
EnergyWeights = dataclasses.make_dataclass(
    "EnergyWeights", [(term.name, float, dataclasses.field(default=0.0)) for term in ENERGY_TERMS],
    bases=(_BaseWeights,), frozen=True)
EnergyWeights.__module__ = __name__


def compute_guidance_energy(maps: dict[str, torch.Tensor], targets: GuidanceTargets, weights,
                            terms: Sequence[EnergyTerm] = ENERGY_TERMS) -> torch.Tensor:
    """Total energy L (spec 4.4): sum of layer energies / (number of objects * number of layers).

    ``maps``: layer path -> (F, H, N, J) probabilities, batch of one (the conditional branch); ``weights``: an
    `EnergyWeights` (or any object with its fields, e.g. a ``GuidanceConfig``).
    """
    term_weights = {term.name: getattr(weights, term.name, 0.0) for term in terms}
    total = None
    for attention in maps.values():
        layer = compute_layer_energy(
            attention, targets.masks_for(attention.shape[2]), targets.token_weights,
            fg_top_p=weights.fg_top_p, bg_top_p=weights.bg_top_p, fg_weight=weights.fg_weight,
            bg_weight=weights.bg_weight, use_ratio_based_loss=weights.use_ratio_based_loss,
            boxdiff_normed=weights.boxdiff_normed, terms=terms, **term_weights)
        total = layer if total is None else total + layer
    return total / (targets.num_objects * len(maps))
