"""Box energies (generation/energies.py) against the spec's formulas, on hand-made maps.

Spec: LVD-REFERENCE.md 4.1 (map sizes), 4.3 (masks), 4.4 (energy terms and aggregation), 14.4-14.5.
``spec_energy`` below is a deliberately literal, loop-by-loop reading of 4.3/4.4 (Python ``round``,
``torch.topk`` per head, per frame, per token) that the vectorised code must match; the
hand-computed cases pin the numbers themselves. Property checks use seeded random loops.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from generation.energies import (BoxMasks, EnergyWeights, compute_box_corners, compute_box_masks, compute_boxdiff_energy,
                                 compute_com_energy, compute_fg_bg_energy, compute_guidance_energy,
                                 compute_latent_map_sizes, compute_layer_energy, compute_ratio_energy,
                                 compute_sync_energy, compute_topk_sizes, prepare_guidance_targets)

DEFAULT_WEIGHTS = {"fg_top_p": 0.75, "bg_top_p": 0.75, "fg_weight": 1.0, "bg_weight": 4.0}
ALL_TERMS = {**DEFAULT_WEIGHTS, "com_loss_scale": 0.03, "boxdiff_loss_scale": 0.7, "attn_sync_weight": 0.3}
NUM_TOKENS = 77


# --------------------------------------------------------------------------------------------
# A literal reading of spec 4.3 / 4.4


def spec_mask(box_xyxy, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(h, w) float32 mask and clipped corners, with Python's round (half to even) as in spec 4.3."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    x_min, y_min = round(x0 * width), round(y0 * height)
    x_max, y_max = x_min + round((x1 - x0) * width), y_min + round((y1 - y0) * height)
    x_min, y_min, x_max, y_max = max(x_min, 0), max(y_min, 0), min(x_max, width), min(y_max, height)
    mask = torch.zeros(height, width)
    for y in range(height):
        for x in range(width):
            if y_min <= y < y_max and x_min <= x < x_max:
                mask[y, x] = 1.0
    return mask, (x_min, y_min, x_max, y_max)


def spec_center(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = grid.shape
    total = grid.sum()
    center_y = sum(y * grid[y, :].sum() for y in range(height)) / total
    center_x = sum(x * grid[:, x].sum() for x in range(width)) / total
    return center_y, center_x


def spec_token_frame_terms(attention, boxes, frame, token, height, width, *, fg_top_p, bg_top_p, fg_weight,
                           bg_weight, com_loss_scale=0.0, use_ratio_based_loss=False, boxdiff_loss_scale=0.0,
                           boxdiff_normed=True, attn_sync_weight=0.0):
    """The bracket of spec 4.4 for one (frame, token): ``attention`` (F, H, h*w, 77), ``boxes`` (F, 4)."""
    num_frames, num_heads = attention.shape[:2]
    mask, (x_min, y_min, x_max, y_max) = spec_mask(boxes[frame], height, width)
    flat_mask = mask.flatten()
    inside = flat_mask.sum()
    k_fg = max(1, int(inside * fg_top_p))              # float32 tensor times a float: float32 product
    k_bg = max(1, int((1 - flat_mask).sum() * bg_top_p))
    maps = [attention[frame, head, :, token].float() for head in range(num_heads)]
    total = torch.zeros(())
    if use_ratio_based_loss:
        total = total + sum((1 - (a * flat_mask).sum() / (a.sum() + 0.01)) ** 2 for a in maps) / num_heads
    else:
        e_fg = sum(1 - torch.topk(a * flat_mask, k_fg).values.mean() for a in maps)
        e_bg = sum(torch.topk(a * (1 - flat_mask), k_bg).values.mean() for a in maps)
        total = total + fg_weight * e_fg + bg_weight * e_bg
    if com_loss_scale > 0 and inside > 0:
        box_y, box_x = spec_center(mask)
        centers = [spec_center(a.reshape(height, width)) for a in maps]
        c_pos = (sum((cy - box_y) ** 2 for cy, _ in centers) / num_heads
                 + sum((cx - box_x) ** 2 for _, cx in centers) / num_heads)
        following = min(frame + 1, num_frames - 1)
        next_mask, _ = spec_mask(boxes[following], height, width)
        c_vel = torch.zeros(())
        if next_mask.sum() > 0:
            next_box_y, next_box_x = spec_center(next_mask)
            next_centers = [spec_center(attention[following, head, :, token].float().reshape(height, width))
                            for head in range(num_heads)]
            c_vel = (sum(((ny - cy) - (next_box_y - box_y)) ** 2 for (ny, _), (cy, _) in zip(next_centers, centers))
                     / num_heads
                     + sum(((nx - cx) - (next_box_x - box_x)) ** 2 for (_, nx), (_, cx) in zip(next_centers, centers))
                     / num_heads)
        total = total + com_loss_scale * (c_pos + c_vel)
    if boxdiff_loss_scale > 0:
        band_x = torch.zeros(width)
        for edge in (x_min, x_max):
            for x in range(max(edge - 1, 0), min(edge + 1, width - 1) + 1):
                band_x[x] = 1
        band_y = torch.zeros(height)
        for edge in (y_min, y_max):
            for y in range(max(edge - 1, 0), min(edge + 1, height - 1) + 1):
                band_y[y] = 1
        inside_x = torch.tensor([1.0 if x_min <= x < x_max else 0.0 for x in range(width)])
        inside_y = torch.tensor([1.0 if y_min <= y < y_max else 0.0 for y in range(height)])
        errors_x = torch.stack([(a.reshape(height, width).amax(0) - inside_x).abs() * band_x for a in maps])
        errors_y = torch.stack([(a.reshape(height, width).amax(1) - inside_y).abs() * band_y for a in maps])
        corner = errors_x.mean() + errors_y.mean() if boxdiff_normed else errors_x.sum() + errors_y.sum()
        total = total + boxdiff_loss_scale * corner
    if attn_sync_weight != 0 and frame < num_frames - 1:
        # [quirk] the crop is frame f+1's box
        next_mask, (cx0, cy0, cx1, cy1) = spec_mask(boxes[frame + 1], height, width)
        sync = 0.0
        # The reference's mean over an empty crop (next frame absent) is NaN; ours counts it as 0.
        for head in range(num_heads if next_mask.sum() > 0 else 0):
            now = attention[frame, head, :, token].float().reshape(height, width)[cy0:cy1, cx0:cx1]
            later = attention[frame + 1, head, :, token].float().reshape(height, width)[cy0:cy1, cx0:cx1]
            sync = sync + ((now - later) ** 2).mean()
        total = total + attn_sync_weight * sync
    return total


def spec_energy(layer_maps, boxes_xyxy, token_positions, latent_height, latent_width, **weights) -> torch.Tensor:
    """L of spec 4.4: ``layer_maps`` is a list of (F, H, h*w, 77) maps, ``boxes_xyxy`` (objects, F, 4)."""
    total = torch.zeros(())
    for attention in layer_maps:
        height, width = spec_map_size(attention.shape[2], latent_height, latent_width)
        layer = torch.zeros(())
        for obj, positions in enumerate(token_positions):
            per_object = torch.zeros(())
            for frame in range(attention.shape[0]):
                for token in positions:
                    per_object = per_object + spec_token_frame_terms(attention, boxes_xyxy[obj], frame, token,
                                                                     height, width, **weights)
            layer = layer + per_object / len(positions)
        total = total + layer
    return total / (len(token_positions) * len(layer_maps))


# --------------------------------------------------------------------------------------------
# Helpers


def random_attention(generator: torch.Generator, num_frames: int, num_heads: int, num_positions: int,
                     sharpness: float = 3.0) -> torch.Tensor:
    """(F, H, N, 77) softmax-over-tokens probabilities, like the recorded cross-attention."""
    logits = torch.randn(num_frames, num_heads, num_positions, NUM_TOKENS, generator=generator) * sharpness
    return logits.softmax(dim=-1)


def random_boxes(rng: np.random.Generator, num_objects: int, num_frames: int, absent_prob: float = 0.2) -> np.ndarray:
    corners = np.sort(rng.uniform(-0.1, 1.1, size=(num_objects, num_frames, 2, 2)), axis=2)  # (o, F, lo/hi, x/y)
    boxes = np.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], axis=-1)
    boxes[rng.uniform(size=(num_objects, num_frames)) < absent_prob] = 0.0
    return boxes


def random_token_positions(rng: np.random.Generator, num_objects: int) -> tuple[tuple[int, ...], ...]:
    starts = rng.choice(np.arange(1, 70, 4), size=num_objects, replace=False)
    return tuple(tuple(range(int(s), int(s) + int(rng.integers(1, 4)))) for s in starts)


def guided_maps(layer_maps, targets) -> dict[str, torch.Tensor]:
    """Full 77-token maps -> the object-token columns the recorder keeps, keyed like layer paths."""
    return {f"layer{i}": m.index_select(-1, targets.token_indices) for i, m in enumerate(layer_maps)}


def single_object_masks(box_xyxy, num_frames: int, height: int, width: int) -> BoxMasks:
    boxes = np.broadcast_to(np.asarray(box_xyxy, dtype=np.float64), (1, num_frames, 4)).copy()
    return compute_box_masks(boxes, height, width)


# --------------------------------------------------------------------------------------------
# Masks and map sizes (spec 4.1, 4.3)


def test_mask_rounds_origin_and_size_separately_half_to_even():
    # x0 * w = 2.5 -> column 2 (half to even), size (x1 - x0) * w = 2.5 -> 2, so x_max = 4, although
    # round(x1 * w) = round(5.0) would give 5.
    corners = compute_box_corners(np.array([0.3125, 0.4375, 0.625, 0.75]), height=8, width=8)
    assert corners.tolist() == [2, 4, 4, 6]  # y0 * h = 3.5 -> row 4 (half to even); size 2.5 -> 2
    masks = compute_box_masks(np.array([[[0.3125, 0.4375, 0.625, 0.75]]]), height=8, width=8)
    grid = masks.masks[0, 0].reshape(8, 8)
    expected = torch.zeros(8, 8)
    expected[4:6, 2:4] = 1
    assert torch.equal(grid, expected)
    assert masks.masks.dtype == torch.float32 and masks.corners[0, 0].tolist() == [2, 4, 4, 6]


def test_mask_clips_to_the_map_and_matches_python_round():
    corners = compute_box_corners(np.array([-0.25, -0.125, 0.5, 1.25]), height=8, width=8)
    assert corners.tolist() == [0, 0, 4, 8]
    rng = np.random.default_rng(0)
    # Boxes on a 1/16 grid hit exact .5 products often; every one must agree with Python's round.
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 12, size=2))
        box = np.sort(rng.integers(-4, 21, size=(2, 2)) / 16, axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        mask, spec_corners = spec_mask(box, height, width)
        result = compute_box_masks(box[None, None], height, width)
        assert torch.equal(result.masks[0, 0], mask.flatten()), (box, height, width)
        assert compute_box_corners(box, height, width).tolist() == list(spec_corners)


def test_absent_frames_give_all_zero_masks():
    boxes = np.array([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0]]])
    masks = compute_box_masks(boxes, height=4, width=6).masks
    assert masks.shape == (1, 2, 24)
    assert masks[0, 0].sum() > 0 and masks[0, 1].sum() == 0


def spec_map_size(num_positions: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """Spec 4.1: s = int(sqrt(base_h * base_w / N)), the map is (base_h // s, base_w // s)."""
    scale = int(math.sqrt(latent_height * latent_width / num_positions))
    return latent_height // scale, latent_width // scale


def test_map_size_recovery_and_the_latent_map_grids():
    assert spec_map_size(720, 40, 72) == (20, 36)   # Zeroscope 40x72 latents, the level-1 maps
    assert spec_map_size(180, 40, 72) == (10, 18)
    assert spec_map_size(256, 32, 32) == (16, 16)   # ModelScope-256
    assert spec_map_size(24, 8, 12) == (4, 6)
    # The UNet backbone prepares masks at every grid the spec's recovery can give.
    assert compute_latent_map_sizes(40, 72) == ((40, 72), (20, 36), (10, 18), (5, 9))
    assert all(spec_map_size(h * w, 40, 72) == (h, w) for h, w in compute_latent_map_sizes(40, 72))


def test_targets_weights_and_mask_sizes():
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5]] * 2, [[0.5, 0.5, 1.0, 1.0]] * 2])
    targets = prepare_guidance_targets(boxes, ((3, 4, 5), (9,)), compute_latent_map_sizes(8, 12))
    assert targets.token_indices.tolist() == [3, 4, 5, 9]
    assert torch.allclose(targets.token_weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert targets.num_objects == 2
    assert {n: (m.height, m.width) for n, m in targets.masks_by_size.items()} == {
        96: (8, 12), 24: (4, 6), 6: (2, 3), 1: (1, 1)}
    assert targets.masks_for(24).masks.shape == (4, 2, 24)
    with pytest.raises(ValueError, match="no box masks for an attention map of 7 positions"):
        targets.masks_for(7)


# --------------------------------------------------------------------------------------------
# Hand-computed terms on 4x4 maps, 2 heads, 2 frames


def hand_made_attention() -> torch.Tensor:
    """(F=2, H=2, 16, J=1): head 0 holds 0.4, 0.3, 0.2, 0.1 in the top-left 2x2 block; head 1 is uniform."""
    head0 = torch.zeros(4, 4)
    head0[0, 0], head0[0, 1], head0[1, 0], head0[1, 1] = 0.4, 0.3, 0.2, 0.1
    head1 = torch.full((4, 4), 1 / 16)
    frame = torch.stack([head0.flatten(), head1.flatten()])  # (H, 16)
    return torch.stack([frame, frame])[..., None]           # (F, H, 16, 1)


def test_topk_size_rule_is_a_truncated_float32_product_at_least_one():
    masks = torch.zeros(1, 4, 100)
    masks[0, 0, :4] = 1      # area 4: k_fg = trunc(0.75 * 4) = 3, k_bg = trunc(0.75 * 96) = 72
    masks[0, 1, :1] = 1      # area 1: k_fg = max(1, 0) = 1
    masks[0, 3] = 1          # area 100: float32(0.29) * 100 = 29.0 in float32, but 28.999... in float64
    fg, bg = compute_topk_sizes(masks, 0.75)
    assert fg[0, :3].tolist() == [3, 1, 1] and bg[0, :3].tolist() == [72, 74, 75]
    assert bg[0, 3].item() == 1                  # nothing outside: max(1, 0)
    assert compute_topk_sizes(masks, 0.29)[0][0, 3].item() == 29


def test_fg_bg_terms_hand_computed():
    attention = hand_made_attention().permute(3, 0, 1, 2)                 # (J, F, H, N)
    masks = single_object_masks([0.0, 0.0, 0.5, 0.5], 2, 4, 4).masks.clone()
    masks[0, 1] = 0                                                        # frame 1: object absent
    fg, bg = compute_fg_bg_energy(attention, masks, fg_top_p=0.75, bg_top_p=0.75)
    # Frame 0: M = 4, k_fg = 3, k_bg = 9. Head 0: 1 - (0.4 + 0.3 + 0.2) / 3 = 0.7, nothing outside.
    # Head 1: 1 - 1/16 inside, 1/16 outside. Frame 1 (empty box): E_fg = 2 heads, k_bg = 12:
    # head 0 gives (0.4 + 0.3 + 0.2 + 0.1) / 12, head 1 gives 1/16.
    assert torch.allclose(fg, torch.tensor([[0.7 + 0.9375, 2.0]]), atol=1e-6)
    assert torch.allclose(bg, torch.tensor([[0.0625, 1 / 12 + 1 / 16]]), atol=1e-6)
    box_masks = BoxMasks(4, 4, masks, torch.zeros(1, 2, 4, dtype=torch.int64))
    energy = compute_layer_energy(hand_made_attention(), box_masks, torch.ones(1), **DEFAULT_WEIGHTS)
    # Sum over frames: (1.6375 + 4 * 0.0625) + (2 + 4 * (1/12 + 1/16)).
    assert energy.item() == pytest.approx(1.8875 + 2 + 4 * (1 / 12 + 1 / 16), abs=1e-5)


def test_center_of_mass_position_and_velocity_hand_computed():
    # Frame 0 box: top-left 2x2 (centre (0.5, 0.5)); frame 1 box: top-right 2x2 (centre (0.5, 2.5)).
    boxes = np.array([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5]]])
    masks = compute_box_masks(boxes, 4, 4).masks
    attention = torch.zeros(1, 2, 2, 4, 4)                 # (J, F, H, h, w)
    attention[0, 0, 0, 3, 1] = 1.0                          # head 0, frame 0: all mass at (y=3, x=1)
    attention[0, 1, 0, 0, 3] = 1.0                          # head 0, frame 1: all mass at (y=0, x=3)
    attention[0, :, 1] = 1 / 16                             # head 1: uniform, centre (1.5, 1.5)
    com = compute_com_energy(attention.flatten(-2), masks, 4, 4)
    # Frame 0 position: head 0 (3-0.5)^2 + (1-0.5)^2 = 6.5, head 1 1 + 1 = 2 -> mean 4.25.
    # Frame 0 velocity: head 0 attention moves (-3, +2), the box (0, +2) -> 9; head 1 (0, 0) -> 4 -> 6.5.
    # Frame 1 (last): position head 0 0.25 + 0.25, head 1 1 + 1 -> 1.25; velocity exactly 0.
    assert torch.allclose(com, torch.tensor([[4.25 + 6.5, 1.25]]), atol=1e-6)
    # The velocity needs the next frame's box: with frame 1 absent, frame 0 keeps only its position
    # term and frame 1 contributes nothing.
    absent_next = masks.clone()
    absent_next[0, 1] = 0
    com = compute_com_energy(attention.flatten(-2), absent_next, 4, 4)
    assert torch.allclose(com, torch.tensor([[4.25, 0.0]]), atol=1e-6)


