"""Worker processes for the data stages: forked, and killable by the pool that started them."""

from __future__ import annotations

import multiprocessing
import signal


def fork_context():
    """The ``fork`` start method where the platform has it (workers inherit the loaded modules), else its default."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def reset_signals() -> None:
    """A pool worker's initializer: SIGTERM back to the system's default, so that it ends the worker.

    A stage turns SIGTERM into ``SystemExit`` so that its ``finally`` blocks run; a forked worker
    inherits that handler, and a worker blocked on the pool's task-queue lock when the pool
    terminated it stayed alive, and the stage with it, after its last image."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
