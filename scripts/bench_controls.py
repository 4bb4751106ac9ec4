"""Cost of the layout control families against the baseline: time and peak memory of ``generate_video`` per
arm (every family and combination) on the same layout and seed.

Time: in one process, the arms interleaved and repeated so that machine load hits them alike; the minimum over
the repeats of the wall time and of the process's CPU time (on a shared CPU the CPU time is the steadier one).
Peak memory: each arm once more in a fresh process of its own (the model loaded, one video): on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set (libraries included).

    python scripts/bench_controls.py --run-models lvd_tiny lvd_wan_tiny --repeats 3 --json-out docs/bench/controls_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARMS = ("none", "energy", "mask", "modulate", "mask+energy", "modulate+energy", "mask+modulate")


def build_arm_controls(arm: str, spec) -> list:
    from generation.attention_control import MaskingConfig, ModulationConfig
    from generation.config import GuidanceConfig

    configs = {"energy": GuidanceConfig(guided_layers=spec.guided_layers), "mask": MaskingConfig(),
               "modulate": ModulationConfig()}
    return [] if arm == "none" else [configs[name] for name in arm.split("+")]


def prepare(name: str, num_inference_steps: int | None, device: str | None):
    """(spec, model, sampling config, condition) of the benchmark's two-object layout."""
    from generation.backbones import backbone_for
    from generation.config import sampling_config_for
    from models.loading import load_video_model
    from models.registry import get_run_model
    from utils.layout import Box, ObjectTrack, SceneLayout

    layout = SceneLayout("A red car and a blue cat", "street", (
        ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.7) for i in range(6))),
        ObjectTrack(1, "blue cat", (Box(0.6, 0.1, 0.9, 0.4),) * 3 + (None,) * 3)))
    spec = get_run_model(name)
    model = load_video_model(spec, device=device)
    sampling = sampling_config_for(spec, num_inference_steps=num_inference_steps)
    return spec, model, sampling, backbone_for(model).build_condition(layout, sampling.num_frames)


def measure_memory(name: str, arm: str, num_inference_steps: int | None, device: str | None) -> float:
    """This process's peak memory in MiB: loading the model and one video of ``arm``."""
    from generation.sampling import generate_video

    spec, model, sampling, condition = prepare(name, num_inference_steps, device)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generate_video(model, condition.prompt, sampling, 0, condition=condition, controls=build_arm_controls(arm, spec))
    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-memory"]:
        name, arm, steps, device = argv[1:5]
        print(json.dumps(measure_memory(name, arm, int(steps) if steps != "-" else None,
                                        device if device != "-" else None)))
        return 0
    from generation.sampling import generate_video
    from utils.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-models", nargs="+", default=["lvd_tiny", "lvd_wan_tiny"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the run-model's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    rows = []
    for name in args.run_models:
        spec, model, sampling, condition = prepare(name, args.num_inference_steps, args.device)
        wall = {arm: [] for arm in args.arms}
        cpu = {arm: [] for arm in args.arms}
        iterations = {}
        generate_video(model, condition.prompt, sampling, 0, condition=condition)  # warm-up
        for _ in range(args.repeats):
            for arm in args.arms:
                controls = build_arm_controls(arm, spec)
                started, started_cpu = time.perf_counter(), time.process_time()
                result = generate_video(model, condition.prompt, sampling, 0, condition=condition, controls=controls)
                iterations[arm] = len(result.guidance_log)
                wall[arm].append(time.perf_counter() - started)
                cpu[arm].append(time.process_time() - started_cpu)
        memory = {}
        for arm in args.arms:
            child = [sys.executable, __file__, "--child-memory", name, arm, str(args.num_inference_steps or "-"),
                     args.device or "-"]
            memory[arm] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True,
                                                    cwd=REPO).stdout.strip().splitlines()[-1])
        for arm in args.arms:
            rows.append({"run_model": name, "controls": arm, "guided_iterations": iterations[arm], "wall_s": min(wall[arm]), "cpu_s": min(cpu[arm]),
                         "wall_ratio": min(wall[arm]) / min(wall["none"]), "cpu_ratio": min(cpu[arm]) / min(cpu["none"]),
                         "peak_mb": memory[arm], "memory_ratio": memory[arm] / memory["none"]})
    print(f"| run-model | controls | guided iterations | wall s (min of {args.repeats}) | wall x | CPU s | CPU x | "
          "peak MiB | memory x |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run_model']} | {row['controls']} | {row['guided_iterations']} | {row['wall_s']:.2f} | {row['wall_ratio']:.2f} | "
              f"{row['cpu_s']:.2f} | {row['cpu_ratio']:.2f} | {row['peak_mb']:.0f} | {row['memory_ratio']:.2f} |")
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"command": "python scripts/bench_controls.py " + " ".join(
            argv), "device": str(model.device), "torch_threads":
            torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
