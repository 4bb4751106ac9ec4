"""Every GPU row of docs/BENCHMARKS.md in one process, with full-size random weights (no downloads):

  zeroscope        LVD on Zeroscope 576x320x24, the README weak preset, every iteration (bench_guidance.py)
  modelscope256    LVD on ModelScope 256x256x16, the benchmark preset, every iteration (bench_guidance.py)
  wan-480x832x81   LVD on Wan 2.1 1.3B at 480x832, 81 frames (bench_wan.py: parts timed, videos derived)
  wan-320x576x33   the same at 320x576, 33 frames

each with and without --low-memory: time ratio to the unguided baseline and peak GPU memory. Rows run in that
order; each writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md`` when it ends (a row that fails records its
error and the next one runs; rows past ``--budget-s`` are skipped), so a run cut short still reports.

``--tiny`` runs the same rows on the tiny random-weight models at tiny sizes and few steps: the CPU dry run that
shows the command works before a GPU is available (its numbers mean nothing). See scripts/gpu_bench.sh for the one
command that installs the wheels and runs this.

    python scripts/gpu_bench.py --model-configs .gpu-bench/model-configs --out outputs/gpu_bench
    python scripts/gpu_bench.py --tiny --out /tmp/gpu_bench_dry_run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

ROWS = ("zeroscope", "modelscope256", "wan-480x832x81", "wan-320x576x33")


def load_sibling_script(name: str):
    """Another script of this folder as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet_row(name: str, args) -> dict:
    """bench_guidance.py's cases for one UNet row, with and without --low-memory."""
    bench = load_sibling_script("bench_guidance")
    run_model, cases = {"zeroscope": ("lvd_zeroscope", ["baseline", "weak"]),
                        "modelscope256": ("lvd_modelscope256", ["baseline", "benchmark"])}[name]
    if args.tiny:
        run_model = "lvd_tiny"
    result = {}
    for label, low_memory in (("default", False), ("low_memory", True)):
        argv = ["--run-model", run_model, "--cases", *cases, "--all-iterations",
                "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        if args.tiny:
            argv += ["--num_inference_steps", "4", "--device", "cpu"]
        else:
            argv += ["--model-configs", str(args.model_configs), "--device", "cuda"]
        argv += ["--low-memory"] if low_memory else []
        options = bench.build_parser().parse_args(argv)
        results, latents = bench.run_cases(options)
        for case_result in results.values():   # CPU dry run: no per-run peak; the process's max RSS stands in
            if case_result["peak_memory_gib"] is None:
                case_result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
                case_result["memory_kind"] = "process max RSS (whole run)"
        summary = bench._summarize(results, latents)
        result[label] = {"command": "python scripts/bench_guidance.py " + " ".join(argv), "cases": results,
                         "summary": summary, "table": bench.format_table(summary)}
        _free_gpu()
    return result


def wan_row(name: str, args) -> dict:
    """bench_wan.py at one size (both --low-memory settings are timed there)."""
    bench = load_sibling_script("bench_wan")
    height, width, frames = (int(v) for v in name.removeprefix("wan-").split("x"))
    if args.tiny:
        height, width, frames = {"wan-480x832x81": (64, 96, 17), "wan-320x576x33": (32, 64, 9)}[name]
        argv = ["--run-model", "lvd_wan_tiny", "--device", "cpu", "--num_inference_steps", "4"]
    else:
        argv = ["--random-weights", "1.3b", "--device", "cuda", "--dtype", "bf16"]
    argv += ["--height", str(height), "--width", str(width), "--num_frames", str(frames),
             "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    options = bench.build_parser().parse_args(argv)
    if options.random_weights:
        options.run_model = "lvd_wan2.1-1.3b"
    report = bench.run(options)
    _free_gpu()
    return {"command": "python scripts/bench_wan.py " + " ".join(argv), "report": report,
            "table": bench.format_table(report)}


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU benchmark rows ({'tiny CPU dry run' if report['tiny'] else env['gpu']})", "",
             f"{env['time']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}; full-size random weights" if not report["tiny"] else
             f"{env['time']}; tiny random-weight models on the CPU: the numbers mean nothing", ""]
    for name, row in report["rows"].items():
        lines.append(f"## {name} ({row.get('seconds', 0):.0f} s)")
        if "error" in row or "skipped" in row:
            lines += ["", f"{row.get('skipped') or row['error']}", ""]
            continue
        if name.startswith("wan"):
            lines += ["", f"`{row['result']['command']}`", "", row["result"]["table"], ""]
        else:
            for label, entry in row["result"].items():
                lines += ["", f"{label}: `{entry['command']}`", "", entry["table"], ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    from utils.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_bench.json", json.loads(json.dumps(report, default=str)))
    (out / "gpu_bench.md").write_text(markdown(report) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model-configs", default=".gpu-bench/model-configs",
                        help="architecture configs of Zeroscope / ModelScope (scripts/prepare_gpu_bench.sh copies them)")
    parser.add_argument("--out", default="outputs/gpu_bench")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip rows that would start after this")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny models")
    args = parser.parse_args(argv)
    if args.tiny:
        args.warmup, args.repeats = 0, 1
    elif not Path(args.model_configs).is_dir():
        print(f"error: no model configs at {args.model_configs}; run scripts/prepare_gpu_bench.sh first",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"tiny": args.tiny, "environment": environment(), "argv": argv if argv is not None else sys.argv[1:],
              "rows": {}}
    failures = 0
    for name in args.rows:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            report["rows"][name] = {"skipped": f"skipped: {elapsed:.0f} s spent, over the {args.budget_s:.0f} s budget"}
            write(report, Path(args.out))
            continue
        print(f"== {name} (at {elapsed:.0f} s)", flush=True)
        row_start = time.perf_counter()
        try:
            result = wan_row(name, args) if name.startswith("wan") else unet_row(name, args)
            report["rows"][name] = {"result": result, "seconds": time.perf_counter() - row_start}
        except Exception as error:  # one row's failure (out of memory, a missing kernel) must not lose the others
            failures += 1
            report["rows"][name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
                                    "seconds": time.perf_counter() - row_start}
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            _free_gpu()
        write(report, Path(args.out))
        print(markdown({**report, "rows": {name: report["rows"][name]}}).split("\n", 3)[-1], flush=True)
    report["total_s"] = time.perf_counter() - started
    write(report, Path(args.out))
    print(f"wrote {Path(args.out) / 'gpu_bench.json'} and gpu_bench.md in {report['total_s']:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
