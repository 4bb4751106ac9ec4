"""Fast paths import no heavy library before it is needed (issue 17, item 6): ``--help`` of the CLIs,
``generate.py --dry-run`` (transformers only, for the CLIP tokenizer) and missing weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")
# Runs a script as __main__ and prints which heavy libraries it imported.
PROBE = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "except SystemExit:\n    pass\nprint('IMPORTED', sorted(m for m in %r if m in sys.modules))" % (HEAVY,))


def _imported(tmp_path, *argv) -> tuple[list[str], str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    line = [line for line in done.stdout.splitlines() if line.startswith("IMPORTED")][-1]
    return eval(line.split(" ", 1)[1]), done.stderr


@pytest.mark.parametrize("argv", [["generate.py", "--help"], ["scripts/upsample.py", "--help"],
                                  ["prompt_batch.py", "--help"]], ids=["generate", "upsample", "prompt_batch"])
def test_help_imports_no_heavy_library(tmp_path, argv):
    assert _imported(tmp_path, *argv)[0] == []


def test_dry_run_imports_only_the_tokenizer_library(tmp_path):
    imported, _ = _imported(tmp_path, "generate.py", "--run-model", "lvd_tiny", "--prompt-type", "demo", "--model",
                            "handwritten", "--template_version", "v0.1", "--dry-run")
    assert imported == ["transformers"]  # the CLIP tokenizer checks the 77-token limit; no torch, no diffusers


def test_missing_weights_are_reported_before_any_heavy_import(tmp_path):
    imported, err = _imported(tmp_path, "generate.py", "--run-model", "lvd_zeroscope", "--prompt-type", "demo",
                              "--model", "handwritten", "--template_version", "v0.1", "--output-dir", str(tmp_path))
    assert imported == [] and "cerspense/zeroscope_v2_576w" in err and "--model-path DIR" in err
