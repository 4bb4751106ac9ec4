#!/usr/bin/env bash
# Prepare, on a machine where pip reaches PyPI, what scripts/gpu_bench.sh needs on a GPU machine without internet
# (Python 3.12, x86-64; it has torch, transformers, accelerate, numpy, regex, huggingface_hub, tokenizers, safetensors,
# imageio, joblib, tqdm, pillow, scipy, but no diffusers): into .gpu-bench/ (git-ignored, about 25 MB),
#   wheels/         diffusers 0.42.1 and transformers 5.24.0 (the project's pins) and the small pure-python packages
#                   the project imports that the machine lacks (easydict, inflect and its three dependencies);
#   model-configs/  the architecture configs (no weights) of Zeroscope v2 576w and ModelScope 1.7B, from
#                   ../shared/model-configs or the folder given as the first argument. Wan's are embedded in models/wan.py;
#   clip/open_clip/ the CLIP BPE vocabulary file alone (models/tokenizer.py finds it there through PYTHONPATH; the
#                   machine has no open_clip, and the shapes UNet's tokenizer needs it).
# Not carried: openai (stage 1 only) and imageio-ffmpeg (mp4 writing; its wheel alone is 68 MB, over the 64 MiB
# that travels to the GPU machine): the benchmark needs neither.
#   bash scripts/prepare_gpu_bench.sh [CONFIGS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
configs=${1:-../shared/model-configs}
dir=${GPU_BENCH_DIR:-.gpu-bench}
python_bin=${PYTHON:-.venv/bin/python}
[ -x "$python_bin" ] || python_bin=python3
rm -rf "$dir/wheels" "$dir/model-configs" "$dir/clip"
mkdir -p "$dir/wheels" "$dir/model-configs" "$dir/clip/open_clip"
"$python_bin" - "$dir/clip/open_clip" <<'PY'
import shutil, sys
from models.tokenizer import find_clip_bpe_file
shutil.copy(find_clip_bpe_file(), sys.argv[1])
PY
"$python_bin" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dir/wheels" \
  diffusers==0.42.1 transformers==5.24.0 easydict==1.14 inflect==7.6.0 jaraco.functools==4.6.0 \
  more_itertools==11.2.1 typeguard==4.6.1
for name in cerspense__zeroscope_v2_576w damo-vilab__text-to-video-ms-1.7b; do
  if [ ! -d "$configs/$name" ]; then
    echo "error: $configs/$name not found (pass the folder of the model configs as the first argument)" >&2
    exit 2
  fi
  cp -r "$configs/$name" "$dir/model-configs/"
done
du -sh "$dir"
ls "$dir/wheels"
