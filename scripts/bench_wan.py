"""Time and memory of LVD guidance on Wan 2.1 against unguided sampling, from the parts of a video.

A Wan video is: the text encoding, ``steps`` CFG steps (two transformer passes and a UniPC step each), the guided
iterations (each: the conditional pass to the last guided layer with the recorder on, the energy, its gradient,
the update) and one VAE decode. This times each part (median of ``--repeats`` after ``--warmup``), with and without
``--low-memory`` (gradient checkpointing) for the guided iteration, and derives the time of a whole video for the
guidance presets:

    video(preset) = encode + steps * cfg_step + iterations(preset) * guided_iteration + decode

with ``iterations`` = 10 for the weak preset (max_iter 1 x 10 steps) and 50 for the default / benchmark preset
(5 x 10), every iteration run (the threshold never stops it). On a GPU the peak memory of each part is measured
(``torch.cuda.max_memory_allocated`` after a reset); a video's peak is the largest of its parts'. With
``--full-videos`` whole videos are also timed end to end, to check the derived ratio (cheap on the tiny model).

Full size without weights: ``--random-weights 1.3b`` builds the real architecture with random weights on the
device (no text encoder: umT5-XXL has 5.7B parameters and runs once per video; the prompt embeddings are random
and the encode time is left out, which the table says).

    python scripts/bench_wan.py --run-model lvd_wan_tiny --full-videos --json-out docs/bench/wan_tiny_cpu.json
    python scripts/bench_wan.py --random-weights 1.3b --height 480 --width 832 --num_frames 81 --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

# Guided iterations of a video per preset, every iteration run (spec 4.8: max_iter x max_index_step).
PRESET_ITERATIONS = {"weak": 10, "benchmark": 50}
BENCH_PROMPT = "A realistic lively video of a scene with a brown dog chasing a red ball"


def bench_layout():
    """The two-object layout of scripts/bench_guidance.py, as typed objects."""
    from utils.layout import Box, ObjectTrack, SceneLayout

    dog = ObjectTrack(0, "brown dog", tuple(Box.from_xywh_px([20 + 50 * i, 250, 160, 120]) for i in range(6)))
    ball = ObjectTrack(1, "red ball", tuple(Box.from_xywh_px([200 + 50 * i, 320, 50, 50]) for i in range(6)))
    return SceneLayout(BENCH_PROMPT, "park", (dog, ball))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of ``fn()`` and, on CUDA, its peak allocated memory (GiB)."""
    for _ in range(warmup):
        fn()
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) / 2 ** 30)
    return {"median_s": statistics.median(times), "times_s": times, "peak_gib": max(peaks) if peaks else None}


def load_model(args):
    from models.loading import load_video_model
    from models.registry import get_run_model
    from models.wan import build_random_wan_model

    spec = get_run_model(args.run_model)
    if args.random_weights:
        return spec, build_random_wan_model(args.device, args.dtype, size=args.random_weights, spec=spec)
    return spec, load_video_model(spec, device=args.device, dtype=args.dtype)


