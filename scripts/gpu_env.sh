# Sourced by the GPU scripts (gpu_bench.sh, gpu_train_shapes.sh): the project and the wheels that
# scripts/prepare_gpu_bench.sh put in .gpu-bench/wheels (diffusers, transformers, ...) on PYTHONPATH, installed
# into /tmp/lvd-site without an index (the GPU machine has no internet; it has torch and the rest), and the CLIP
# BPE file it put in .gpu-bench/clip.
bench_dir=${GPU_BENCH_DIR:-.gpu-bench}
python_bin=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$bench_dir/clip/open_clip" ] && export PYTHONPATH="$PYTHONPATH:$PWD/$bench_dir/clip"
if [ -z "${tiny:-}" ] && ls "$bench_dir"/wheels/*.whl >/dev/null 2>&1; then
  "$python_bin" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lvd-site \
    "$bench_dir"/wheels/*.whl
  export PYTHONPATH="$PWD:/tmp/lvd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$python_bin" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
