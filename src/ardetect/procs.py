"""Worker processes for the data stages: forked, killable by the pool that started them, and ended with their stage."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform reports one (a container
    or `taskset` limits it below ``os.cpu_count()``, the machine's count), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def fork_context():
    """The ``fork`` start method where the platform has it (workers inherit the loaded modules), else its default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def reset_signals() -> None:
    """A pool worker's initializer: SIGTERM back to the system's default, so that it ends the worker.

    A stage turns SIGTERM into ``SystemExit`` so that its ``finally`` blocks run; a forked worker
    inherits that handler, and a worker blocked on the pool's task-queue lock when the pool
    terminated it stayed alive, and the stage with it, after its last image.

    On Linux the worker also asks for SIGTERM when its parent dies, so that a stage killed
    outright (SIGKILL, the out-of-memory killer), whose pool never gets to end its workers,
    leaves none running behind it; one whose parent is already gone ends at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