def run(args) -> dict:
    from generation.backbones import backbone_for
    from generation.backbones.base import TextConditioning
    from generation.config import ExecutionConfig, GuidanceConfig, sampling_config_for
    from generation.guidance import guidance_step
    from generation.lvd import build_layout_guidance, make_layout_energy_fn
    from models.registry import scale_guided_blocks, wan_guided_layers, WAN_GUIDED_BLOCKS_1_3B

    spec, model = load_model(args)
    model = model.with_corrector_off_steps(args.max_index_step)
    backbone = backbone_for(model)
    device = backbone.device
    sampling = sampling_config_for(spec, num_frames=args.num_frames, height=args.height, width=args.width,
                                   num_inference_steps=args.num_inference_steps)
    layers = spec.guided_layers or wan_guided_layers(
        scale_guided_blocks(WAN_GUIDED_BLOCKS_1_3B, len(model.transformer.blocks)))
    guidance = GuidanceConfig(guided_layers=layers, loss_threshold=-1.0, max_index_step=args.max_index_step)
    condition = backbone.build_condition(bench_layout(), sampling.num_frames)

    parts: dict[str, dict] = {}
    if model.text_encoder is not None:
        parts["encode"] = measure(lambda: backbone.encode_text([condition.prompt], sampling.negative_prompt),
                                  device, args.warmup, args.repeats)
        text = backbone.encode_text([condition.prompt], sampling.negative_prompt)
    else:  # random weights: random prompt embeddings (the encoder's cost is not part of the comparison)
        generator = torch.Generator("cpu").manual_seed(0)
        shape = (1, 512, model.transformer.config.text_dim)
        text = TextConditioning(cond=torch.randn(shape, generator=generator).to(device, model.dtype),
                                uncond=torch.randn(shape, generator=generator).to(device, model.dtype))
    latents = backbone.prepare_latents(0, sampling.num_frames, sampling.height, sampling.width, "cpu")
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(sampling.num_inference_steps, device=device)
    timestep = scheduler.timesteps[1]

    def cfg_step():
        trial = backbone.make_scheduler()
        trial.set_timesteps(sampling.num_inference_steps, device=device)
        with torch.no_grad():
            output = backbone.predict(trial, latents, scheduler.timesteps[0], text, sampling.guidance_scale)
            backbone.step(trial, output, scheduler.timesteps[0], latents)

    parts["cfg_step"] = measure(cfg_step, device, args.warmup, args.repeats)
    for name, low_memory in (("guided_iteration", False), ("guided_iteration_low_memory", True)):
        execution = ExecutionConfig(low_memory=low_memory)
        hook = build_layout_guidance(backbone, [condition.prompt], [condition], text.cond, guidance, execution,
                                     scheduler, scheduler.timesteps, sampling.num_frames, sampling.height,
                                     sampling.width)
        energy_fn = make_layout_energy_fn(backbone, hook.recorder, hook.cond, timestep, hook.videos,
                                          guidance.energy_weights(), hook.num_map_frames, low_memory)
        with hook:
            parts[name] = measure(lambda: guidance_step(latents, lambda z: energy_fn(z, [0]), hook.step_sizes[1],
                                                        guidance.loss_scale),
                                  device, args.warmup, args.repeats)
    if model.vae is not None:
        parts["decode"] = measure(lambda: backbone.decode(latents), device, min(args.warmup, 1) if
                                  device.type != "cuda" else 0, 1)

    steps = sampling.num_inference_steps
    encode = parts.get("encode", {}).get("median_s", 0.0)
    decode = parts.get("decode", {}).get("median_s", 0.0)
    baseline_s = encode + steps * parts["cfg_step"]["median_s"] + decode
    peaks = [p["peak_gib"] for k, p in parts.items() if not k.startswith("guided") and p["peak_gib"] is not None]
    baseline_peak = max(peaks) if peaks else None
    derived = {"baseline": {"video_s": baseline_s, "x_baseline": 1.0, "peak_gib": baseline_peak,
                            "guided_iterations": 0}}
    for preset, iterations in PRESET_ITERATIONS.items():
        for suffix, part in (("", "guided_iteration"), (" --low-memory", "guided_iteration_low_memory")):
            video_s = baseline_s + iterations * parts[part]["median_s"]
            peak = None if baseline_peak is None else max(baseline_peak, parts[part]["peak_gib"])
            derived[f"{preset}{suffix}"] = {"video_s": video_s, "x_baseline": video_s / baseline_s, "peak_gib": peak,
                                            "x_baseline_memory": None if peak is None else peak / baseline_peak,
                                            "guided_iterations": iterations}
    report = {"run_model": spec.name, "weights": f"random {args.random_weights}" if args.random_weights else
              model.source, "device": str(device), "dtype": str(model.dtype),
              "height": sampling.height, "width": sampling.width, "num_frames": sampling.num_frames,
              "steps": steps, "guided_layers": list(layers), "corrector_off_steps": model.corrector_off_steps,
              "encode_included": model.text_encoder is not None, "parts": parts, "derived": derived}
    if args.full_videos:
        report["full_videos"] = time_full_videos(model, sampling, condition, guidance, args)
    return report


