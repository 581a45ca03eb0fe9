"""The Makefile's set-up refuses a disk too full for the environment up front, naming the space and the need."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_install_refuses_a_disk_without_room_for_the_environment(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")

    def install(min_free_gb: int) -> subprocess.CompletedProcess:
        # PYTHON=false: a set-up that passes the check fails at once at creating the venv, installing nothing
        return subprocess.run(["make", "install", f"MIN_FREE_GB={min_free_gb}", "PYTHON=false"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    refused = install(10**9)
    assert refused.returncode != 0
    assert "cannot set up .venv:" in refused.stdout and "needs about 1000000000 GB (MIN_FREE_GB)" in refused.stdout
    assert not (tmp_path / ".venv").exists()

    passed = install(0)  # room enough: the check lets the set-up go on, which then fails at `false -m venv`
    assert passed.returncode != 0 and "cannot set up" not in passed.stdout
