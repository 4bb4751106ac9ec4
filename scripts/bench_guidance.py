"""Time and memory of LVD guidance against unguided sampling, one command per run-model.

Cases (all with the same layout, seed and step count):
  baseline   unguided sampling (the floor)
  weak       LVD with the README weak-guidance preset (max_iter 1, max_index_step 10)
  benchmark  LVD with the benchmark preset (com_loss_scale 0.03, max_iter 5)
With --all-iterations the threshold is never reached, so every guided iteration of the preset runs
(10 for weak, 50 for benchmark); otherwise the count depends on the model's energies.
  reference  the benchmark case on the reference path: full UNet forward, all 77 token columns recorded
             (what the original does); its latents must equal the optimised path's

All cases run in one process after a warm-up run each, their timed repeats interleaved (the median is
reported); GPU peak memory is reset before every run, CPU peak memory is taken from a fresh process per case. Tiny models run anywhere; full-size architectures get random weights
from a config folder (``--model-configs``, e.g. ../shared/model-configs) and need a GPU to be practical.

    python scripts/bench_guidance.py --run-model lvd_tiny --json-out bench.json
    python scripts/bench_guidance.py --run-model lvd_zeroscope --model-configs ../shared/model-configs \\
        --cases baseline weak --num_frames 24
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
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
                        help="never reach the threshold (every guided iteration of the preset runs; the count is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--low-memory", action="store_true", help="offload the guided pass's saved tensors")
    parser.add_argument("--ablation", action="store_true",
                        help="time one guided iteration under each efficiency change instead of whole videos")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--single-case", default=None, help=argparse.SUPPRESS)  # internal: one case's peak RSS
    return parser


def _guidance_for(case: str, spec, args):
    """(GuidanceConfig or None, ExecutionConfig) of a case."""
    import dataclasses

    from generation.config import ExecutionConfig, benchmark_preset, weak_guidance_preset

    reference = case == "reference"
    execution = ExecutionConfig(low_memory=args.low_memory, stop_after_last_guided_layer=not reference,
                                record_object_tokens_only=not reference)
    if case == "baseline":
        return None, execution
    if case == "weak":
        guidance = weak_guidance_preset("zeroscope" if "zeroscope" in spec.name else "modelscope")
    else:
        guidance = benchmark_preset()
    guidance = dataclasses.replace(guidance, guided_layers=spec.guided_layers)
    if args.all_iterations:  # the energy is never below: all max_index_step x max_iter iterations run
        guidance = dataclasses.replace(guidance, loss_threshold=-1.0)
    return guidance, execution


def _load_model(spec, args):
    if spec.tiny or args.model_configs is None:
        from models.loading import load_video_model

        return load_video_model(spec, device=args.device, dtype=args.dtype)
    from models.tiny import build_random_model_from_configs

    return build_random_model_from_configs(Path(args.model_configs) / spec.config_dir_name, dtype=args.dtype,
                                           device=args.device, spec=spec)


def _setup(args):
    from generation.config import SamplingConfig
    from models.registry import get_run_model, validate_num_frames
    from utils.layout import build_condition, parse_layout

    spec = get_run_model(args.run_model)
    model = _load_model(spec, args)
    num_frames = validate_num_frames(spec, args.num_frames)
    sampling = SamplingConfig(height=spec.height, width=spec.width, num_frames=num_frames,
                              num_inference_steps=args.num_inference_steps)
    condition = build_condition(parse_layout(BENCH_REPLY, BENCH_PROMPT), num_frames, model.tokenizer)
    return spec, model, sampling, condition


def _run_once(model, sampling, condition, guidance_and_execution):
    """(seconds, peak GPU bytes or None, result) of one video."""
    import torch

    from generation.sampling import generate_video

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    guidance, execution = guidance_and_execution
    result = generate_video(model, BENCH_PROMPT, sampling, seed=0, condition=condition, guidance=guidance,
                            execution=execution)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, (torch.cuda.max_memory_allocated() if cuda else None), result


def run_cases(args) -> tuple[dict, dict]:
    """All cases in this process, repeats interleaved (case A, B, C, A, B, C, ...) so that drift in the
    machine's speed hits every case alike. Returns (results per case, final latents per case)."""
    spec, model, sampling, condition = _setup(args)
    guidances = {case: _guidance_for(case, spec, args) for case in args.cases}
    for case in args.cases:
        for _ in range(args.warmup):
            _run_once(model, sampling, condition, guidances[case])
    times = {case: [] for case in args.cases}
    peaks = {case: [] for case in args.cases}
    last = {}
    for _ in range(args.repeats):
        for case in args.cases:
            elapsed, peak, last[case] = _run_once(model, sampling, condition, guidances[case])
            times[case].append(elapsed)
            peaks[case].append(peak)
    results = {}
    for case in args.cases:
        cuda_peak = max(p for p in peaks[case]) if peaks[case][0] is not None else None
        results[case] = {"case": case, "median_s": statistics.median(times[case]), "times_s": times[case],
                         "guided_iterations": len(last[case].guidance_log),
                         "peak_memory_gib": None if cuda_peak is None else cuda_peak / 2 ** 30,
                         "memory_kind": "cuda max_memory_allocated" if cuda_peak is not None else "process max RSS",
                         "device": str(model.device), "dtype": str(model.dtype), "num_frames": sampling.num_frames,
                         "height": spec.height, "width": spec.width, "steps": args.num_inference_steps}
    return results, {case: last[case].latents for case in args.cases}