def test_ratio_based_loss_hand_computed():
    attention = hand_made_attention()
    box_masks = single_object_masks([0.0, 0.0, 0.5, 0.5], 2, 4, 4)
    ratio = compute_ratio_energy(attention.permute(3, 0, 1, 2), box_masks.masks)
    # Head 0 has all its mass (1.0) inside, head 1 a quarter of it; the mean over heads of (1 - r)^2.
    per_frame = ((1 - 1.0 / 1.01) ** 2 + (1 - 0.25 / 1.01) ** 2) / 2
    assert torch.allclose(ratio, torch.full((1, 2), per_frame), atol=1e-6)
    energy = compute_layer_energy(attention, box_masks, torch.ones(1), **DEFAULT_WEIGHTS, use_ratio_based_loss=True)
    assert energy.item() == pytest.approx(2 * per_frame, abs=1e-6)  # replaces fg/bg, weights unused


def test_boxdiff_corner_term_hand_computed():
    # 4 x 8 map, box columns [2, 5) and rows [1, 3); all mass of the one head at (y=0, x=7).
    box_masks = single_object_masks([0.25, 0.25, 0.625, 0.75], 1, 4, 8)
    assert box_masks.corners[0, 0].tolist() == [2, 1, 5, 3]
    attention = torch.zeros(1, 1, 1, 4, 8)
    attention[..., 0, 7] = 1.0
    # Columns: the band is 1..6 (edges 2 and 5, +-1); column max is 1 at x=7 only, the box profile is
    # 1 on 2..4 -> |diff| * band = 1 at x = 2, 3, 4 -> sum 3, mean 3/8.
    # Rows: band 0..3 (edges 1 and 3); row max is 1 at y=0, box profile 1 on 1..2 -> 1 at y = 0, 1, 2
    # -> sum 3, mean 3/4.
    normed = compute_boxdiff_energy(attention.flatten(-2), box_masks.corners, 4, 8, normed=True)
    summed = compute_boxdiff_energy(attention.flatten(-2), box_masks.corners, 4, 8, normed=False)
    assert normed.item() == pytest.approx(3 / 8 + 3 / 4)
    assert summed.item() == pytest.approx(6.0)
    # Two heads, the second one empty (zero profile -> error 1 wherever the box is 1 in the band):
    # means over heads x length; sums over both.
    two_heads = torch.cat([attention, torch.zeros_like(attention)], dim=2)
    normed = compute_boxdiff_energy(two_heads.flatten(-2), box_masks.corners, 4, 8, normed=True)
    summed = compute_boxdiff_energy(two_heads.flatten(-2), box_masks.corners, 4, 8, normed=False)
    assert normed.item() == pytest.approx((3 + 3) / 16 + (3 + 2) / 8)
    assert summed.item() == pytest.approx(6 + 3 + 2)


