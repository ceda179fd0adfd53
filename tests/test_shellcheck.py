"""Every shell script users or CI run (hack/**, .ci/run) passes ShellCheck."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def scripts() -> list[Path]:
    found = sorted(p for p in (REPO / "hack").rglob("*.sh"))
    found.append(REPO / ".ci" / "run")
    return found


def test_there_are_scripts_to_check() -> None:
    names = {p.relative_to(REPO).as_posix() for p in scripts()}
    assert {"hack/test.sh", "hack/sandbox.sh", "hack/setup.sh", ".ci/run"} <= names
    assert any(n.startswith("hack/kind/") for n in names)


@pytest.mark.parametrize("script", scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_is_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("PARTITA_REQUIRE_TOOLS") == "1":
            pytest.fail("shellcheck is missing although PARTITA_REQUIRE_TOOLS=1 (Debian package shellcheck)")
        pytest.skip("shellcheck not installed (hack/install-test-packages.sh installs it)")
    r = subprocess.run([shellcheck, "--external-sources", "--severity=style", str(script)], capture_output=True,
                       text=True, cwd=REPO)   # source= directives are relative to the repository root
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
