"""Cost of the layout control families against the baseline, in one process: wall time and peak memory of
``generate_video`` per arm (every family and combination), the arms interleaved and repeated so that
machine load hits them alike; the minimum time over the repeats is reported.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the arm; on the CPU, the peak resident set
during the arm above the resident set before it (sampled every 2 ms).

    python scripts/bench_controls.py --run-models lvd_tiny lvd_wan_tiny --repeats 3 --json-out docs/bench/controls_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARMS = ("none", "energy", "mask", "modulate", "mask+energy", "modulate+energy", "mask+modulate")


class PeakMemory:
    """Peak memory in MiB over a ``with`` block (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base, self._max, self._stop = self._rss_mb(), 0.0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._rss_mb())
                time.sleep(0.002)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._max, self._rss_mb()) - self._base


def build_arm_controls(arm: str, spec) -> list:
    from generation.attention_control import MaskingConfig, ModulationConfig
    from generation.config import GuidanceConfig

    configs = {"energy": GuidanceConfig(guided_layers=spec.guided_layers), "mask": MaskingConfig(),
               "modulate": ModulationConfig()}
    return [] if arm == "none" else [configs[name] for name in arm.split("+")]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from generation.backbones import backbone_for
    from generation.config import sampling_config_for
    from generation.sampling import generate_video
    from models.loading import load_video_model
    from models.registry import get_run_model
    from utils.io import atomic_write_json
    from utils.layout import Box, ObjectTrack, SceneLayout

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-models", nargs="+", default=["lvd_tiny", "lvd_wan_tiny"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the run-model's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    layout = SceneLayout("A red car and a blue cat", "street", (
        ObjectTrack(0, "red car", tuple(Box(0.05 + 0.08 * i, 0.3, 0.45 + 0.08 * i, 0.7) for i in range(6))),
        ObjectTrack(1, "blue cat", (Box(0.6, 0.1, 0.9, 0.4),) * 3 + (None,) * 3)))
    rows = []
    for name in args.run_models:
        spec = get_run_model(name)
        model = load_video_model(spec, device=args.device)
        sampling = sampling_config_for(spec, num_inference_steps=args.num_inference_steps)
        condition = backbone_for(model).build_condition(layout, sampling.num_frames)
        times = {arm: [] for arm in args.arms}
        memory = {arm: 0.0 for arm in args.arms}
        generate_video(model, condition.prompt, sampling, 0, condition=condition)  # warm-up
        for _ in range(args.repeats):
            for arm in args.arms:
                controls = build_arm_controls(arm, spec)
                with PeakMemory(model.device) as peak:
                    started = time.perf_counter()
                    generate_video(model, condition.prompt, sampling, 0, condition=condition, controls=controls)
                    times[arm].append(time.perf_counter() - started)
                memory[arm] = max(memory[arm], peak.peak_mb)
        base_time, base_memory = min(times["none"]), memory["none"]
        for arm in args.arms:
            rows.append({"run_model": name, "controls": arm, "seconds": min(times[arm]),
                         "time_ratio": min(times[arm]) / base_time, "peak_mb": memory[arm],
                         "memory_ratio": memory[arm] / base_memory if base_memory > 0 else None})
    print("| run-model | controls | s / video (min of %d) | time x | peak MiB | memory x |" % args.repeats)
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = "–" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
        print(f"| {row['run_model']} | {row['controls']} | {row['seconds']:.2f} | {row['time_ratio']:.2f} | "
              f"{row['peak_mb']:.0f} | {ratio} |")
    if args.json_out:
        atomic_write_json(Path(args.json_out), {"command": "python scripts/bench_controls.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "device": str(model.device), "torch_threads":
            torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
