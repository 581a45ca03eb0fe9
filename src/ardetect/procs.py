"""The cores a stage may use (affinity and cgroup quota), and the data stages' worker processes: forked, killable by
the pool that started them, and ended with their stage."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import multiprocessing
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform reports one (a container's
    cpuset or `taskset` limits it below ``os.cpu_count()``, the machine's count), else ``os.cpu_count()``;
    and no more than its cgroup's CPU quota (``docker run --cpus 2``, a Kubernetes CPU limit), rounded up."""
    cores = _affinity_cores()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _affinity_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def cgroup_cpu_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The CPUs' worth of time per period this process's cgroup may use (quota / period), the smallest of
    its own and every cgroup above it: cgroup v2's ``cpu.max``, or v1's ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``. None when no cgroup on the path sets one, or there is none to read (not Linux).

    The affinity does not show a quota: a container given 2 CPUs' time on a 64-core host sees 64 cores,
    and a pool or a thread team of 64 on it spends its time waiting for its turn."""
    root = CGROUP_ROOT if root is None else Path(root)
    try:
        lines = (PROC_CGROUP if proc_cgroup is None else Path(proc_cgroup)).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # not a cgroup line: nothing to read from it
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: one hierarchy, mounted at the root
            quotas += _along(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()), None)
            if mount is not None:
                quotas += _along(mount, path, _v1_quota)
    return min(quotas) if quotas else None


def _along(mount: Path, path: str, read) -> list[float]:
    """The quotas that ``read`` finds in the cgroup at ``path`` under ``mount`` and every cgroup above it. In a
    container the mount is often the container's own cgroup, whose path is the host's: the mount itself is read too."""
    parts = [p for p in path.strip("/").split("/") if p]
    folders = {mount} | {mount.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)}
    return [q for q in (read(f) for f in folders if f.is_dir()) if q is not None]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _ratio(quota, period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota, period = ((folder / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, t = int(quota), int(period)
    except ValueError:
        return None
    return q / t if q > 0 and t > 0 else None  # v1 writes -1 for no quota


def match_threads() -> int | None:
    """Threads down to ``usable_cores()`` where a cgroup's CPU quota holds it below the affinity and nothing chose
    them (no ``OMP_NUM_THREADS``): ``OMP_NUM_THREADS`` for a torch imported from here on and for every process this
    one starts, and torch's intra-op threads if it is already imported. Torch sizes its thread team by the affinity
    and does not see a quota. Returns the new count, or None when nothing changed; never raises a count."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores, changed = usable_cores(), None
    if cores < _affinity_cores():
        os.environ["OMP_NUM_THREADS"] = str(cores)
        changed = cores
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
        changed = cores
    return changed


def peak_memory_mib() -> float:
    """This process's peak resident memory since it started its program, MiB: Linux's ``VmHWM``. ``ru_maxrss``
    is not that: Linux keeps it across ``execve``, so a stage started by a large process (DVC, a test worker)
    reads its parent's size at the fork; it serves only where ``/proc`` is missing. Children are not counted."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def peak_child_memory_mib() -> float | None:
    """The largest peak resident memory of this process's finished children (a data stage's worker pool), MiB, or
    None when none has ended. Linux's ``ru_maxrss`` of ``RUSAGE_CHILDREN``: the largest one child's (and its own
    children's), not their sum; a forked worker's counts the pages it still shares with the stage that forked it."""
    import resource

    if sys.platform == "darwin":
        return None  # bytes there, and forks are not the default start method
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 1024 if peak > 0 else None


def fork_context():
    """The ``fork`` start method where the platform has it (workers inherit the loaded modules), else its default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def reset_signals() -> None:
    """A pool worker's initializer: SIGTERM back to the system's default, so that it ends the worker, and SIGINT
    too unless it is ignored (a background job's).

    A stage turns SIGTERM into ``SystemExit`` so that its ``finally`` blocks run; a forked worker
    inherits that handler, and a worker blocked on the pool's task-queue lock when the pool
    terminated it stayed alive, and the stage with it, after its last image. On Ctrl-C, passed on to every
    process below ``ard pipeline run``, each worker printed the traceback of its ``KeyboardInterrupt`` above the
    stage's own line; it now ends without a word, and the stage says it was interrupted.

    On Linux the worker also asks for SIGTERM when its parent dies, so that a stage killed
    outright (SIGKILL, the out-of-memory killer), whose pool never gets to end its workers,
    leaves none running behind it; one whose parent is already gone ends at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        die_with_parent()


def die_with_parent() -> None:
    """Linux only: SIGTERM this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``); if the
    parent has already ended (this process was handed to another), exit now."""
    parent = multiprocessing.parent_process()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)
