#!/usr/bin/env bash
# The one command that measures every GPU row of docs/BENCHMARKS.md (Zeroscope weak preset, ModelScope-256
# benchmark preset with all iterations, Wan 2.1 1.3B at 480x832x81 and 320x576x33; each with and without
# --low-memory) with full-size random weights, on one H100 / H200 without internet, in about 5-8 minutes.
#   bash scripts/prepare_gpu_bench.sh            # beforehand, where pip works: fills .gpu-bench/
#   bash scripts/gpu_bench.sh OUT_DIR            # on the GPU machine, from the repo root (OUT_DIR: outputs/gpu_bench)
#   bash scripts/gpu_bench.sh --tiny OUT_DIR     # CPU dry run on the tiny models (what tests/test_wan_gpu_bench.py runs)
# It installs .gpu-bench/wheels into /tmp/lvd-site (no index, no dependencies: the machine has the rest), then runs
# scripts/gpu_bench.py, which writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md after every row.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=
out=outputs/gpu_bench
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=--tiny ;;
    *) out=$arg ;;
  esac
done
. scripts/gpu_env.sh
exec "$python_bin" scripts/gpu_bench.py $tiny --model-configs "$bench_dir/model-configs" --out "$out"
