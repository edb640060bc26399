"""``scripts/_setup.sh``: installs what is missing, and says only what it really does.

Run on a copy of the script beside a stand-in ``.venv/bin/python`` that records its calls
(pip installs nothing here) and can or cannot import ``llama_cpp``; ``espeak-ng`` and
``initdb`` are found on the PATH, so no Debian package is asked for."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
if [ "$1" = -c ] && [ "$2" = 'import llama_cpp' ]; then
  [ -e "$(dirname "$0")/../llama_cpp_built" ]
  exit $?
fi
exit 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_setup.sh", tmp_path / "scripts" / "_setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("espeak-ng", "initdb"):  # found: no Debian package is asked for
        (tools / tool).write_text("#!/bin/sh\nexit 0\n")
        (tools / tool).chmod(0o755)
    return tmp_path


def stamp(project: Path) -> str:
    return hashlib.sha256((project / "pyproject.toml").read_bytes()).hexdigest()[:32]


def setup(project: Path, extras: str) -> tuple[str, list[str]]:
    """``setup_project EXTRAS`` as scripts/chat runs it; returns what it said and the venv's calls."""
    log = project / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", "-c", f'set -euo pipefail; source scripts/_setup.sh; setup_project {extras}'],
                          cwd=project, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{project / 'tools'}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.stderr, calls


def test_after_the_tests_set_up_the_chat_installs_nothing(project):
    (project / ".venv" / ".installed-dev").write_text(stamp(project) + "\n")
    (project / ".venv" / "llama_cpp_built").touch()
    said, calls = setup(project, "all")
    assert said == "" and not any("pip" in c for c in calls), (said, calls)
    assert (project / ".venv" / ".installed-all").read_text().strip() == stamp(project)
    assert setup(project, "all") == ("", [])  # and from then on, nothing at all


def test_another_set_of_extras_says_so_and_no_compiling_when_llama_cpp_is_built(project):
    (project / ".venv" / ".installed").write_text(stamp(project) + "\n")  # `pip install -e .` only
    (project / ".venv" / "llama_cpp_built").touch()
    said, calls = setup(project, "all")
    assert "installing the chat's extras into .venv" in said
    assert "compil" not in said and "5 minutes" not in said
    assert any(c.startswith("-m pip install") and c.endswith(f"{project}[all]") for c in calls), calls
    (project / "pyproject.toml").write_text((project / "pyproject.toml").read_text() + "\n# changed\n")
    said, _ = setup(project, "dev")
    assert "pyproject.toml changed: updating the project in .venv" in said and "compil" not in said


def test_a_fresh_venv_says_it_compiles_llama_cpp(project):
    said, calls = setup(project, "all")
    assert "installing the project into .venv; the first time this compiles llama.cpp" in said
    assert any(c.startswith("-m pip install") for c in calls)
