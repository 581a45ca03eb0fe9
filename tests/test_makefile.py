"""The Makefile's set-up: it refuses a disk too full for the environment up front, naming the space and the need,
it works from a folder whose path holds a space, and it mends a venv an interrupted set-up or a system upgrade broke."""

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


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_install_runs_from_a_path_with_a_space(tmp_path):
    root = tmp_path / "my projects" / "ardetect"
    root.mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    (root / "pyproject.toml").write_text("")
    # a stand-in for the venv's python: logs each call; `pip show onnxruntime` finds nothing, as on a good set-up
    log = tmp_path / "calls.log"
    fake = root / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\ncase "$*" in *" show "*) exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    done = subprocess.run(["make", "install", "MIN_FREE_GB=0"], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert calls == ["-c ", "-m pip --version", "-m pip install -q --upgrade pip", "-m pip install -q -e .[dev]",
                     "-m pip show -q onnxruntime"]
    assert (root / ".venv" / ".installed-stamp").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("broken", ["no pip", "interpreter gone"])
def test_install_mends_a_venv_left_broken(tmp_path, broken):
    """Ctrl-C while `python -m venv` runs ensurepip leaves a venv with python and no pip (tried: every time); a system
    upgrade can take away the interpreter a venv links to. Either way `make install` must mend it, saying so, where it
    used to fail the same way on every later run ("No module named pip") until the user removed the venv by hand."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "Makefile", root / "Makefile")
    (root / "pyproject.toml").write_text("")
    log = tmp_path / "calls.log"
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # the venv's python once mended: logs each call; it has pip only once ensurepip has run or the venv is made anew
    has_pip = tmp_path / "has-pip"
    venv_python = (f'#!/bin/sh\necho "venv $*" >> "{log}"\ncase "$*" in\n'
                   f'  "-m pip --version") [ -e "{has_pip}" ] || exit 1;;\n'
                   f'  "-m ensurepip "*) touch "{has_pip}";;\n'
                   '  *" show "*) exit 1;;\nesac\nexit 0\n')
    # the system's python: `-m venv --clear .venv` writes the venv's python (with pip, as venv installs it)
    system = tmp_path / "python3"
    system.write_text(f'#!/bin/sh\necho "system $*" >> "{log}"\ncat > "{bin_dir}/python" <<\'EOF\'\n{venv_python}EOF\n'
                      f'chmod +x "{bin_dir}/python"\ntouch "{has_pip}"\n')
    system.chmod(0o755)
    python = bin_dir / "python"
    if broken == "no pip":
        python.write_text(venv_python)
        python.chmod(0o755)
    else:
        python.symlink_to(tmp_path / "python3.9-removed")
    done = subprocess.run(["make", "install", "MIN_FREE_GB=0", f"PYTHON={system}"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    installs = ["venv -m pip install -q --upgrade pip", "venv -m pip install -q -e .[dev]", "venv -m pip show -q onnxruntime"]
    if broken == "no pip":
        assert ".venv has no pip (its set-up was interrupted?): installing it with ensurepip" in done.stdout
        assert calls == ["venv -c ", "venv -m pip --version", "venv -m ensurepip --upgrade", *installs]
    else:
        assert ".venv/bin/python does not run (its interpreter is gone?): making .venv again" in done.stdout
        assert calls == ["system -m venv --clear .venv", "venv -m pip --version", *installs]
    assert (root / ".venv" / ".installed-stamp").is_file()
    again = subprocess.run(["make", "install", "MIN_FREE_GB=0", f"PYTHON={system}"], cwd=root, capture_output=True,
                           text=True, timeout=60)  # mended: nothing left to do
    assert again.returncode == 0 and log.read_text().splitlines() == calls, again.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_sigterm_to_make_run_reaches_the_pipeline(tmp_path):
    """`kill` of `make run`, and `docker stop` of the pipeline's image (its CMD is `make run`), send SIGTERM to make:
    the recipe must hand it to `ard pipeline run`, which then stops its stage cleanly, not leave it running alone."""
    import os
    import signal
    import time

    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "Makefile", root / "Makefile")
    (root / "pyproject.toml").write_text("")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"  # the set-up's stand-in, as above
    python.write_text('#!/bin/sh\ncase "$*" in *" show "*) exit 1;; esac\nexit 0\n')
    python.chmod(0o755)
    said = tmp_path / "ard.log"
    ard = bin_dir / "ard"  # stands in for `ard pipeline run`: says it started, then what signal ended it
    ard.write_text(f'#!/bin/sh\ntrap \'echo "TERM $$" >> "{said}"; exit 143\' TERM\necho "started $$ $*" >> "{said}"\n'
                   'while :; do sleep 0.1; done\n')
    ard.chmod(0o755)
    make = subprocess.Popen(["make", "run", "MIN_FREE_GB=0"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (said.exists() and "started" in said.read_text()) and time.monotonic() < deadline and make.poll() is None:
            time.sleep(0.1)
        assert said.exists() and "started" in said.read_text(), make.communicate(timeout=10)[0]
        os.kill(make.pid, signal.SIGTERM)  # to make alone, as docker stop and kill send it
        out = make.communicate(timeout=30)[0]
    finally:  # whatever went wrong, nothing of the test's is left running (its own session: one group)
        try:
            os.killpg(make.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        make.wait(timeout=10)
    lines = said.read_text().splitlines()
    started, ended = lines[0].split(), lines[-1].split()
    assert started[2:] == ["pipeline", "run"] and ended == ["TERM", started[1]], lines
    assert make.returncode != 0, out
