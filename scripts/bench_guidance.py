"""Time and memory of LVD guidance against unguided sampling, one command per run-model.

Cases (all with the same layout, seed and step count):
  baseline   unguided sampling (the floor)
  weak       LVD with the README weak-guidance preset (max_iter 1, max_index_step 10)
  benchmark  LVD with the benchmark preset (com_loss_scale 0.03, max_iter 5); with --all-iterations the
             threshold is never reached, so every guided iteration runs (10 steps x 5)
  reference  the benchmark case on the reference path: full UNet forward, all 77 token columns recorded
             (what the original does); its latents must equal the optimised path's

Each case runs in its own process (its peak memory is its own), with warm-up runs and several timed
repeats (the median is reported). Tiny models run anywhere; full-size architectures get random weights
from a config folder (``--model-configs``, e.g. ../shared/model-configs) and need a GPU to be practical.

    python scripts/bench_guidance.py --run-model lvd_tiny --json-out bench.json
    python scripts/bench_guidance.py --run-model lvd_zeroscope --model-configs ../shared/model-configs \\
        --cases baseline weak --num_frames 24
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("baseline", "weak", "benchmark", "reference")

# A two-object layout composed for the benchmark (pixel xywh on the 512 canvas).
BENCH_PROMPT = "A realistic lively video of a scene with a brown dog chasing a red ball"
BENCH_REPLY = """Reasoning: The ball rolls to the right and the dog runs after it, a little behind.