def test_attention_sync_crops_with_the_next_frames_box():
    # Frame 0's box is the left half, frames 1 and 2 the right half.
    boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0]]])
    masks = compute_box_masks(boxes, 4, 4).masks
    base = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    frames = [base.clone(), base.clone(), base.clone()]
    frames[1][0, 0] += 0.5          # frame 0 -> 1 changes only in the left half (frame 0's own box)
    frames[2] = frames[1].clone()
    frames[2][3, 3] += 0.2          # frame 1 -> 2 changes inside the right half
    attention = torch.stack(frames).flatten(-2)[None, :, None]  # (J=1, F=3, H=1, 16)
    sync = compute_sync_energy(attention, masks)
    # Frame 0 is cropped with frame 1's (right-half) box, where nothing changed: 0, not 0.25 / 8.
    assert torch.allclose(sync, torch.tensor([[0.0, 0.2 ** 2 / 8, 0.0]]), atol=1e-6)
    # An absent next frame leaves an empty crop: the term is 0 there (the reference's mean of an empty
    # crop would be NaN).
    absent_next = masks.clone()
    absent_next[0, 2] = 0
    sync = compute_sync_energy(attention, absent_next)
    assert torch.allclose(sync, torch.tensor([[0.0, 0.0, 0.0]]), atol=1e-6)


