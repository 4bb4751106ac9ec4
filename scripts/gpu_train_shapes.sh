#!/usr/bin/env bash
# Train the LVD-Shapes models (the recipe of scripts/train_shapes.py), both families at once on one GPU machine
# without internet, and pack what comes back within the device tool's limits (files <= 16 MiB, 8 files).
#   bash scripts/prepare_gpu_bench.sh                 # beforehand, where pip works: fills .gpu-bench/wheels
#   bash scripts/gpu_train_shapes.sh OUT [train_shapes.py flags for every family ...]   # on the GPU machine
# Each family trains in its own process (GPU_TRAIN_FAMILIES, default "unet3d wan"), with the flags below then
# the given ones (later flags win): a fixed budget of denoiser minutes over which the learning rate anneals,
# bigger batches than the CPU default, and video drawing in worker processes. Writes OUT/train_<family>.log,
# OUT/<family>_denoiser.tar and OUT/<family>_rest.tar; unpack both into shapes/weights/ here:
#   for f in OUT/*.tar; do tar xf "$f" -C shapes/weights; done
# and, with GPU_TRAIN_BENCH_PER_TASK=N (default 0: measure on the CPU afterwards), OUT/bench_<family>.md
# (scripts/bench_shapes.py on the new weights).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_train_shapes.sh OUT [train_shapes.py flags ...]}
shift
mkdir -p "$out"
. scripts/gpu_env.sh
work=${GPU_TRAIN_DIR:-/tmp/lvd-train}
families=${GPU_TRAIN_FAMILIES:-unet3d wan}
declare -A defaults=(
  [unet3d]="--steps 100000 --batch-size 16 --workers 6 --denoiser-minutes 7.0 --max-minutes 7.8"
  [wan]="--steps 100000 --batch-size 8 --vae-steps 500 --workers 8 --denoiser-minutes 6.0 --max-minutes 7.8"
)
declare -A denoiser=([unet3d]=unet [wan]=transformer)

train() {
  local family=$1
  shift
  # shellcheck disable=SC2086  # the defaults are words
  "$python_bin" scripts/train_shapes.py --family "$family" --device cuda --threads 1 --export-partial \
    --checkpoint-every 1000 ${defaults[$family]} --checkpoint-dir "$work/checkpoint-$family" --out "$work/$family" \
    "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
    | awk 'NR % 200 == 1 || /wrote|error|stopped|Traceback|Error|resumed/' > "$out/train_$family.log"
  tar cf "$out/${family}_denoiser.tar" -C "$work" "$family/${denoiser[$family]}"
  tar cf "$out/${family}_rest.tar" -C "$work" --exclude "$family/${denoiser[$family]}" "$family"
}

pids=()
for family in $families; do
  train "$family" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
for family in $families; do
  tail -3 "$out/train_$family.log"
done
per_task=${GPU_TRAIN_BENCH_PER_TASK:-0}
if [ "$per_task" != 0 ]; then
  for family in $families; do
    "$python_bin" scripts/bench_shapes.py --family "$family" --per-task "$per_task" --model-path "$work/$family" \
      --out "$work/bench-$family" > "$out/bench_$family.log" 2>&1 || tail -20 "$out/bench_$family.log"
    cp "$work/bench-$family/results.md" "$out/bench_$family.md" || true
  done
fi
ls -la "$out"
exit $status
