"""Rank cross-attention layers and heads by how well each object token's attention agrees with its layout box,
on unguided samples: the calibration tool for ``--guided-blocks`` and ``--loss_scale`` on real weights.

For each prompt of a layout cache (or the built-in two-object layout), the run samples without guidance and, at
the ``--probe-steps``, records every recordable cross-attention layer (Wan: ``blocks.<i>.attn2`` of every block;
UNet3D: the spatial ``attn2`` layers) for the object tokens of the conditional branch. Per layer, head, token and
frame where the object's box is present, it scores

    IoU(top region, box): the top-k attention positions (k = the box's area in map cells, or ``--top-q`` of the map)
                          against the box cells (1: the head attends exactly to the box);
    mass inside:          the share of the token's attention mass (over the map) that falls inside the box,

and averages them over frames, tokens, objects, probe steps and prompts. It prints the layers ranked by mean IoU,
the best heads, a suggested ``--guided-blocks`` (the ``--num-suggested`` best layers, in depth order) and, for
those layers, the energy at the first step and the ``loss_scale`` that would make the first guided update move
the latents by ``--target-update-rms`` (RMS, latent units): a starting point, to be checked by looking at videos.

    python scripts/probe_attention.py --run-model lvd_wan2.1-1.3b --prompt-type lvd --model gpt-4-1106-preview \\
        --template_version v0.1 --num-prompts 20 --json-out outputs/probe_wan_1.3b.json
    python scripts/probe_attention.py --run-model lvd_wan_tiny        # tiny random weights: meaningless numbers
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict

import torch

DEFAULT_PROBE_STEPS = (0, 5, 10, 20)


def compute_box_agreement(attention: torch.Tensor, masks: torch.Tensor, top_q: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (frame, head): IoU of the top attention region with the box, and the attention mass inside the box.

    ``attention``: (F, H, N) one token's probabilities over the map; ``masks``: (F, N) its box, 0/1.
    Returns (iou (F, H), mass inside (F, H), present (F,) bool: frames where the box is not empty).
    """
    area = masks.sum(dim=-1)                                                   # (F,)
    size = area if top_q is None else torch.full_like(area, math.ceil(top_q * masks.shape[-1]))
    ranks = attention.argsort(dim=-1, descending=True).argsort(dim=-1)         # (F, H, N): 0 = largest
    region = ranks < size.view(-1, 1, 1)
    box = masks.bool().unsqueeze(1)                                            # (F, 1, N)
    inter = (region & box).sum(dim=-1).float()
    union = (region | box).sum(dim=-1).float().clamp(min=1)
    total = attention.sum(dim=-1).clamp(min=1e-12)
    inside = (attention * masks.unsqueeze(1)).sum(dim=-1) / total
    return inter / union, inside, area > 0


def recordable_layers(backbone) -> list[str]:
    """Every cross-attention module the backbone can record, in depth order."""
    from generation.backbones.wan import WanBackbone
    from models.attention import check_guided_layers
    from models.wan_attention import guided_module_choices

    if isinstance(backbone, WanBackbone):
        return guided_module_choices(backbone.transformer)
    unet = backbone.model.unet
    names = [name.removesuffix(".processor") for name in unet.attn_processors]
    layers = []
    for name in names:
        try:
            check_guided_layers(unet, [name])
        except ValueError:
            continue
        layers.append(name)
    return layers


class AttentionProbe:
    """A ``before_step`` hook that records every layer at the probe steps and accumulates the scores (the latents
    are returned unchanged: the sample is unguided)."""

    def __init__(self, backbone, recorder, cond, targets, num_map_frames: int, probe_steps, top_q):
        self.backbone, self.recorder, self.cond = backbone, recorder, cond
        self.targets, self.num_map_frames = targets, num_map_frames
        self.probe_steps, self.top_q = set(probe_steps), top_q
        self.scores = defaultdict(lambda: {"iou": [], "inside": []})   # (layer, head) -> values
        self._recording = None

    def __enter__(self):
        self._recording = self.backbone.recording(self.recorder)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc_info):
        self._recording.__exit__(*exc_info)

    def before_step(self, step, latents):
        if step.index not in self.probe_steps:
            return latents
        with torch.no_grad():
            maps = self.backbone.recorded_forward(latents, step.timestep, self.cond, self.recorder)
        for layer, layer_maps in maps.items():         # (F, heads, h*w, J): batch of one
            masks = self.targets.masks_for(layer_maps.shape[2]).masks       # (J, F, h*w)
            for token in range(layer_maps.shape[-1]):
                iou, inside, present = compute_box_agreement(layer_maps[..., token].float(), masks[token], self.top_q)
                if not bool(present.any()):
                    continue
                for head in range(layer_maps.shape[1]):
                    self.scores[(layer, head)]["iou"].append(float(iou[present, head].mean()))
                    self.scores[(layer, head)]["inside"].append(float(inside[present, head].mean()))
        return latents