def test_aggregation_sums_frames_and_heads_and_averages_tokens_objects_layers():
    """Two objects (two tokens and one), two layers at different sizes, all terms on."""
    generator = torch.Generator().manual_seed(1)
    latent_height, latent_width = 8, 12
    boxes = np.array([[[0.1, 0.2, 0.6, 0.9], [0.2, 0.2, 0.7, 0.9], [0.0, 0.0, 0.0, 0.0]],
                      [[0.5, 0.0, 1.0, 0.5], [0.45, 0.1, 0.95, 0.6], [0.4, 0.2, 0.9, 0.7]]])
    positions = ((2, 3), (6,))
    layer_maps = [random_attention(generator, 3, 2, 24), random_attention(generator, 3, 3, 96)]
    targets = prepare_guidance_targets(boxes, positions, compute_latent_map_sizes(latent_height, latent_width))
    for weights in (DEFAULT_WEIGHTS, ALL_TERMS, {**ALL_TERMS, "boxdiff_normed": False},
                    {**ALL_TERMS, "use_ratio_based_loss": True}):
        expected = spec_energy(layer_maps, boxes, positions, latent_height, latent_width, **weights)
        energy = compute_guidance_energy(guided_maps(layer_maps, targets), targets, EnergyWeights(**weights))
        assert energy.item() == pytest.approx(expected.item(), rel=1e-5), weights
    # The frame sum and the token mean, by hand on the fg/bg terms of one layer: object 0's two
    # tokens are averaged, object 1's single token is not, and the layer energy is their sum.
    maps = guided_maps(layer_maps[:1], targets)["layer0"]
    box_masks = targets.masks_for(24)
    per_token = [compute_layer_energy(maps[..., j:j + 1], BoxMasks(4, 6, box_masks.masks[j:j + 1],
                                                                 box_masks.corners[j:j + 1]),
                                      torch.ones(1), **DEFAULT_WEIGHTS) for j in range(3)]
    layer = compute_layer_energy(maps, box_masks, targets.token_weights, **DEFAULT_WEIGHTS)
    assert layer.item() == pytest.approx(((per_token[0] + per_token[1]) / 2 + per_token[2]).item(), rel=1e-6)
    total = compute_guidance_energy({"a": maps, "b": maps}, targets, EnergyWeights(**DEFAULT_WEIGHTS))
    assert total.item() == pytest.approx(layer.item() / 2, rel=1e-6)  # (2 layers x 2 objects) / 2 layers


