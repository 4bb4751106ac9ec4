"""A non-editable install (``pip install .``) works from any folder: templates ship as package data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "img_generations", "outputs",
                              "eval_outputs", ".pytest_cache", ".cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel from a copy of the source and installed into a bare folder."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=SKIP)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("lvd-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing may read the source tree any more
    return root


def run_installed(installed: Path, *args: str) -> subprocess.CompletedProcess:
    workdir = installed / "work"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["PYTHONPATH"] = str(installed / "site")  # before the venv's editable finder of the repo
    return subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_non_editable_install_has_the_templates(installed):
    done = run_installed(installed, "-c", "import prompt; t = prompt.load_template('v0.1'); "
                                          "print(prompt.__file__); print(prompt.available_templates()); "
                                          "print(len(t.examples))")
    assert done.returncode == 0, done.stderr
    where, templates, examples = done.stdout.splitlines()
    assert where.startswith(str(installed / "site")) and templates == "['v0.1']" and examples == "3"


@pytest.mark.slow
def test_a_non_editable_install_runs_stage_one(installed):
    listed = run_installed(installed, "-m", "prompt_batch", "--prompt-type", "lvd", "--list-prompts")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 500
    # Manual mode: the chat is built from the installed template, the pasted reply saved.
    reply = ("Reasoning: r.\n\n" + "\n".join(f"Frame {k}: [{{'id': 0, 'name': 'cat', 'box': [{20 * k}, 100, 50, 50]}}]"
                                             for k in range(1, 7)) + "\nBackground keyword: room\n")
    done = subprocess.run([sys.executable, "-m", "prompt_batch", "--prompts", "A cat walks", "--model", "m",
                           "--template_version", "v0.1", "--always-save", "--no-visualize", "--quiet"],
                          cwd=installed / "work", input=reply, capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
                               "PYTHONPATH": str(installed / "site")})
    assert done.returncode == 0, done.stderr
    assert "Caption: A cat walks" in done.stdout and "1 new, 0 failed" in done.stdout
    assert (installed / "work" / "cache" / "cache_custom_v0.1_m.json").is_file()
