#!/usr/bin/env bash
# Train the LVD-Shapes UNet (the recipe of scripts/train_shapes.py) on one GPU machine without internet, then
# measure it with the shapes benchmark there; what comes back fits the device tool's limits (files <= 16 MiB).
#   bash scripts/prepare_gpu_bench.sh                 # beforehand, where pip works: fills .gpu-bench/wheels
#   bash scripts/gpu_train_shapes.sh OUT [train_shapes.py flags ...]     # on the GPU machine, from the repo root
# Defaults: --device cuda --workers 12 --threads 4 --max-minutes 7 --export-partial (later flags win). Writes
# OUT/train.log, OUT/unet3d_unet.tar and OUT/unet3d_rest.tar (unpack both into shapes/weights/unet3d/ here:
# `tar xf OUT/unet3d_unet.tar -C shapes/weights && tar xf OUT/unet3d_rest.tar -C shapes/weights`) and, unless
# GPU_TRAIN_BENCH_PER_TASK=0, OUT/bench.md / OUT/bench.json (scripts/bench_shapes.py on the new weights).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_train_shapes.sh OUT [train_shapes.py flags ...]}
shift
mkdir -p "$out"
. scripts/gpu_env.sh
work=${GPU_TRAIN_DIR:-/tmp/lvd-train}
"$python_bin" scripts/train_shapes.py --family unet3d --device cuda --workers 12 --threads 4 --max-minutes 7 \
  --export-partial --checkpoint-dir "$work/checkpoint" --out "$work/unet3d" "$@" 2>&1 | tr '\r' '\n' \
  | grep -v '^\s*$' | awk 'NR % 50 == 1 || /wrote|error|stopped|Traceback|Error/' | tee "$out/train.log"
tar cf "$out/unet3d_unet.tar" -C "$work" unet3d/unet
tar cf "$out/unet3d_rest.tar" -C "$work" --exclude unet3d/unet unet3d
per_task=${GPU_TRAIN_BENCH_PER_TASK:-4}
if [ "$per_task" != 0 ]; then
  "$python_bin" scripts/bench_shapes.py --per-task "$per_task" --model-path "$work/unet3d" --out "$work/bench" \
    > "$out/bench.log" 2>&1 || tail -20 "$out/bench.log"
  cp "$work/bench/results.md" "$out/bench.md" && cp "$work/bench/results.json" "$out/bench.json" || true
fi
ls -la "$out"
