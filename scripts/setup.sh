#!/usr/bin/env bash
# Create .venv and install the project. `--app` also installs the studio's dependencies
# (requirements-app.txt); `--dev` everything the tests need: the test tools, the studio's dependencies
# and its browser-test tools (requirements-app-dev.txt).
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build); the default is the CPU wheel CI uses.
# Prints one line per stage (pip itself stays quiet), so a slow install shows where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
app=0
for flag in "$@"; do
  case "$flag" in
    --dev) dev=1; app=1 ;;
    --app) app=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dev] [--app]" >&2; exit 2 ;;
  esac
done
step() { echo "setup: $*"; }
python_bin=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then
  step "using the existing .venv"
else
  step "creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi
. .venv/bin/activate
step "installing ${TORCH_SPEC:-torch==2.13.0} (about 20 s for the CPU wheel)"
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# From the installed metadata: importing torch before numpy is installed prints "Failed to initialize NumPy".
torch_version=$(python -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')
step "installing requirements.txt with torch pinned to $torch_version (about 35 s)"
pip install -q -r requirements.txt -c <(echo "torch==$torch_version")
# Only for its CLIP BPE vocabulary file (open_clip itself needs torchvision, which we avoid).
step "installing open-clip-torch without dependencies (for its CLIP vocabulary file)"
pip install -q --no-deps "open-clip-torch>=2.24"
step "installing the project (editable)"
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || pip install -q --no-deps -e .
if [ "$dev" = 1 ]; then
  step "installing the test tools (requirements-dev.txt)"
  pip install -q -r requirements-dev.txt -c <(echo "torch==$torch_version")
fi
if [ "$app" = 1 ]; then
  step "installing the studio's dependencies (requirements-app.txt)"
  pip install -q -r requirements-app.txt -c <(echo "torch==$torch_version")
  if [ "$dev" = 1 ]; then
    step "installing the studio's browser-test tools (requirements-app-dev.txt)"
    pip install -q -r requirements-app-dev.txt -c <(echo "torch==$torch_version")
  fi
fi
step "done: use .venv/bin/python"