def test_half_precision_attention_is_promoted_to_float32():
    generator = torch.Generator().manual_seed(2)
    boxes = np.array([[[0.1, 0.2, 0.6, 0.9]] * 2])
    targets = prepare_guidance_targets(boxes, ((4,),), compute_latent_map_sizes(4, 4))
    attention = random_attention(generator, 2, 2, 16).half()
    energy = compute_guidance_energy(guided_maps([attention], targets), targets, EnergyWeights(**ALL_TERMS))
    expected = spec_energy([attention], boxes, ((4,),), 4, 4, **ALL_TERMS)
    assert energy.dtype == torch.float32
    assert energy.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Properties (seeded random loops)


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    num_frames, num_heads, num_objects = (int(v) for v in rng.integers(1, 4, size=3))
    latent_height, latent_width = (int(v) for v in rng.integers(2, 7, size=2) * 2)
    boxes = random_boxes(rng, num_objects, num_frames)
    positions = random_token_positions(rng, num_objects)
    layer_maps = [random_attention(generator, num_frames, num_heads, latent_height * latent_width // f ** 2,
                                   sharpness=float(rng.uniform(0.5, 6)))
                  for f in (1, 2)]
    return boxes, positions, layer_maps, latent_height, latent_width


@pytest.mark.parametrize("weights", [DEFAULT_WEIGHTS, ALL_TERMS, {**ALL_TERMS, "use_ratio_based_loss": True}],
                         ids=["default", "all-terms", "ratio"])
