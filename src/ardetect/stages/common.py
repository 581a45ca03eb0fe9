"""Shared plumbing of the stage entry points: config, atomic outputs, tracking, errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ardetect import tracking
from ardetect.config import Config, ConfigError, load_config
from ardetect.procs import match_threads, peak_child_memory_mib, peak_memory_mib
from ardetect.stage_inputs import inputs_changed_text, watch_own_inputs
from ardetect.tmpdirs import swap_into_place, temp_dir_beside

log = logging.getLogger("ardetect")
DATA = Path("data")
EXCLUSIONS = DATA / "validation" / "exclusions.parquet"  # tuples the quality gate keeps out of training and evaluation


class StageError(RuntimeError):
    """A stage could not produce its outputs; the message says why."""


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` whole.

    On any error the temp folder is removed and ``target`` is left as it was, so an
    interrupted stage never leaves a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def rebase_paths(values, tmp: Path, final: Path, data_root: Path) -> list[str]:
    """Rewrite paths written under the temp folder as paths under the final folder."""
    tmp_rel = tmp.relative_to(data_root).as_posix()
    final_rel = final.relative_to(data_root).as_posix()
    out = []
    for v in values:
        if not str(v).startswith(tmp_rel + "/"):
            raise StageError(f"path {v!r} is not under the stage's temp folder {tmp_rel}")
        out.append(final_rel + str(v)[len(tmp_rel) :])
    return out


def write_image_record(tmp: Path, final: Path, table, objects, columns: dict, label: str, file: str, table_paths: tuple[str, ...]) -> None:
    """Check an image stage's table (``columns``) and its objects table, rewrite their paths from
    ``tmp`` to ``final`` (``table_paths`` of the table; image and mask of the objects) and write
    both into ``tmp`` as ``file`` and ``objects.parquet``."""
    from ardetect.data.schema import OBJECT_COLUMNS, check_columns, write_parquet_atomic

    check_columns(table, columns, label)
    check_columns(objects, OBJECT_COLUMNS, f"{label.removesuffix('s')} objects")
    for col in table_paths:
        table[col] = rebase_paths(table[col], tmp, final, DATA)
    for col in ("image", "mask"):
        objects[col] = rebase_paths(objects[col], tmp, final, DATA)
    write_parquet_atomic(table, tmp / file)
    write_parquet_atomic(objects, tmp / "objects.parquet")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "alembic", "mlflow.store.db.utils"):  # their INFO lines bury the stage's own
        logging.getLogger(noisy).setLevel(logging.WARNING)


# seconds a stage's clean-up may take after SIGINT, SIGTERM or SIGHUP (it takes a few); `ard pipeline run` waits 120
CLEANUP_GRACE_S = 60.0


class _CleanupWatchdog:
    """Bounds a stopped stage's clean-up: once a stop signal has come, a daemon thread waits ``CLEANUP_GRACE_S``; if
    the process still runs then (a thread join or a lock that never returns: a signal can land inside a library
    between a lock's acquire and its release), it says so, prints where each thread stood, and exits with the
    signal's code. What the clean-up did not do is done by the next run (``tmpdirs`` removes a dead maker's temp
    files; ``tracking.close_abandoned_runs`` ends its run KILLED).

    The signal handlers only write a byte to a pipe (async-signal-safe, no Python lock), so they cannot
    themselves block on a lock the interrupted code holds."""

    def __init__(self, name: str):
        self.name, self.start, self.pid = name, time.perf_counter(), os.getpid()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        threading.Thread(target=self._watch, name="ard-cleanup-watchdog", daemon=True).start()

    def stopping(self, signum: int) -> None:
        """Called from a signal handler: the first call starts the countdown (a forked worker's call does not)."""
        if os.getpid() == self.pid:
            try:
                os.write(self._write, bytes([signum]))
            except OSError:  # the pipe is full: the countdown has started already
                pass

    def _watch(self) -> None:
        import faulthandler

        signum = os.read(self._read, 1)[0]
        time.sleep(CLEANUP_GRACE_S)
        os.write(2, (f"\n[{self.name}] interrupted after {time.perf_counter() - self.start:.1f} s "
                     f"({signal.Signals(signum).name}): its clean-up did not end within {CLEANUP_GRACE_S:.0f} s, so the "
                     "stage exits without it; where each thread stood follows. Its next run removes the temp files it "
                     "left and ends its MLflow run as KILLED\n").encode())
        faulthandler.dump_traceback(file=2, all_threads=True)
        os._exit(128 + signum)


_watchdog: _CleanupWatchdog | None = None


def _stopping(signum: int) -> None:
    if _watchdog is not None:
        _watchdog.stopping(signum)


def _stopped_once(signum: int) -> None:
    """The first stop signal: every later one (SIGINT, SIGTERM or SIGHUP) is ignored, so that none can cut short the
    clean-up the first one started. A stop reaches a stage by several routes at once: Ctrl-C by the terminal and by
    ``ard pipeline run`` passing it on; ``kill -TERM -PGID`` (``timeout make run``, a service manager) as SIGTERM to
    the whole process group, then as the SIGINT the pipeline passes on. The watchdog bounds the clean-up."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _stopping(signum)


def _terminated(signum, frame) -> None:
    _stopped_once(signum)
    _owe(SystemExit(128 + signum))


def _interrupted(signum, frame) -> None:
    """Ctrl-C: raise once (a ``KeyboardInterrupt``, which the stage reports as an interruption)."""
    _stopped_once(signum)
    _owe(KeyboardInterrupt())


_owed: BaseException | None = None  # the stop a handler raised
_reraising = threading.Event()  # set while a stop that Python swallowed waits to be raised again


def _owe(stop: BaseException) -> None:
    global _owed
    _owed = stop
    raise stop


def _swallowed(hook) -> None:
    """``sys.unraisablehook``: a stop signal's handler runs at whatever Python code is running, and when that is a
    weakref callback, a ``__del__`` or a garbage collection, Python prints its exception as "ignored" and carries on
    (a Ctrl-C once ran ``pretrain`` to its end that way, every later signal ignored). The stop is raised again in the
    main thread once this hook has returned: a thread sends the main thread SIGINT, handled by ``_raise_owed``, until
    it is raised; another swallowed exception goes to Python's own hook."""
    if _owed is not None and isinstance(hook.exc_value, type(_owed)):
        if not _reraising.is_set():
            _reraising.set()
            signal.signal(signal.SIGINT, _raise_owed)
            threading.Thread(target=_nudge, args=(threading.main_thread().ident,), name="ard-stop-again", daemon=True).start()
        return
    sys.__unraisablehook__(hook)


def _nudge(main: int) -> None:
    while _reraising.is_set():  # a real signal, so that a sleep or a blocking call in the main thread returns
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.05)


