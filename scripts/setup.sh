#!/usr/bin/env bash
# Create .venv and install the project. `--dev` also installs the test tools.
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build); the default is the CPU wheel CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
. .venv/bin/activate
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
torch_version=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
pip install -q -r requirements.txt -c <(echo "torch==$torch_version")
# Only for its CLIP BPE vocabulary file (open_clip itself needs torchvision, which we avoid).
pip install -q --no-deps "open-clip-torch>=2.24"
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || pip install -q --no-deps -e .
if [ "${1:-}" = "--dev" ]; then
  pip install -q -r requirements-dev.txt -c <(echo "torch==$torch_version")
fi