def test_energy_is_finite_non_negative_with_finite_gradients(weights):
    for seed in range(15):
        boxes, positions, layer_maps, latent_height, latent_width = random_case(seed)
        targets = prepare_guidance_targets(boxes, positions, compute_latent_map_sizes(latent_height, latent_width))
        logits = [m.log().requires_grad_(True) for m in layer_maps]
        maps = guided_maps([l.softmax(dim=-1) for l in logits], targets)
        energy = compute_guidance_energy(maps, targets, EnergyWeights(**weights))
        assert energy.ndim == 0 and torch.isfinite(energy) and energy.item() >= 0, seed
        gradients = torch.autograd.grad(energy, logits)
        assert all(torch.isfinite(g).all() for g in gradients), seed
        assert any(g.abs().sum() > 0 for g in gradients), seed


def test_energy_falls_as_attention_mass_moves_into_the_box():
    height = width = 8
    box = [0.25, 0.125, 0.75, 0.625]
    for weights in (DEFAULT_WEIGHTS, {**DEFAULT_WEIGHTS, "com_loss_scale": 0.03},
                    {**DEFAULT_WEIGHTS, "use_ratio_based_loss": True}):
        box_masks = single_object_masks(box, 2, height, width)
        mask = box_masks.masks[0, 0]
        inside, outside = mask / mask.sum(), (1 - mask) / (1 - mask).sum()
        energies = []
        for alpha in np.linspace(0, 1, 11):
            attention = (alpha * inside + (1 - alpha) * outside).expand(2, 3, -1)[..., None]  # (F, H, N, 1)
            energies.append(compute_layer_energy(attention, box_masks, torch.ones(1), **weights).item())
        assert all(b < a for a, b in zip(energies, energies[1:])), (weights, energies)


