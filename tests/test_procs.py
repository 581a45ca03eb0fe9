"""The data stages' worker count follows the cores this process may use, not the machine's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ardetect.data import world
from ardetect.procs import usable_cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call")
def test_usable_cores_follow_the_affinity():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from ardetect.procs import usable_cores; print(usable_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_usable_cores_without_an_affinity_call(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1


def test_world_workers_zero_means_the_usable_cores(monkeypatch):
    """workers: 0 on a process limited to one core renders in the process itself, with no pool."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    pool = []
    monkeypatch.setattr(world, "fork_context", lambda: pool.append(1) or pytest.fail("a pool was started on one usable core"))
    assert world._run(lambda x: (x, os.getpid()), [1, 2, 3], 0, "probe") == [(1, os.getpid()), (2, os.getpid()), (3, os.getpid())]
    assert not pool