def probe_prompt(model, condition, sampling, layers, probe_steps, top_q, seed: int):
    """The scores of one prompt's unguided sample: {(layer, head): {"iou": [...], "inside": [...]}}."""
    from generation.backbones import backbone_for
    from generation.energies import prepare_guidance_targets
    from generation.loop import denoise
    from models.attention import AttentionRecorder

    backbone = backbone_for(model)
    text = backbone.encode_text([condition.prompt], sampling.negative_prompt)
    num_map_frames = backbone.guided_num_frames(sampling.num_frames)
    targets = prepare_guidance_targets(condition.boxes_at(num_map_frames), condition.token_positions,
                                       backbone.attention_map_sizes(sampling.height, sampling.width), backbone.device)
    recorder = AttentionRecorder(layers, token_indices=targets.token_indices, stop_when_complete=False)
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(sampling.num_inference_steps, device=backbone.device)
    latents = backbone.prepare_latents(seed, sampling.num_frames, sampling.height, sampling.width,
                                       sampling.initial_noise) * scheduler.init_noise_sigma
    last = max(step for step in probe_steps if step < sampling.num_inference_steps)
    probe = AttentionProbe(backbone, recorder, text.cond, targets, num_map_frames, probe_steps, top_q)
    with probe:
        denoise(backbone, latents, scheduler, scheduler.timesteps[:last + 1], text, sampling.guidance_scale,
                controls=[probe])
    return probe.scores


def first_step_energy(model, condition, sampling, layers, seed: int) -> dict:
    """Energy of ``layers`` on the initial noise at the first step, and its gradient's RMS and step size."""
    from generation.backbones import backbone_for
    from generation.config import ExecutionConfig, GuidanceConfig
    from generation.lvd import build_layout_guidance, make_layout_energy_fn

    backbone = backbone_for(model)
    cond = backbone.encode_text([condition.prompt], None).cond
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(sampling.num_inference_steps, device=backbone.device)
    config = GuidanceConfig(guided_layers=tuple(layers), loss_threshold=-1.0)
    hook = build_layout_guidance(backbone, [condition.prompt], [condition], cond, config, ExecutionConfig(), scheduler,
                                 scheduler.timesteps, sampling.num_frames, sampling.height, sampling.width)
    energy_fn = make_layout_energy_fn(backbone, hook.recorder, cond, scheduler.timesteps[0], hook.videos,
                                      config.energy_weights(), hook.num_map_frames)
    latents = backbone.prepare_latents(seed, sampling.num_frames, sampling.height, sampling.width,
                                       sampling.initial_noise).requires_grad_(True)
    with hook, torch.enable_grad():
        energy = energy_fn(latents, [0])[0]
        (gradient,) = torch.autograd.grad(energy, latents)
    return {"energy": float(energy.detach()), "gradient_rms": float(gradient.float().pow(2).mean().sqrt()),
            "step_size": float(hook.step_sizes[0])}


def load_conditions(args, model, num_frames: int):
    """(prompt, condition) pairs: the layout cache's prompts, or the built-in benchmark layout."""
    from generation.backbones import backbone_for
    from utils.layout import Box, ObjectTrack, SceneLayout, parse_layout

    backbone = backbone_for(model)
    if args.model is None:
        dog = ObjectTrack(0, "brown dog", tuple(Box.from_xywh_px([20 + 50 * i, 250, 160, 120]) for i in range(6)))
        ball = ObjectTrack(1, "red ball", tuple(Box.from_xywh_px([200 + 50 * i, 320, 50, 50]) for i in range(6)))
        layout = SceneLayout("A realistic lively video of a scene with a brown dog chasing a red ball", "park",
                             (dog, ball))
        return [backbone.build_condition(layout, num_frames)]
    from prompt import get_prompts
    from utils.cache import LayoutCache, cache_path, occurrence_indices
    from utils.llm import resolve_model_name

    prompts = get_prompts(args.prompt_type)
    cache = LayoutCache.load(cache_path(args.prompt_type, args.template_version, resolve_model_name(args.model),
                                        cache_dir=args.cache_dir))
    conditions, seen = [], set()
    for prompt, occurrence in zip(prompts, occurrence_indices(prompts)):
        if prompt in seen:
            continue
        seen.add(prompt)
        reply = cache.get(prompt, occurrence)
        if reply is None:
            continue
        condition = backbone.build_condition(parse_layout(reply, prompt), num_frames)
        if condition.phrases:
            conditions.append(condition)
        if len(conditions) >= args.num_prompts:
            break
    return conditions


def summarize(scores, num_suggested: int) -> dict:
    per_head = [{"layer": layer, "head": head, "iou": statistics.fmean(values["iou"]),
                 "inside": statistics.fmean(values["inside"]), "samples": len(values["iou"])}
                for (layer, head), values in scores.items()]
    per_layer = defaultdict(list)
    for row in per_head:
        per_layer[row["layer"]].append(row)
    layers = [{"layer": layer, "iou": statistics.fmean(r["iou"] for r in rows),
               "inside": statistics.fmean(r["inside"] for r in rows),
               "best_head": max(rows, key=lambda r: r["iou"])["head"],
               "best_head_iou": max(r["iou"] for r in rows)} for layer, rows in per_layer.items()]
    layers.sort(key=lambda row: row["iou"], reverse=True)
    per_head.sort(key=lambda row: row["iou"], reverse=True)
    depth = {row["layer"]: index for index, row in enumerate(sorted(layers, key=lambda r: _depth_key(r["layer"])))}
    suggested = sorted((row["layer"] for row in layers[:num_suggested]), key=lambda name: depth[name])
    return {"layers": layers, "heads": per_head, "suggested_layers": suggested}