def test_moving_outside_mass_into_the_box_lowers_the_energy():
    """Any map beats itself with its outside mass moved inside (in proportion to the inside values)."""
    generator = torch.Generator().manual_seed(3)
    box_masks = single_object_masks([0.25, 0.25, 0.75, 0.75], 2, 8, 8)
    mask = box_masks.masks[0, 0]
    for _ in range(50):
        attention = torch.rand(2, 2, 64, 1, generator=generator) ** 3
        attention = attention / attention.sum(dim=2, keepdim=True)
        inside = attention * mask[:, None]
        moved = inside / inside.sum(dim=2, keepdim=True)          # same total mass, all of it inside
        for weights in (DEFAULT_WEIGHTS, {**DEFAULT_WEIGHTS, "use_ratio_based_loss": True}):
            before = compute_layer_energy(attention, box_masks, torch.ones(1), **weights)
            after = compute_layer_energy(moved, box_masks, torch.ones(1), **weights)
            assert after < before


def test_energy_does_not_depend_on_object_order():
    for seed in range(15):
        boxes, positions, layer_maps, latent_height, latent_width = random_case(100 + seed)
        order = np.random.default_rng(seed).permutation(len(positions))
        targets = prepare_guidance_targets(boxes, positions, compute_latent_map_sizes(latent_height, latent_width))
        permuted = prepare_guidance_targets(boxes[order], tuple(positions[i] for i in order),
                                            compute_latent_map_sizes(latent_height, latent_width))
        energy = compute_guidance_energy(guided_maps(layer_maps, targets), targets, EnergyWeights(**ALL_TERMS))
        energy_permuted = compute_guidance_energy(guided_maps(layer_maps, permuted), permuted, EnergyWeights(**ALL_TERMS))
        assert energy_permuted.item() == pytest.approx(energy.item(), rel=1e-5), seed


