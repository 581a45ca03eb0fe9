"""The data stages' worker count and a stage's threads follow the cores this process may use (its affinity and its
cgroup's CPU quota), not the machine's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ardetect import procs
from ardetect.data import world
from ardetect.procs import cgroup_cpu_quota, usable_cores

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux call")
def test_usable_cores_follow_the_affinity(monkeypatch):
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from ardetect.procs import usable_cores; print(usable_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: None)  # the machine's own quota, if any, aside
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_usable_cores_without_an_affinity_call(monkeypatch):
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: None)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1


def test_world_workers_zero_means_the_usable_cores(monkeypatch):
    """workers: 0 on a process limited to one core renders in the process itself, with no pool."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: None)
    pool = []
    monkeypatch.setattr(world, "fork_context", lambda: pool.append(1) or pytest.fail("a pool was started on one usable core"))
    assert world._run(lambda x: (x, os.getpid()), [1, 2, 3], 0, "probe") == [(1, os.getpid()), (2, os.getpid()), (3, os.getpid())]
    assert not pool


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root, own = tmp_path / "fs", tmp_path / "cgroup"
    _write(own, "0::/jobs/one\n")
    _write(root / "jobs" / "one" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, own) is None  # no quota anywhere on the path
    _write(root / "jobs" / "cpu.max", "250000 100000\n")
    assert cgroup_cpu_quota(root, own) == 2.5  # a parent's quota binds its children
    _write(root / "jobs" / "one" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(root, own) == 1.5
    _write(root / "cpu.max", "50000 100000\n")  # a container's own cgroup mounted as the root
    assert cgroup_cpu_quota(root, own) == 0.5


def test_cgroup_v1_quota_in_a_container_view(tmp_path):
    """cgroup v1 inside a container: /proc/self/cgroup names the host's path, the cpu controller's mount is the container's cgroup."""
    root, own = tmp_path / "fs", tmp_path / "cgroup"
    _write(own, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    mount = root / "cpu,cpuacct"
    _write(mount / "cpu.cfs_quota_us", "-1\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, own) is None  # -1: no quota
    _write(mount / "cpu.cfs_quota_us", "200000\n")
    assert cgroup_cpu_quota(root, own) == 2.0


def test_cgroup_quota_unreadable_or_garbled_means_none(tmp_path):
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None
    _write(tmp_path / "cgroup", "0::/\n")
    _write(tmp_path / "fs" / "cpu.max", "garbled\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "cgroup") is None
    _write(tmp_path / "fs" / "cpu.max", "-5 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "cgroup") is None
    _write(tmp_path / "cgroup", "not a cgroup line\n\n0::/\n")  # lines it cannot read are passed over
    _write(tmp_path / "fs" / "cpu.max", "300000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "cgroup") == 3.0


def test_usable_cores_round_a_quota_up_and_never_exceed_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: 1.5)
    assert usable_cores() == 2
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: 0.2)
    assert usable_cores() == 1
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: 96.0)
    assert usable_cores() == 64


STAGE = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from ardetect import procs
    from ardetect.stages.common import run_stage

    procs.CGROUP_ROOT, procs.PROC_CGROUP = Path("fs"), Path("cgroup")  # a container given one CPU's time
    procs._affinity_cores = lambda: 2  # on a machine of two cores or more
    if sys.argv[1] == "before":  # a stage module that imports torch at its top
        import torch
        torch.set_num_threads(2)  # as torch would count two cores

    def body(cfg):
        import torch  # a stage that imports it in its body: torch counts from the environment
        Path("threads").write_text(str(torch.get_num_threads()))
        child = "import torch; print(torch.get_num_threads(), end='')"  # a process the stage starts
        Path("child").write_text(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
        return {}

    run_stage("probe", body, lambda cfg: {})
""")


@pytest.mark.parametrize("imported", ["before", "in the body"])
@pytest.mark.parametrize("chosen", [None, "2"])
def test_a_stage_takes_the_quota_as_its_threads_unless_the_user_chose(tmp_path, chosen, imported):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    _write(tmp_path / "cgroup", "0::/\n")
    _write(tmp_path / "fs" / "cpu.max", "100000 100000\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(REPO / "src"), **({"OMP_NUM_THREADS": chosen} if chosen else {}))
    done = subprocess.run([sys.executable, "-c", STAGE, imported], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if chosen is None:
        assert (tmp_path / "threads").read_text() == "1"
        assert (tmp_path / "child").read_text() == "1"
        assert "1 thread(s), the CPU quota" in done.stderr + done.stdout
    else:
        assert (tmp_path / "threads").read_text() == "2"
        assert (tmp_path / "child").read_text() == "2"
        assert "CPU quota" not in done.stderr + done.stdout
    # the body's child process ended before the stage did: its peak is given beside the stage's own
    assert re.search(r"stage probe done in [\d.]+ s; peak memory \d+ MiB \(its largest worker process \d+ MiB\)\n",
                     done.stderr + done.stdout)


def _writable_v1_cpu_cgroup() -> Path | None:
    """This process's cgroup-v1 cpu cgroup, where it can make a child (Linux, as root); else None."""
    try:
        line = next(row for row in Path("/proc/self/cgroup").read_text().splitlines() if "cpu" in row.split(":")[1].split(","))
    except (OSError, StopIteration):
        return None
    controllers, path = line.split(":", 2)[1:]
    folder = next((Path("/sys/fs/cgroup") / n for n in (controllers, "cpu") if (Path("/sys/fs/cgroup") / n).is_dir()), None)
    if folder is None or not (folder / path.lstrip("/")).is_dir():
        return None
    folder = folder / path.lstrip("/")
    return folder if os.access(folder, os.W_OK) and (folder / "cpu.cfs_quota_us").exists() else None


@pytest.mark.skipif(_writable_v1_cpu_cgroup() is None, reason="needs a writable cgroup-v1 cpu controller (root on Linux)")
def test_usable_cores_under_a_real_cgroup_quota():
    """A process moved into a cgroup given half a CPU's time counts one core, where its affinity (and torch) count them all."""
    child = _writable_v1_cpu_cgroup() / f"ardetect-test-{os.getpid()}"
    child.mkdir()
    try:
        (child / "cpu.cfs_quota_us").write_text(str(int((child / "cpu.cfs_period_us").read_text()) // 2))
        code = (f"import os; open({str(child / 'cgroup.procs')!r}, 'w').write(str(os.getpid())); "
                "from ardetect.procs import usable_cores, cgroup_cpu_quota; print(cgroup_cpu_quota(), usable_cores())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
        assert out.split() == ["0.5", "1"]
    finally:
        child.rmdir()  # its one process has ended


def test_match_threads_changes_nothing_without_a_quota(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(procs, "cgroup_cpu_quota", lambda: None)
    before = torch.get_num_threads()
    assert procs.match_threads() is None
    assert "OMP_NUM_THREADS" not in os.environ
    assert torch.get_num_threads() == before


PEAK = textwrap.dedent("""
    import subprocess, sys
    import numpy as np
    from ardetect.procs import peak_memory_mib
    if sys.argv[1] == "parent":  # a large process (DVC, a test worker) starting a small one
        big = np.ones(600 * 2**20 // 8)
        big += 1
        print(subprocess.run([sys.executable, __file__, "1"], capture_output=True, text=True, check=True).stdout, end="")
    else:
        a = np.ones(int(sys.argv[1]) * 2**20 // 8)
        a += 1
        del a
        print(peak_memory_mib())
""")


def test_peak_memory_is_the_process_own_peak(tmp_path):
    """A process that held 300 MiB reports at least that; one that did not, far less, even when a 600-MiB process
    started it (``ru_maxrss`` would read the parent's size there)."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    held, idle, small_child = (float(subprocess.run([sys.executable, str(script), arg], check=True, capture_output=True, text=True,
                                                    env=env, timeout=120).stdout) for arg in ("300", "1", "parent"))
    assert held >= 300
    assert idle < 200
    assert small_child < 200
    assert procs.peak_memory_mib() > 0


CHILD_PEAK = textwrap.dedent("""
    from ardetect.procs import fork_context, peak_child_memory_mib, peak_memory_mib

    def work(mib):
        import numpy as np
        a = np.ones(mib * 2**20 // 8)
        a += 1
        return 0

    if __name__ == "__main__":
        before = peak_child_memory_mib()
        with fork_context().Pool(2) as pool:
            pool.map(work, [300, 20], chunksize=1)
        print(before, peak_child_memory_mib(), peak_memory_mib())
""")


def test_the_largest_worker_peak_is_read_after_the_pool_ends(tmp_path):
    """A data stage's forked workers are not in its own peak: the largest worker's is read apart (300 MiB held)."""
    script = tmp_path / "workers.py"
    script.write_text(CHILD_PEAK)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    before, child, own = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True, env=env,
                                        timeout=120).stdout.split()
    assert before == "None"  # no child had ended yet
    assert float(child) >= 300 and float(own) < 200