Frame 1: [{'id': 0, 'name': 'brown dog', 'box': [20, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [200, 320, 50, 50]}]
Frame 2: [{'id': 0, 'name': 'brown dog', 'box': [70, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [250, 320, 50, 50]}]
Frame 3: [{'id': 0, 'name': 'brown dog', 'box': [120, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [300, 320, 50, 50]}]
Frame 4: [{'id': 0, 'name': 'brown dog', 'box': [170, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [350, 320, 50, 50]}]
Frame 5: [{'id': 0, 'name': 'brown dog', 'box': [220, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [400, 320, 50, 50]}]
Frame 6: [{'id': 0, 'name': 'brown dog', 'box': [270, 250, 160, 120]}, {'id': 1, 'name': 'red ball', 'box': [450, 320, 50, 50]}]
Background keyword: park"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-model", default="lvd_tiny")
    parser.add_argument("--model-configs", default=None,
                        help="folder of architecture configs (random full-size weights); tiny models need none")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=40)
    parser.add_argument("--all-iterations", action="store_true",
                        help="never reach the threshold in the benchmark/reference cases (every iteration runs)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--low-memory", action="store_true", help="offload the guided pass's saved tensors")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--single-case", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON out
    parser.add_argument("--latents-out", default=None, help=argparse.SUPPRESS)
    return parser


def _guidance_for(case: str, spec, args):
    from generation.config import GuidanceConfig, benchmark_preset, weak_guidance_preset

    if case == "baseline":
        return None
    if case == "weak":
        base = "zeroscope" if "zeroscope" in spec.name else "modelscope"
        return GuidanceConfig(guided_layers=spec.guided_layers, **weak_guidance_preset(base),
                              low_memory=args.low_memory)
    overrides = benchmark_preset()
    if args.all_iterations:
        overrides["loss_threshold"] = -1.0  # the energy is never below: all max_index_step x max_iter run
    reference = case == "reference"
    return GuidanceConfig(guided_layers=spec.guided_layers, **overrides, low_memory=args.low_memory,
                          stop_after_last_guided_layer=not reference, record_object_tokens_only=not reference)


def _load_model(spec, args):
    if spec.tiny or args.model_configs is None:
        from models.loading import load_video_model

        return load_video_model(spec, device=args.device, dtype=args.dtype)
    from models.tiny import build_random_model_from_configs

    return build_random_model_from_configs(Path(args.model_configs) / spec.config_dir_name, dtype=args.dtype,
                                           device=args.device, spec=spec)


def run_single_case(args) -> dict:
    """Warm up, time ``repeats`` runs of one case, and report its peak memory (in this process)."""
    import torch

    from generation.config import SamplingConfig
    from generation.sampling import generate_video
    from models.registry import get_run_model, validate_num_frames
    from utils.layout import build_condition, parse_layout

    spec = get_run_model(args.run_model)
    model = _load_model(spec, args)
    num_frames = validate_num_frames(spec, args.num_frames)
    sampling = SamplingConfig(height=spec.height, width=spec.width, num_frames=num_frames,
                              num_inference_steps=args.num_inference_steps)
    condition = build_condition(parse_layout(BENCH_REPLY, BENCH_PROMPT), num_frames, model.tokenizer)
    guidance = _guidance_for(args.single_case, spec, args)
    cuda = model.device.type == "cuda"

    def run_once():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = generate_video(model, BENCH_PROMPT, sampling, seed=0, condition=condition, guidance=guidance)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    for _ in range(args.warmup):
        run_once()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(args.repeats):
        elapsed, result = run_once()
        times.append(elapsed)
    if args.latents_out:
        torch.save(result.latents, args.latents_out)
    peak_gib = (torch.cuda.max_memory_allocated() if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    return {"case": args.single_case, "median_s": statistics.median(times), "times_s": times,
            "guided_iterations": len(result.guidance_log), "peak_memory_gib": peak_gib,
            "memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
            "device": str(model.device), "dtype": str(model.dtype), "num_frames": num_frames,
            "height": spec.height, "width": spec.width, "steps": args.num_inference_steps}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.single_case:
        print(json.dumps(run_single_case(args)))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json-out", args.json_out)]
    results, latents_paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            latents_paths[case] = os.path.join(tmp, f"{case}.pt")
            command = [sys.executable, __file__, *forwarded, "--single-case", case, "--latents-out", latents_paths[case]]
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode != 0:
                print(output.stderr[-4000:], file=sys.stderr)
                return 1
            results[case] = json.loads(output.stdout.strip().splitlines()[-1])
            print(f"{case}: {results[case]['median_s']:.3f} s, {results[case]['guided_iterations']} guided iterations, "
                  f"peak {results[case]['peak_memory_gib']:.2f} GiB", flush=True)
        summary = _summarize(results, latents_paths)
    print(format_table(summary))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/bench_guidance.py"] + forwarded),
                                          "run_model": args.run_model, "cases": results, "summary": summary})
    return 0


def _summarize(results: dict, latents_paths: dict) -> dict:
    import torch

    summary = {}
    baseline = results.get("baseline")
    for case, result in results.items():
        row = {"median_s": result["median_s"], "guided_iterations": result["guided_iterations"],
               "peak_memory_gib": result["peak_memory_gib"]}
        if baseline:
            row["time_ratio"] = result["median_s"] / baseline["median_s"]
            row["memory_ratio"] = result["peak_memory_gib"] / baseline["peak_memory_gib"]
        summary[case] = row
    if "benchmark" in results and "reference" in results:
        fast, reference = (torch.load(latents_paths[c]).float() for c in ("benchmark", "reference"))
        summary["reference"]["max_abs_latent_diff_vs_benchmark"] = float((fast - reference).abs().max())
    return summary


def format_table(summary: dict) -> str:
    lines = ["| case | median s | x baseline | guided iterations | peak GiB | x baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for case, row in summary.items():
        lines.append(f"| {case} | {row['median_s']:.3f} | {row.get('time_ratio', float('nan')):.2f} | "
                     f"{row['guided_iterations']} | {row['peak_memory_gib']:.2f} | "
                     f"{row.get('memory_ratio', float('nan')):.2f} |")
    if "max_abs_latent_diff_vs_benchmark" in summary.get("reference", {}):
        lines.append(f"\nreference vs optimised path, max |latent difference|: "
                     f"{summary['reference']['max_abs_latent_diff_vs_benchmark']:.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
