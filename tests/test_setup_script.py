"""scripts/setup.sh prints one line per stage (run with stand-ins for python and pip: nothing is installed)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_setup_prints_a_line_before_each_stage(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-app.txt", "requirements-app-dev.txt"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    _executable(bin_dir / "python", "#!/bin/sh\necho 2.13.0+cpu\n")  # answers the torch version query
    _executable(bin_dir / "pip", '#!/bin/sh\necho "pip $*"\n')
    done = subprocess.run(["bash", "scripts/setup.sh", "--dev"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    pip_lines = [i for i, line in enumerate(lines) if line.startswith("pip install")]
    assert len(pip_lines) == 7  # torch, requirements, open-clip, the project, dev tools, the studio's two
    for i in pip_lines:  # each install is announced by the line just before it
        assert lines[i - 1].startswith("setup: installing"), lines[i - 1]
    assert lines[0] == "setup: using the existing .venv" and lines[-1] == "setup: done: use .venv/bin/python"
    assert "torch pinned to 2.13.0" in done.stdout


def test_the_torch_version_is_read_without_importing_torch(tmp_path):
    # Issue 17, item 17: `import torch` before numpy is installed printed "Failed to initialize NumPy".
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-app.txt", "requirements-app-dev.txt"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    _executable(bin_dir / "python", f'#!/bin/sh\necho "$@" >> {tmp_path}/python_calls\necho 2.13.0+cpu\n')
    _executable(bin_dir / "pip", '#!/bin/sh\necho "pip $*"\n')
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "python_calls").read_text()
    assert "import torch" not in calls and "importlib.metadata" in calls


def test_the_readme_demo_evaluation_report_is_ignored_by_git():
    # Issue 17, item 17: the README's demo evaluation wrote eval_report/ in the repository root.
    done = subprocess.run(["git", "check-ignore", "-q", "eval_report/index.html"], cwd=REPO_ROOT)
    assert done.returncode == 0
