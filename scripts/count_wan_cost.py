"""FLOPs and saved-activation bytes of one LVD guided iteration against one CFG step on full-size Wan 2.1,
counted on the meta device (no weights, no GPU, seconds).

For each size (default 480x832x81 and 320x576x33, bf16) it counts:
  CFG step         two transformer passes (prompt, negative prompt) without gradients;
  guided variants  one guided iteration: the conditional pass with the recorder on, the energy, and its gradient
                   with respect to the latents, with and without the early stop (the pass ends at the last guided
                   cross-attention) and with and without gradient checkpointing (--low-memory).
FLOPs are those of `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and attention; no
elementwise work), backward and recomputation included. Attention is counted as the fused flash kernel a GPU
runs (the meta device would otherwise take the explicit N x N path). Saved-activation bytes are the distinct
storages autograd keeps for the backward pass at the end of the forward (weights excluded), plus, with
checkpointing, the block inputs the checkpoints keep.

    python scripts/count_wan_cost.py --json-out docs/bench/wan_cost_meta.json
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

SIZES = ("480x832x81", "320x576x33")
VARIANTS = (
    # (name, stop after the last guided layer, gradient checkpointing)
    ("full pass", False, False),
    ("stop at the last guided layer (default)", True, False),
    ("full pass + checkpointing", False, True),
    ("stop after the last guided block + checkpointing (--low-memory)", True, True),
)
# The bench layout (scripts/bench_guidance.py): two objects.
BENCH_PROMPT = "A realistic lively video of a scene with a brown dog chasing a red ball"


class FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the fused flash kernel (what a GPU runs for Wan's bf16 attention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args))
            kwargs = {**named, **kwargs}
            query, key, value = kwargs["query"], kwargs["key"], kwargs["value"]
            if kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) or kwargs.get("enable_gqa"):
                raise ValueError("only unmasked attention without dropout is counted as flash attention")
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, bool(kwargs.get("is_causal", False)), False, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


class SavedTensors:
    """Distinct storages saved for the backward pass (weights excluded), and checkpointed block inputs."""

    def __init__(self, parameters):
        self.parameter_storages = {p.untyped_storage()._cdata for p in parameters}
        self.storages: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameter_storages:
            self.storages[storage._cdata] = storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())


def parse_size(text: str) -> tuple[int, int, int]:
    height, width, frames = (int(part) for part in text.lower().split("x"))
    return height, width, frames


def count_case(backbone, size: tuple[int, int, int], guided_layers, variant=None) -> dict:
    """FLOPs and saved bytes of a CFG step (``variant`` None) or one guided iteration."""
    from generation.backbones.base import TextConditioning
    from generation.config import GuidanceConfig
    from generation.energies import EnergyWeights, prepare_guidance_targets
    from generation.guidance import GuidanceSchedule
    from generation.lvd import GuidedVideo, make_layout_energy_fn
    from models.attention import AttentionRecorder
    from utils.layout import Box, ObjectTrack, SceneLayout

    height, width, num_frames = size
    device = backbone.device
    latents = torch.empty(1, 16, backbone.guided_num_frames(num_frames), height // 8, width // 8, device=device)
    text = torch.empty(1, 512, backbone.transformer.config.text_dim, device=device, dtype=backbone.dtype)
    timestep = torch.tensor(900, device=device)
    flops = FlopCounterMode(display=False)
    if variant is None:
        with flops, FlashAttention(), torch.no_grad():
            backbone.predict(None, latents, timestep, TextConditioning(cond=text, uncond=text), 5.0)
        return {"tflops": flops.get_total_flops() / 1e12, "saved_gib": 0.0}
    _, stop, checkpointing = variant
    tracks = (ObjectTrack(0, "brown dog", tuple(Box(0.05 + 0.1 * i, 0.5, 0.35 + 0.1 * i, 0.75) for i in range(6))),
              ObjectTrack(1, "red ball", tuple(Box(0.4 + 0.1 * i, 0.6, 0.5 + 0.1 * i, 0.7) for i in range(6))))
    condition = backbone.build_condition(SceneLayout(BENCH_PROMPT, "park", tracks), num_frames)
    targets = prepare_guidance_targets(condition.boxes_at(backbone.guided_num_frames(num_frames)),
                                       condition.token_positions, backbone.attention_map_sizes(height, width), device)
    token_indices = [i for span in condition.token_positions for i in span]   # targets' order (no data on meta)
    recorded = sorted(set(token_indices))
    columns = torch.tensor([recorded.index(i) for i in token_indices], device=device)
    recorder = AttentionRecorder(guided_layers, token_indices=torch.tensor(recorded, device=device),
                                 stop_when_complete=stop)
    saved = SavedTensors(backbone.transformer.parameters())
    handles = []
    if checkpointing:  # what the checkpoints keep: each block's inputs
        def keep_inputs(module, args, kwargs):
            for value in (*args, *kwargs.values()):
                for tensor in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(tensor, torch.Tensor):
                        saved.add(tensor)
        handles = [block.register_forward_pre_hook(keep_inputs, with_kwargs=True)
                   for block in backbone.transformer.blocks]
    weights = EnergyWeights(fg_top_p=0.75, bg_top_p=0.75, fg_weight=1.0, bg_weight=4.0)
    leaf = latents.requires_grad_(True)
    try:
        with backbone.recording(recorder) as recording, flops, FlashAttention(), torch.enable_grad():
            recording.state.recompute_context = FlashAttention  # modes are off in the backward pass
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
                # The production energy; the video's state is built by hand (meta tensors have no values).
                video = GuidedVideo(schedule=GuidanceSchedule(GuidanceConfig()), targets=targets, columns=columns)
                energy_fn = make_layout_energy_fn(backbone, recorder, text, timestep, [video], weights,
                                                  backbone.guided_num_frames(num_frames), low_memory=checkpointing)
                energy = energy_fn(leaf, [0])[0]
            torch.autograd.grad(energy, leaf)
    finally:
        for handle in handles:
            handle.remove()
    return {"tflops": flops.get_total_flops() / 1e12, "saved_gib": saved.total_bytes / 2 ** 30}


def run(sizes, model_size: str = "1.3b", guided_blocks=None) -> dict:
    from generation.backbones.wan import WanBackbone
    from models.registry import (WAN_GUIDED_BLOCKS_1_3B, WAN_NUM_LAYERS_14B, scale_guided_blocks,
                                 wan_guided_layers)
    from models.wan import build_random_wan_model

    model = build_random_wan_model("meta", "bf16", size=model_size, with_vae=False)
    backbone = WanBackbone(model)
    if guided_blocks is None:
        guided_blocks = (WAN_GUIDED_BLOCKS_1_3B if model_size == "1.3b"
                         else scale_guided_blocks(WAN_GUIDED_BLOCKS_1_3B, WAN_NUM_LAYERS_14B))
    layers = wan_guided_layers(guided_blocks)
    report = {"model": f"Wan 2.1 T2V {model_size}", "dtype": "bfloat16", "guided_blocks": list(guided_blocks),
              "sizes": {}}
    for size_text in sizes:
        size = parse_size(size_text)
        cfg = count_case(backbone, size, layers)
        rows = [{"case": "CFG step (2 passes, no gradient)", **cfg, "x_cfg_step": 1.0}]
        for variant in VARIANTS:
            row = count_case(backbone, size, layers, variant)
            rows.append({"case": f"guided iteration: {variant[0]}", **row, "x_cfg_step": row["tflops"] / cfg["tflops"]})
        height, width, frames = size
        report["sizes"][size_text] = {"latents": [1, 16, backbone.guided_num_frames(frames), height // 8, width // 8],
                                      "video_tokens": backbone.guided_num_frames(frames) * (height // 16) * (width // 16),
                                      "rows": rows}
    return report


def format_table(report: dict) -> str:
    lines = []
    for size, entry in report["sizes"].items():
        lines += [f"\n{report['model']}, {size} (latents {tuple(entry['latents'])}, {entry['video_tokens']} video "
                  "tokens), bf16:", "",
                  "| case | TFLOPs | x CFG step | saved activations GiB |", "|---|---:|---:|---:|"]
        lines += [f"| {row['case']} | {row['tflops']:.1f} | {row['x_cfg_step']:.2f} | {row['saved_gib']:.2f} |"
                  for row in entry["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="HxWxF")
    parser.add_argument("--model-size", choices=("1.3b", "14b"), default="1.3b")
    parser.add_argument("--guided-blocks", type=int, nargs="+", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    report = run(args.sizes, args.model_size, args.guided_blocks)
    print(format_table(report))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/count_wan_cost.py"]
                                                              + (argv if argv is not None else sys.argv[1:])),
                                          **report})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
