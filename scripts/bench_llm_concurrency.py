"""Benchmark: stage-1 LLM requests one at a time versus ``--concurrency N``.

Starts the fake OpenAI-compatible server of the tests (``tests/openai_server.py``) answering every
request after ``--delay-s`` seconds (1 s, a typical GPT-4 latency for a short layout is several
seconds, so this is if anything favourable to the sequential run), then runs the real CLI,
``python prompt_batch.py --auto-query --always-save --no-visualize`` on the ``--prompt-type`` list
with a fresh cache, sequentially and with each ``--concurrency``. Prints the wall times and the
speed-ups and writes them as JSON.

``--sequential-prompts K`` times the sequential run on the first K prompts only and extrapolates
to the whole list (process start timed alone, the rest scaled linearly; the JSON says so); by
default the whole list is run.

    python scripts/bench_llm_concurrency.py --concurrency 16 32 --json-out outputs/bench_llm_concurrency.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prompt import get_prompts
from utils.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_fake_server_module():
    """The test suite's fake server, loaded by path (``tests/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("openai_server", REPO_ROOT / "tests" / "openai_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_prompt_batch(server_module, *, prompt_type: str, concurrency: int, num_prompts: int | None,
                     delay_s: float) -> dict:
    """One timed ``prompt_batch.py`` run against a fresh server and a fresh cache."""
    with tempfile.TemporaryDirectory() as cache_dir, server_module.FakeOpenAIServer(delay_s=delay_s) as server:
        command = [sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompt-type", prompt_type,
                   "--model", "bench-model", "--template_version", "v0.1", "--auto-query", "--always-save",
                   "--no-visualize", "--quiet", "--cache-dir", cache_dir, "--llm-base-url", server.base_url,
                   "--concurrency", str(concurrency)]
        if num_prompts is not None:
            command += ["--num_prompts", str(num_prompts)]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        if completed.returncode != 0:
            raise RuntimeError(f"prompt_batch.py exited {completed.returncode}:\n"
                               f"{completed.stdout}\n{completed.stderr}")
        cache_files = list(Path(cache_dir).glob("cache_*.json"))
        cache_text = cache_files[0].read_text() if cache_files else "{}"
        num_replies = sum(len(v) for v in json.loads(cache_text).values())
        return {"concurrency": concurrency, "num_prompts": num_replies, "wall_s": round(wall_s, 3),
                "requests": server.request_count, "max_in_flight": server.max_in_flight,
                "cache_text": cache_text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-type", default="lvd")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--delay-s", type=float, default=1.0, help="server time per reply")
    parser.add_argument("--sequential-prompts", type=int, default=None,
                        help="time the sequential run on this many prompts and extrapolate (default: all)")
    parser.add_argument("--json-out", type=Path, default=REPO_ROOT / "outputs" / "bench_llm_concurrency.json")
    args = parser.parse_args(argv)

    server_module = load_fake_server_module()
    total = len(get_prompts(args.prompt_type))
    runs = []
    for concurrency in args.concurrency:
        result = run_prompt_batch(server_module, prompt_type=args.prompt_type, concurrency=concurrency,
                                  num_prompts=None, delay_s=args.delay_s)
        print(f"concurrency {concurrency:>3}: {result['num_prompts']} prompts in {result['wall_s']:.1f} s "
              f"(max {result['max_in_flight']} requests in flight)", flush=True)
        runs.append(result)
    sequential = run_prompt_batch(server_module, prompt_type=args.prompt_type, concurrency=1,
                                  num_prompts=args.sequential_prompts, delay_s=args.delay_s)
    measured = sequential["num_prompts"]
    extrapolated = measured < total
    sequential_s = sequential["wall_s"]
    startup_s = None
    if extrapolated:
        # Process start and imports are paid once per run: time them alone, scale the rest.
        startup_s = run_prompt_batch(server_module, prompt_type=args.prompt_type, concurrency=1,
                                     num_prompts=0, delay_s=args.delay_s)["wall_s"]
        sequential_s = startup_s + (sequential["wall_s"] - startup_s) * total / measured
    print(f"concurrency   1: {measured} prompts in {sequential['wall_s']:.1f} s"
          + (f", extrapolated to {total} prompts: {sequential_s:.1f} s" if extrapolated else ""), flush=True)
    for result in runs:
        result["speedup"] = round(sequential_s / result["wall_s"], 2)
        if not extrapolated:
            # The cache a concurrent run writes must be the one a sequential run writes.
            result["cache_equals_sequential"] = result["cache_text"] == sequential["cache_text"]
        print(f"speed-up at concurrency {result['concurrency']}: {result['speedup']:.1f}x", flush=True)
    report = {
        "benchmark": "stage-1 LLM request concurrency (prompt_batch.py against a local fake server)",
        "prompt_type": args.prompt_type, "num_prompts": total, "server_delay_s": args.delay_s,
        "sequential": {"measured_prompts": measured, "measured_wall_s": sequential["wall_s"],
                       "wall_s": round(sequential_s, 3), "extrapolated": extrapolated,
                       "startup_wall_s": startup_s,
                       "requests": sequential["requests"]},
        "concurrent": [{k: v for k, v in r.items() if k != "cache_text"} for r in runs],
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    atomic_write_json(args.json_out, report)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