def test_empty_box_leaves_only_the_background_term():
    generator = torch.Generator().manual_seed(4)
    num_frames, num_heads = 3, 2
    box_masks = single_object_masks([0.0, 0.0, 0.0, 0.0], num_frames, 4, 4)
    assert box_masks.masks.sum() == 0
    logits = torch.randn(num_frames, num_heads, 16, 1, generator=generator, requires_grad=True)
    attention = logits.softmax(dim=2)
    fg, bg = compute_fg_bg_energy(attention.permute(3, 0, 1, 2), box_masks.masks, 0.75, 0.75)
    assert torch.equal(fg, torch.full((1, num_frames), float(num_heads)))  # E_fg = number of heads
    (fg_gradient,) = torch.autograd.grad(fg.sum(), logits, retain_graph=True)
    assert torch.count_nonzero(fg_gradient) == 0                               # no gradient through E_fg
    energy = compute_layer_energy(attention, box_masks, torch.ones(1), **DEFAULT_WEIGHTS,
                                  com_loss_scale=0.03)                       # CoM is skipped for empty boxes
    assert energy.item() == pytest.approx(num_frames * num_heads + 4.0 * bg.sum().item(), rel=1e-6)
    (gradient,) = torch.autograd.grad(energy, logits, retain_graph=True)
    (bg_gradient,) = torch.autograd.grad(4.0 * bg.sum(), logits)
    assert torch.allclose(gradient, bg_gradient, atol=1e-7) and gradient.abs().sum() > 0
    # E_bg with every position outside the box: top-12 mean of the map, which only falls as the
    # token's attention falls everywhere.
    expected_bg = attention.detach().topk(12, dim=2).values.mean(dim=2).sum(dim=1)[:, 0]
    assert torch.allclose(bg[0], expected_bg, atol=1e-6)


def test_no_energy_term_breaks_on_degenerate_maps():
    """One-pixel maps and boxes covering the whole map stay finite (top-k sizes clamp to 1)."""
    for height, width, box in ((1, 1, [0.0, 0.0, 1.0, 1.0]), (2, 3, [0.0, 0.0, 1.0, 1.0]),
                               (2, 3, [0.9, 0.9, 1.0, 1.0])):
        box_masks = single_object_masks(box, 2, height, width)
        attention = torch.full((2, 2, height * width, 1), 1.0 / (height * width))
        energy = compute_layer_energy(attention, box_masks, torch.ones(1), **ALL_TERMS)
        assert math.isfinite(energy.item()) and energy.item() >= 0
