"""What the Dockerfile relies on: the wheel built from pyproject.toml carries every package and data file
the plugin and controller load at run time, and the `partita` entry point; the image runs non-root."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                        "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [whl] = out.glob("partita-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_has_the_runtime_data_and_entry_point(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for needed in ("driver/nvml/models.yaml", "controller/sandbox/default-cluster.yaml",
                   "driver/kubeletapi/dra/v1/api_pb2.py", "driver/plugin/mps_standin.py", "controller/webhook.py"):
        assert needed in names, needed
    assert not any(n.startswith("tests/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "partita = controller.cli:main" in wheel.read(entry).decode()


def test_dockerfile_installs_from_pyproject_and_runs_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert "COPY requirements-runtime.lock pyproject.toml README.md ./" in lines
    installs = [ln for ln in text.replace("\\\n", " ").splitlines() if "pip install" in ln]
    # every install is the hashed runtime lock or our own wheel without dependencies
    for ln in installs:
        for cmd in ln.split("&&"):
            if "pip install" in cmd:
                assert ("--require-hashes" in cmd and "requirements-runtime.lock" in cmd) or \
                       ("--no-deps" in cmd and "partita-" in cmd), cmd
    assert "--upgrade pip" not in text
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")
    assert 'ENTRYPOINT ["partita"]' in lines
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".cache"} <= set(ignored)