def _depth_key(name: str):
    parts = name.split(".")
    return [int(p) if p.isdigit() else p for p in parts]


def run(args) -> dict:
    from generation.backbones import backbone_for
    from generation.config import sampling_config_for
    from models.loading import load_video_model
    from models.registry import get_run_model

    spec = get_run_model(args.run_model)
    model = load_video_model(spec, model_path=args.model_path, device=args.device, dtype=args.dtype)
    sampling = sampling_config_for(spec, num_frames=args.num_frames, height=args.height, width=args.width,
                                   num_inference_steps=args.num_inference_steps)
    backbone = backbone_for(model)
    layers = recordable_layers(backbone)
    conditions = load_conditions(args, model, sampling.num_frames)
    if not conditions:
        raise SystemExit("error: no prompt with objects found in the layout cache")
    scores = defaultdict(lambda: {"iou": [], "inside": []})
    for index, condition in enumerate(conditions):
        print(f"[{index + 1}/{len(conditions)}] {condition.prompt}", file=sys.stderr, flush=True)
        for key, values in probe_prompt(model, condition, sampling, layers, args.probe_steps, args.top_q,
                                        seed=args.seed + index).items():
            scores[key]["iou"] += values["iou"]
            scores[key]["inside"] += values["inside"]
    summary = summarize(scores, args.num_suggested)
    energies = [first_step_energy(model, condition, sampling, summary["suggested_layers"], args.seed + index)
                for index, condition in enumerate(conditions)]
    gradient_rms = statistics.median(e["gradient_rms"] for e in energies)
    step_size = energies[0]["step_size"]
    suggested_scale = args.target_update_rms / (step_size * gradient_rms) if gradient_rms > 0 else float("inf")
    blocks = [int(name.split(".")[1]) for name in summary["suggested_layers"]] if spec.family == "wan" else None
    return {"run_model": spec.name, "source": model.source, "prompts": [c.prompt for c in conditions],
            "probe_steps": list(args.probe_steps), "top_q": args.top_q, **summary,
            "suggested_guided_blocks": blocks, "first_step": energies,
            "suggested_loss_scale": suggested_scale, "target_update_rms": args.target_update_rms}


def format_report(report: dict, num_heads: int = 10) -> str:
    lines = [f"{report['run_model']} ({report['source']}), {len(report['prompts'])} prompt(s), probe steps "
             f"{report['probe_steps']}", "", "| rank | layer | mean IoU | mass inside | best head (IoU) |",
             "|---:|---|---:|---:|---|"]
    lines += [f"| {rank} | {row['layer']} | {row['iou']:.3f} | {row['inside']:.3f} | {row['best_head']} "
              f"({row['best_head_iou']:.3f}) |" for rank, row in enumerate(report["layers"], 1)]
    lines += ["", "| best heads | IoU | mass inside |", "|---|---:|---:|"]
    lines += [f"| {row['layer']} head {row['head']} | {row['iou']:.3f} | {row['inside']:.3f} |"
              for row in report["heads"][:num_heads]]
    energy = statistics.median(e["energy"] for e in report["first_step"])
    lines += ["", f"suggested layers: {' '.join(report['suggested_layers'])}"]
    if report["suggested_guided_blocks"] is not None:
        lines.append(f"suggested flag:   --guided-blocks {' '.join(map(str, report['suggested_guided_blocks']))}")
    lines.append(f"first-step energy of those layers (median): {energy:.3f}; loss_scale for a first update of RMS "
                 f"{report['target_update_rms']}: {report['suggested_loss_scale']:.3g}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-model", default="lvd_wan_tiny")
    parser.add_argument("--model", default=None, help="LLM of the layout cache (default: the built-in layout)")
    parser.add_argument("--prompt-type", default="lvd")
    parser.add_argument("--template_version", default="v0.1")
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--num-prompts", type=int, default=20, help="distinct prompts with objects from the cache")
    parser.add_argument("--probe-steps", type=int, nargs="+", default=list(DEFAULT_PROBE_STEPS))
    parser.add_argument("--top-q", type=float, default=None,
                        help="top region = this fraction of the map (default: the box's own area)")
    parser.add_argument("--num-suggested", type=int, default=6)
    parser.add_argument("--target-update-rms", type=float, default=0.05)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--json-out", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.hub import MissingWeightsError
    from models.registry import RunModelError
    from utils.cache import CacheFormatError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (MissingWeightsError, RunModelError, CacheFormatError) as error:  # what to get or fix, in one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/probe_attention.py"]
                                                              + (argv if argv is not None else sys.argv[1:])),
                                          **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