ABLATION_VARIANTS = (
    # (name, parameters frozen, stop after the last guided layer, object-token columns only)
    ("reference: trainable params, full forward, 77 columns", False, False, False),
    ("+ frozen parameters", True, False, False),
    ("+ stop after the last guided layer", True, True, False),
    ("+ object-token columns only (ours)", True, True, True),
)


def run_ablation(args) -> list[dict]:
    """Time one guided iteration (forward, energy, gradient) under each efficiency change, cumulatively."""
    import torch

    from generation.backbones import backbone_for
    from generation.config import ExecutionConfig
    from generation.guidance import guidance_step
    from generation.lvd import build_layout_guidance, make_layout_energy_fn

    spec, model, sampling, condition = _setup(args)
    guidance, _ = _guidance_for("benchmark", spec, args)
    backbone = backbone_for(model)
    latents = backbone.prepare_latents(0, sampling.num_frames, sampling.height, sampling.width, "cpu")
    cond = backbone.encode_text([condition.prompt], None).cond
    scheduler = backbone.make_scheduler()
    scheduler.set_timesteps(sampling.num_inference_steps, device=model.device)
    timestep = torch.tensor(999, device=model.device)
    rows = []
    for name, frozen, stop_early, token_columns in ABLATION_VARIANTS:
        model.unet.requires_grad_(not frozen)
        execution = ExecutionConfig(stop_after_last_guided_layer=stop_early, record_object_tokens_only=token_columns)
        hook = build_layout_guidance(backbone, [condition.prompt], [condition], cond, guidance, execution, scheduler,
                                     scheduler.timesteps, sampling.num_frames, sampling.height, sampling.width)
        energy_fn = make_layout_energy_fn(backbone, hook.recorder, cond, timestep, hook.videos,
                                          guidance.energy_weights(), hook.num_map_frames)

        times = []
        with hook:
            for repeat in range(args.warmup + args.repeats):
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                guidance_step(latents, lambda z: energy_fn(z, [0]), 1.0, guidance.loss_scale)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat >= args.warmup:
                    times.append(time.perf_counter() - start)
        rows.append({"variant": name, "median_s": statistics.median(times), "times_s": times})
    model.unet.requires_grad_(False)
    return rows


def measure_cpu_peak_rss(args, case: str) -> float:
    """Peak RSS (GiB) of a fresh process that runs one video of ``case`` (CPU memory has no per-run reset)."""
    forwarded = ["--run-model", args.run_model, "--num_inference_steps", str(args.num_inference_steps)]
    for flag, value in (("--model-configs", args.model_configs), ("--num_frames", args.num_frames),
                        ("--device", args.device), ("--dtype", args.dtype)):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += ["--all-iterations"] if args.all_iterations else []
    forwarded += ["--low-memory"] if args.low_memory else []
    output = subprocess.run([sys.executable, __file__, *forwarded, "--single-case", case],
                            capture_output=True, text=True, check=True)
    return float(json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_gib"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.single_case:  # internal: one video in a fresh process, for its peak RSS
        spec, model, sampling, condition = _setup(args)
        _run_once(model, sampling, condition, _guidance_for(args.single_case, spec, args))
        print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30}))
        return 0
    if args.ablation:
        rows = run_ablation(args)
        print("| guided iteration | median s | x reference |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['variant']} | {row['median_s']:.4f} | {row['median_s'] / rows[0]['median_s']:.2f} |")
        if args.json_out:
            from utils.io import atomic_write_json

            atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/bench_guidance.py"] + [
                a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json-out", args.json_out)]),
                "run_model": args.run_model, "ablation": rows})
        return 0
    results, latents = run_cases(args)
    for case, result in results.items():
        if result["peak_memory_gib"] is None:
            result["peak_memory_gib"] = measure_cpu_peak_rss(args, case)
        print(f"{case}: {result['median_s']:.3f} s, {result['guided_iterations']} guided iterations, "
              f"peak {result['peak_memory_gib']:.2f} GiB ({result['memory_kind']})", flush=True)
    summary = _summarize(results, latents)
    print(format_table(summary))
    if args.json_out:
        from utils.io import atomic_write_json

        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json-out", args.json_out)]
        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/bench_guidance.py"] + forwarded),
                                          "run_model": args.run_model, "cases": results, "summary": summary})
    return 0


def _summarize(results: dict, latents: dict) -> dict:
    summary = {}
    baseline = results.get("baseline")
    for case, result in results.items():
        row = {"median_s": result["median_s"], "guided_iterations": result["guided_iterations"],
               "peak_memory_gib": result["peak_memory_gib"]}
        if baseline:
            row["time_ratio"] = result["median_s"] / baseline["median_s"]
            row["memory_ratio"] = result["peak_memory_gib"] / baseline["peak_memory_gib"]
        summary[case] = row
    if "benchmark" in latents and "reference" in latents:
        difference = (latents["benchmark"].float() - latents["reference"].float()).abs().max()
        summary["reference"]["max_abs_latent_diff_vs_benchmark"] = float(difference)
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