def time_full_videos(model, sampling, condition, guidance, args) -> dict:
    """Whole videos, end to end: the baseline, and each preset with every iteration, interleaved repeats."""
    from generation.config import ExecutionConfig
    from generation.sampling import generate_video

    weak, benchmark = dataclasses.replace(guidance, max_iter=1), dataclasses.replace(guidance, max_iter=5)
    cases = {"baseline": (None, False), "weak": (weak, False), "weak --low-memory": (weak, True),
             "benchmark": (benchmark, False), "benchmark --low-memory": (benchmark, True)}
    device = model.device
    for case, (config, low_memory) in cases.items():
        for _ in range(args.warmup):
            generate_video(model, condition.prompt, sampling, 0, condition=condition, guidance=config,
                           execution=ExecutionConfig(low_memory=low_memory))
    times = {case: [] for case in cases}
    iterations = {}
    for _ in range(args.repeats):
        for case, (config, low_memory) in cases.items():
            _synchronize(device)
            start = time.perf_counter()
            result = generate_video(model, condition.prompt, sampling, 0, condition=condition, guidance=config,
                                    execution=ExecutionConfig(low_memory=low_memory))
            _synchronize(device)
            times[case].append(time.perf_counter() - start)
            iterations[case] = len(result.guidance_log)
    base = statistics.median(times["baseline"])
    return {case: {"median_s": statistics.median(values), "x_baseline": statistics.median(values) / base,
                   "guided_iterations": iterations[case], "times_s": values} for case, values in times.items()}


def format_table(report: dict) -> str:
    size = f"{report['height']}x{report['width']}x{report['num_frames']}"
    lines = [f"{report['run_model']} ({report['weights']}), {size}, {report['steps']} steps, {report['device']} "
             f"{report['dtype']}" + ("" if report["encode_included"] else "; text encoding not included"), "",
             "| part | median s | peak GiB |", "|---|---:|---:|"]
    for name, part in report["parts"].items():
        peak = "" if part["peak_gib"] is None else f"{part['peak_gib']:.2f}"
        lines.append(f"| {name} | {part['median_s']:.4f} | {peak} |")
    lines += ["", "| video (derived) | s | x baseline | guided iterations | peak GiB | x baseline |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in report["derived"].items():
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        memory = "" if row.get("x_baseline_memory") is None else f"{row['x_baseline_memory']:.2f}"
        lines.append(f"| {name} | {row['video_s']:.3f} | {row['x_baseline']:.2f} | {row['guided_iterations']} | "
                     f"{peak} | {memory} |")
    if "full_videos" in report:
        lines += ["", "| video (measured end to end) | median s | x baseline | guided iterations |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {case} | {row['median_s']:.3f} | {row['x_baseline']:.2f} | {row['guided_iterations']} |"
                  for case, row in report["full_videos"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-model", default="lvd_wan_tiny")
    parser.add_argument("--random-weights", choices=("1.3b", "14b"), default=None,
                        help="full-size architecture with random weights (no text encoder) instead of loading")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--max_index_step", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--full-videos", action="store_true", help="also time whole videos end to end")
    parser.add_argument("--json-out", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.random_weights and args.run_model == "lvd_wan_tiny":
        args.run_model = "lvd_wan2.1-14b" if args.random_weights == "14b" else "lvd_wan2.1-1.3b"
    report = run(args)
    print(format_table(report))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/bench_wan.py"]
                                                              + (argv if argv is not None else sys.argv[1:])),
                                          **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