def _raise_owed(signum, frame) -> None:
    while frame is not None:
        if frame.f_code is _swallowed.__code__:  # still in the hook, where a raise is lost again: the next signal
            return
        frame = frame.f_back
    _reraising.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _owed


def run_stage(name: str, body: Callable[[Config], dict], params_section: Callable[[Config], dict], system_metrics: bool = False) -> None:
    """Load the config, open the stage's MLflow run, run ``body`` and exit non-zero with a clear message on failure.

    SIGTERM (a cancelled ``dvc repro``, ``kill``, a scheduler stopping the job) and SIGHUP (the terminal or SSH
    session closed) exit the same way as an error, through every ``finally``: temp folders are removed, nothing
    half-written is left beside the outputs, and the MLflow run is closed as KILLED. So does Ctrl-C (SIGINT)."""
    global _watchdog
    setup_logging()
    if _watchdog is None or _watchdog.pid != os.getpid():  # one a process (its thread and pipe are not undone)
        _watchdog = _CleanupWatchdog(name)
    else:
        _watchdog.name, _watchdog.start = name, time.perf_counter()
    signal.signal(signal.SIGTERM, _terminated)
    sys.unraisablehook = _swallowed
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with SIGINT ignored (a background job): keep it so
        signal.signal(signal.SIGINT, _interrupted)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # a closed terminal or SSH session, unless under nohup
        signal.signal(signal.SIGHUP, _terminated)
    inputs_moved = watch_own_inputs()  # run by a `dvc repro` or `dvc exp run` of the user's own: hashed as it starts
    threads = match_threads()  # a cgroup's CPU quota below the cores torch counted (a container given fewer CPUs' time)
    if threads is not None:
        log.info("stage %s: %d thread(s), the CPU quota this process has (set OMP_NUM_THREADS to choose)", name, threads)
    try:
        cfg = load_config("params.yaml")
    except ConfigError as err:
        print(f"[{name}] {err}", file=sys.stderr)
        raise SystemExit(2) from None
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, tracking.repo_root())
    start = time.perf_counter()
    try:
        with tracking.stage_run(
            name, cfg.tracking.experiment, uri, params={"profile": cfg.profile, **params_section(cfg)}, system_metrics=system_metrics
        ):
            metrics = body(cfg) or {}
            metrics["stage_seconds"] = time.perf_counter() - start
            metrics["peak_memory_mib"] = peak_memory_mib()
            child = peak_child_memory_mib()
            if child is not None:
                metrics["peak_child_memory_mib"] = child
            tracking.log_metrics(metrics)
    except (StageError, ValueError, FileNotFoundError, NotImplementedError, FloatingPointError, tracking.TrackingUnreachable) as err:
        print(f"[{name}] FAILED: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"[{name}] interrupted after {time.perf_counter() - start:.1f} s: nothing half-written is left; run it again "
              "to go on (a training from its last resume point)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    child = peak_child_memory_mib()
    workers = "" if child is None else f" (its largest worker process {child:.0f} MiB)"
    log.info("stage %s done in %.1f s; peak memory %.0f MiB%s", name, time.perf_counter() - start, peak_memory_mib(), workers)
    moved = inputs_moved() if inputs_moved is not None else []
    if moved:  # DVC records a stage's inputs as they are after its command: failing keeps the edited ones out of dvc.lock
        print(f"[{name}] FAILED: {inputs_changed_text(moved)}. Its outputs are kept, but DVC must not record them in dvc.lock "
              "as made from the inputs as they are now, so the stage ends with an error; run it again (`dvc repro`) to "
              "re-make them from the inputs as they are", file=sys.stderr)
        raise SystemExit(1)


def write_history(result, out: Path, artifact_path: str) -> None:
    """A training phase's record: ``history.json`` (every epoch, losses included), ``history.csv``
    (for ``dvc plots``), and ``metrics.json`` for ``dvc metrics``: the best epoch and its val
    Recall@K and box accuracy only (a dashboard, not the history); all logged to MLflow."""
    import math
    import re

    import pandas as pd

    history = result.history
    best = next((r for r in history if r.get("epoch") == result.best_epoch), {})
    scalars = lambda r: {k: v for k, v in r.items() if isinstance(v, (int, float))}  # noqa: E731
    headline = {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in scalars(best).items()
        if re.fullmatch(r"val_recall@\d+", k) or k == "val_box_accuracy"
    }
    tracking.write_json_atomic({"history": history, "best_epoch": result.best_epoch}, out / "history.json")
    tracking.write_json_atomic({"best_epoch": result.best_epoch, **headline}, out / "metrics.json")
    tmp = out / ".history.csv.tmp"
    pd.DataFrame([scalars(r) for r in history]).to_csv(tmp, index=False)
    os.replace(tmp, out / "history.csv")
    for name in ("history.json", "metrics.json", "history.csv"):
        tracking.log_artifact(out / name, artifact_path=artifact_path)
